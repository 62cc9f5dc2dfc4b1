#!/usr/bin/env bash
# `make reader`: the book as a reader outside the checkout uses it. The wheel is installed into a
# fresh virtual environment (its dependencies are taken from .venv, read-only, so the stage needs
# no network), one theory chapter and one experimental chapter are copied alone into an empty
# directory and run with papermill: the theory chapter at its default profile, the experimental
# one with its results fetched from a release asset built from results/ and served on localhost;
# without the asset, the experimental chapter must stop with the error that says what to fetch.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
WORK=$(mktemp -d)
SERVER=""
cleanup() { [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
THEORY=book/02_input_gradient.ipynb
EXPERIMENT=book/12_matched_strength.ipynb

echo "-- the wheel, in a fresh environment outside the checkout"
mkdir "$WORK/pkg"  # built from a copy, so that no build/ folder lands in the checkout
cp -r src pyproject.toml README.md LICENSE "$WORK/pkg/"
.venv/bin/python -m pip wheel --quiet --no-deps --no-build-isolation -w "$WORK/dist" "$WORK/pkg"
python3 -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
deps=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$deps" > "$site/zz_dependencies.pth"  # after the environment's own packages
"$PY" -m pip install --quiet --no-deps --no-index "$WORK"/dist/robustreg-*.whl
"$PY" -m ipykernel install --sys-prefix --name reader >/dev/null
where=$("$PY" -c 'import robustreg; print(robustreg.__file__)')
case "$where" in "$site"/*) echo "robustreg from the wheel: $where" ;;
  *) echo "robustreg imported from $where, not from the wheel"; exit 1 ;; esac

echo "-- the release asset, served on localhost"
mkdir "$WORK/site" "$WORK/reader"
sha=$(.venv/bin/python tools/results_asset.py "$WORK/site/results.tar.gz" | awk '{print $NF}')
port=$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
.venv/bin/python -m http.server --bind 127.0.0.1 --directory "$WORK/site" "$port" >/dev/null 2>&1 &
SERVER=$!
sleep 1
cp "$THEORY" "$EXPERIMENT" "$WORK/reader/"
cd "$WORK/reader"
run() {  # papermill in the reader's environment, outside the checkout, with no published results
  env -u ROBUSTREG_RESULTS ROBUSTREG_CACHE="$WORK/cache" OMP_NUM_THREADS=1 "$@"
}

echo "-- $THEORY at its default profile"
run "$PY" -m papermill "$(basename "$THEORY")" theory.ipynb -k reader --cwd . >/dev/null 2>&1 \
  || { echo "the theory chapter failed outside the checkout"; exit 1; }

echo "-- $EXPERIMENT without the asset: the error must say what to fetch"
if run "$PY" -m papermill "$(basename "$EXPERIMENT")" missing.ipynb -k reader --cwd . \
    >"$WORK/missing.log" 2>&1; then
  echo "the experimental chapter ran without its results"; exit 1
fi
grep -q "set ROBUSTREG_RESULTS" "$WORK/missing.log" \
  || { echo "no clear error without the results:"; tail -20 "$WORK/missing.log"; exit 1; }

echo "-- $EXPERIMENT with its results from the asset"
run env ROBUSTREG_RESULTS_URL="http://127.0.0.1:$port/results.tar.gz" ROBUSTREG_RESULTS_SHA256="$sha" \
  "$PY" -m papermill "$(basename "$EXPERIMENT")" experiment.ipynb -k reader --cwd . \
  >"$WORK/experiment.log" 2>&1 \
  || { echo "the experimental chapter failed with the asset:"; tail -30 "$WORK/experiment.log"; exit 1; }
echo "reader stage: both chapters ran outside the checkout"
