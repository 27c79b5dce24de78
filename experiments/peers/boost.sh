#!/usr/bin/env bash
# Run a command in a scheduling group of its own, at a higher priority: for timing runs on a shared machine.
#
#   boost.sh [--pidfile FILE] [--cpus LIST] CMD [ARGS...]
#
# The kernel here groups processes by session (sched_autogroup_enabled = 1): a nice value only
# ranks processes within one session, and each session gets an equal share of a core. Other
# sessions' test suites then took ~3/4 of the core a server ran on (a single-thread 512x512
# matmul: median 11-14 ms instead of 2.6-3.0 ms, even at nice -19 inside our session). So CMD gets
# a new session (setsid) whose group nice is $PEER_NICE (default -19; needs root or CAP_SYS_NICE,
# else it runs unboosted with a warning), and, with --cpus, an affinity (taskset).
# --pidfile: the PID CMD runs as (the session leader; its `exec`s keep it), to stop it later.
set -euo pipefail
pidfile=/dev/null cpus=
while [ $# -gt 0 ]; do
  case "$1" in
    --pidfile) pidfile=$2; shift 2 ;;
    --cpus) cpus=$2; shift 2 ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || { awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 2; }
export PEER_NICE=${PEER_NICE:--19} BOOST_PIDFILE=$pidfile BOOST_CPUS=$cpus
exec setsid -w bash -c '
  echo $$ > "$BOOST_PIDFILE"
  echo "$PEER_NICE" > /proc/self/autogroup 2>/dev/null || echo "boost.sh: cannot set the group nice to $PEER_NICE" >&2
  if [ -n "$BOOST_CPUS" ]; then exec taskset -c "$BOOST_CPUS" "$@"; else exec "$@"; fi' boost "$@"
