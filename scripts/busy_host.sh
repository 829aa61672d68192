#!/usr/bin/env bash
# Runs a command on a busy, hostile host and stops the load whatever happens.
#
# The load, for as long as the command runs (at most BUSY_SECONDS):
#   - a fork storm: `stress-ng --fork BUSY_FORKERS` (a shell loop of /bin/true without
#     stress-ng), so proc events from foreign processes flood group 1;
#   - examples/noise.rs: a foreign sender multicasting valid and malformed datagrams on every
#     user group 12..=32 (BUSY_RATE a second, with the ids and seq numbers the tests use) and
#     well-formed spoofed FORK/EXEC/EXIT proc events on group 1 (BUSY_PROC_RATE a second).
#
# Usage (as root): scripts/busy_host.sh COMMAND [ARGS...]
#   e.g. scripts/busy_host.sh cargo test --workspace --all-features
# Environment (defaults): BUSY_SECONDS=1800 BUSY_RATE=2000 BUSY_PROC_RATE=200 BUSY_FORKERS=1
#
# Exit status: the command's; 3 when the load was gone before the command ended (noise
# failed, or BUSY_SECONDS too short for the command), so the run proved nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${BUSY_SECONDS:-1800}
RATE=${BUSY_RATE:-2000}
PROC_RATE=${BUSY_PROC_RATE:-200}
FORKERS=${BUSY_FORKERS:-1}

[ $# -gt 0 ] || { sed -n '2,17s/^# \{0,1\}//p' "$0" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "busy_host: run as root (multicast and spoofing need it)" >&2; exit 2; }

cargo build --release --quiet --example noise
NOISE=./target/release/examples/noise

noise='' storm='' cmd=''
cleanup() {
  trap - EXIT INT TERM
  # Only what this script started, by pid (the storm by the process group setsid made).
  if [ -n "$cmd" ]; then kill -TERM "$cmd" 2>/dev/null || true; fi
  if [ -n "$noise" ]; then kill -TERM "$noise" 2>/dev/null || true; fi
  if [ -n "$storm" ]; then kill -TERM -- "-$storm" 2>/dev/null || true; fi
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

"$NOISE" --seconds "$SECS" --rate "$RATE" --proc-rate "$PROC_RATE" &
noise=$!
# setsid: the storm leads its own process group, so its workers stop with it. (A background
# job of a non-interactive shell is never a group leader, so setsid does not fork: $! is it.)
if command -v stress-ng >/dev/null; then
  setsid stress-ng --fork "$FORKERS" --timeout "${SECS}s" --quiet &
else
  echo "busy_host: no stress-ng; forking with a shell loop" >&2
  setsid timeout "${SECS}s" sh -c 'while :; do /bin/true; done' &
fi
storm=$!
echo "busy_host: load on (noise pid $noise, fork storm pgid $storm): $*" >&2

# In the background and waited for, so a TERM or INT to this script stops it at once (a
# `timeout` around this script signals the whole process group, the command included).
"$@" &
cmd=$!
set +e
wait "$cmd"
status=$?
set -e
cmd=''

for p in "$noise" "$storm"; do
  if ! kill -0 "$p" 2>/dev/null; then
    echo "busy_host: the load (pid $p) ended before the command did; the run proved nothing" >&2
    if [ "$status" = 0 ]; then status=3; fi
  fi
done
echo "busy_host: command exited $status; stopping the load" >&2
exit "$status"
