#!/usr/bin/env bash
# Install the Debian packages for the local single-node Slurm cluster that the `slurm` tests use
# (see scripts/slurm/start.sh). Root only; idempotent: when every package is installed it does nothing.
#
#   sudo bash scripts/slurm/install.sh
#
# slurmdbd + mariadb-server are needed too: submitit polls job state with `sacct`, and without
# accounting a job that dies without writing a result makes `job.result()` wait for ever.
set -uo pipefail

PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)

if [ "$(id -u)" != 0 ]; then
  echo "install.sh: must run as root (it installs Debian packages: ${PACKAGES[*]})" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install.sh: apt-get not found: only Debian/Ubuntu are supported" >&2
  exit 1
fi

missing=()
for p in "${PACKAGES[@]}"; do
  if [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" != installed ]; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} = 0 ]; then
  echo "install.sh: already installed: ${PACKAGES[*]}"
  exit 0
fi

start=$(date +%s)
echo "install.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# Keep the packages' maintainer scripts from starting daemons (no init system here anyway):
# start.sh runs each daemon by hand with its own configuration.
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && made_policy=1
fi
cleanup() { [ "$made_policy" = 1 ] && rm -f "$policy"; }
trap cleanup EXIT

apt_opts=(-y -q -o DPkg::Lock::Timeout=300 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
if ! apt-get "${apt_opts[@]}" install --no-install-recommends "${missing[@]}"; then
  # The package lists may be missing or stale (a fresh machine): refresh them once and retry.
  echo "install.sh: apt-get install failed; running apt-get update and retrying" >&2
  if ! apt-get -q update; then
    echo "install.sh: apt-get update failed" >&2
    exit 1
  fi
  if ! apt-get "${apt_opts[@]}" install --no-install-recommends "${missing[@]}"; then
    echo "install.sh: apt-get install failed for: ${missing[*]}" >&2
    exit 1
  fi
fi
echo "install.sh: installed ${missing[*]} in $(( $(date +%s) - start )) s"
