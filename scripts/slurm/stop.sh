#!/usr/bin/env bash
# Stop the single-node Slurm cluster that start.sh started: slurmd, slurmctld, slurmdbd, mariadbd, munged.
#   sudo bash scripts/slurm/stop.sh            # keeps $BENCH_SLURM_DIR (job ids, accounting) for the next start
#   sudo bash scripts/slurm/stop.sh --purge    # also deletes $BENCH_SLURM_DIR (job ids restart at 1)
# munged is stopped too, unless BENCH_SLURM_KEEP_MUNGE=1 (another service on this machine may use it).
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
. "$HERE/common.sh"

if [ "$(id -u)" != 0 ]; then
  echo "stop.sh: must run as root" >&2
  exit 1
fi
purge=0
[ "${1:-}" = --purge ] && purge=1

# One start/stop at a time (see start.sh).
if [ -d "$BENCH_SLURM_DIR" ] && [ "${BENCH_SLURM_LOCKED:-}" != 1 ]; then
  BENCH_SLURM_LOCKED=1 flock -w 300 -E 75 "$BENCH_SLURM_DIR/.start.lock" bash "$0" "$@"
  rc=$?
  [ $rc = 75 ] && echo "stop.sh: another start.sh/stop.sh held $BENCH_SLURM_DIR/.start.lock for 300 s" >&2
  exit $rc
fi

# slurmd and slurmctld together (each takes a couple of seconds), then slurmdbd once slurmctld has sent it
# its last records, then the database and munge.
stop_pidfile slurmd "$SLURM_RUN/slurmd.pid" 30 &
stop_pidfile slurmctld "$SLURM_RUN/slurmctld.pid" 30 &
wait
stop_pidfile slurmdbd "$SLURM_RUN/slurmdbd.pid" 30
stop_pidfile mariadbd "$MYSQL_RUN/mariadbd.pid" 60 &
if [ "${BENCH_SLURM_KEEP_MUNGE:-0}" != 1 ]; then
  stop_pidfile munged /run/munge/munged.pid 10 &
fi
wait
if [ "$purge" = 1 ]; then
  log "removing $BENCH_SLURM_DIR"
  rm -rf "$BENCH_SLURM_DIR"
  [ -L /etc/slurm/slurm.conf ] && rm -f /etc/slurm/slurm.conf
fi
log "stopped"
