#!/usr/bin/env bash
# The Debian packages some tests need, installed as root (.ci/run calls this before the tests):
#
#   texlive-latex-base  pdflatex: bench table's LaTeX compiles and fits the page (tests/test_table_layouts.py)
#   chromium            a headless browser renders bench report's page (tests/test_report.py)
#   Slurm               scripts/slurm/install.sh: a local cluster for the tests marked `slurm`
#
# Each group is optional: when it cannot be installed (no root, no apt, no network) this prints a warning
# and goes on, and the tests that need it skip with the reason. Idempotent: installed packages are skipped.
# Prints how long each install took.
set -uo pipefail
cd "$(dirname "$0")/../.."

if [ "$(id -u)" != 0 ]; then
  echo "WARNING: not root, no system packages installed: LaTeX, browser and slurm tests will skip" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive

# install_packages WHAT PACKAGE...: install the missing ones (refreshing the package lists once if apt fails);
# fails where there is no apt (not Debian/Ubuntu), and the caller warns.
install_packages() {
  local what=$1 missing=() p start
  shift
  for p in "$@"; do
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" = installed ] || missing+=("$p")
  done
  if [ ${#missing[@]} = 0 ]; then
    echo "system_packages.sh: $what: already installed ($*)"
    return 0
  fi
  start=$(date +%s)
  local apt_opts=(-y -q -o DPkg::Lock::Timeout=300 install --no-install-recommends)
  if ! apt-get "${apt_opts[@]}" "${missing[@]}"; then
    apt-get -q update && apt-get "${apt_opts[@]}" "${missing[@]}" || return 1
  fi
  echo "system_packages.sh: $what: installed ${missing[*]} in $(( $(date +%s) - start )) s"
}

install_packages "pdflatex" texlive-latex-base \
  || echo "WARNING: texlive-latex-base not installed: the tests that compile LaTeX will skip" >&2
install_packages "headless browser" chromium \
  || echo "WARNING: chromium not installed: the test that renders bench report in a browser will skip" >&2
bash scripts/slurm/install.sh \
  || echo "WARNING: scripts/slurm/install.sh failed: tests marked slurm will skip" >&2
exit 0
