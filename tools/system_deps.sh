#!/usr/bin/env bash
# Preflight of `make test`: the Debian packages its later stages need.
#   chromium               the browser check (tools/browser_check.py drives /usr/bin/chromium)
#   fonts-dejavu-core      a font for Chromium to render the pages with
#   dataset-fashion-mnist  the Fashion-MNIST IDX files in /usr/share/datasets/fashion-mnist
# Missing ones are installed with apt-get when running as root; otherwise this prints the
# command to run and fails, before any stage has started.
set -uo pipefail

missing() {
  need=()
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
  [ -d /usr/share/fonts/truetype/dejavu ] || need+=(fonts-dejavu-core)
  [ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
}

missing
[ ${#need[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "== installing Debian packages: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || exit 1
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null || exit 1
  missing
  [ ${#need[@]} -eq 0 ] && exit 0
  echo "make test: still missing after apt-get install: ${need[*]}" >&2
  exit 1
fi

echo "make test: missing Debian packages: ${need[*]}" >&2
echo "make test: install them first with:" >&2
echo "    sudo apt-get install ${need[*]}" >&2
exit 1
