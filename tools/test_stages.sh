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
stage "lint (ruff, actionlint)" make --no-print-directory lint
stage "unit and property tests" make --no-print-directory unit
stage "papermill smoke runs (seed 1)" make --no-print-directory smoke
stage "nbval (committed outputs)" make --no-print-directory nbval
stage "nbval, another ISA and thread count" make --no-print-directory nbval-portable
stage "committed runs retrained" make --no-print-directory reproduction
stage "a reader outside the checkout" make --no-print-directory reader
stage "jupyter-book build -W"  make --no-print-directory html
stage "browser check"          make --no-print-directory browser
report
echo "stages: ${#summary[@]} passed, 0 failed"
