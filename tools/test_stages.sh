#!/usr/bin/env bash
# `make test`: every stage CI checks, each timed; stops at the first failing stage.
set -uo pipefail
cd "$(dirname "$0")/.."
# Preflight: the Debian packages of the later stages (installed as root, else the command to run).
bash tools/system_deps.sh || exit $?
summary=()
total0=$(date +%s)
report() {
  echo
  echo "== stage times =="
  for line in "${summary[@]}"; do echo "  $line"; done
  echo "  total: $(( $(date +%s) - total0 )) s"
}
stage() {
  local name=$1; shift
  echo
  echo "===== stage: $name ====="
  local t0; t0=$(date +%s)
  "$@"
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if [ $rc -ne 0 ]; then
    summary+=("$name: FAILED after ${dt} s")
    report
    echo "make test: stage '$name' failed (exit $rc)"
    exit $rc
  fi
  summary+=("$name: ${dt} s")
}
# lane LOG SUMMARY name=target ...: the stages of one lane in order (_ in a name: a space), output to LOG, their times
# (or the failure) to SUMMARY; the exit status of the first failing stage.
lane() {
  local log=$1 sum=$2; shift 2
  local spec name target t0 rc
  for spec in "$@"; do
    name=${spec%%=*}; name=${name//_/ }; target=${spec#*=}
    echo "===== stage: $name =====" >> "$log"
    t0=$(date +%s)
    make --no-print-directory "$target" >> "$log" 2>&1
    rc=$?
    if [ $rc -ne 0 ]; then
      echo "$name: FAILED after $(( $(date +%s) - t0 )) s" >> "$sum"
      return $rc
    fi
    echo "$name: $(( $(date +%s) - t0 )) s (side by side)" >> "$sum"
  done
}
# side_by_side "name=target ..." ...: lanes of stages at once (stages that leave a core idle: one
# process, or a last job alone); each lane's output is printed, in order, when all are done.
side_by_side() {
  local dir; dir=$(mktemp -d)
  local pids=() i=0 spec rc first=0
  for spec in "$@"; do
    i=$((i + 1))
    # shellcheck disable=SC2086  # a lane is a word list on purpose
    lane "$dir/$i.log" "$dir/$i.sum" $spec &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do
    wait "$pid"; rc=$?
    [ $first -eq 0 ] && first=$rc
  done
  echo
  for ((j = 1; j <= i; j++)); do cat "$dir/$j.log"; done
  for ((j = 1; j <= i; j++)); do
    while IFS= read -r line; do summary+=("$line"); done < <(cat "$dir/$j.sum" 2>/dev/null)
  done
  rm -rf "$dir"
  if [ $first -ne 0 ]; then
    report
    echo "make test: a stage failed (exit $first)"
    exit $first
  fi
}
stage "lint (ruff, actionlint)" make --no-print-directory lint
stage "unit and property tests" make --no-print-directory unit
stage "papermill smoke runs (seed 1)" make --no-print-directory smoke
stage "nbval (committed outputs)" make --no-print-directory nbval
stage "nbval, another ISA and thread count" make --no-print-directory nbval-portable
side_by_side "committed_runs_retrained=reproduction" "a_reader_outside_the_checkout=reader" \
  "jupyter-book_build_-W=html browser_check=browser"
report
echo "stages: ${#summary[@]} passed, 0 failed"
