#!/usr/bin/env bash
# The bus's latency bound under overload: CPU-bound threads that insert now and then.
#
# Runs examples/bus_producer ROUNDS times (5 threads, each busy WORK_NS between two
# inserts, 64-byte messages, Bus::insert, group 27, default max_latency 1 ms) and prints
# each run's BusStats::max_queue_delay (from a ring's oldest message to the drain that
# took it), then the median and the largest of the runs.
# With several binaries (before and after a change) they alternate, run by run. Prefixes
# to a binary, combined as `iso:rt:PATH`:
#   fifo:  its flusher thread (named cnbus-flusher) moved to SCHED_FIFO priority 1
#          (`chrt -f -p 1 TID`) as soon as it appears: for binaries without the option;
#   rt:    --flusher-realtime 1 (BusBuilder::flusher_realtime: the same from the start);
#   na:    --no-assist (only the flusher sends);
#   iso:   in an autogroup of its own at nice -20, so that the other sessions' load on
#          the host weighs less and the overload is mostly the producer's own threads.
#
# Usage (as root): scripts/bus_latency.sh [[PREFIX:]...PRODUCER_BINARY...]
#   default: target/release/examples/bus_producer (built here), then rt: the same
# Environment (defaults): ROUNDS=6 THREADS=5 COUNT=60000 WORK_NS=20000
#   EXTRA: more options for every run (e.g. --no-assist)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-6} THREADS=${THREADS:-5} COUNT=${COUNT:-60000} WORK_NS=${WORK_NS:-20000}
[ "$(id -u)" = 0 ] || { echo "bus_latency: run as root (multicast needs it)" >&2; exit 2; }
if [ $# -eq 0 ]; then
  cargo build --release --quiet --example bus_producer
  set -- target/release/examples/bus_producer rt:target/release/examples/bus_producer
fi
# One run of spec $1: prints the producer's last line.
run() {
  local spec=$1 iso='' fifo='' out pid tid
  local args=(--group 27 --idx 0x7a11 --threads "$THREADS" --count "$COUNT" --work-ns "$WORK_NS" ${EXTRA:-})
  while [[ $spec == *:* ]]; do
    case ${spec%%:*} in
      iso) iso=1 ;;
      fifo) fifo=1 ;;
      rt) args+=(--flusher-realtime 1) ;;
      na) args+=(--no-assist) ;;
      *) echo "bus_latency: unknown prefix in $spec" >&2; exit 2 ;;
    esac
    spec=${spec#*:}
  done
  out=$(mktemp)
  if [ -n "$iso" ]; then
    setsid sh -c 'echo -20 > /proc/$$/autogroup; exec "$0" "$@"' "$spec" "${args[@]}" >"$out" &
  else
    "$spec" "${args[@]}" >"$out" &
  fi
  pid=$!
  if [ -n "$fifo" ]; then
    for _ in $(seq 2000); do
      tid=$(grep -lx cnbus-flusher /proc/"$pid"/task/*/comm 2>/dev/null | head -1 | cut -d/ -f5) || true
      [ -n "$tid" ] && { chrt -f -p 1 "$tid"; break; }
      sleep 0.001
    done
  fi
  wait "$pid"
  tail -1 "$out"
  rm -f "$out"
}
declare -A all
for r in $(seq "$ROUNDS"); do
  for b in "$@"; do
    line=$(run "$b")
    ms=$(sed -n 's/.*longest queue delay \([0-9.]*\)\(m\|µ\|u\|n\)\?s.*/\1 \2/p' <<<"$line" |
      awk '{ f = ($2 == "m") ? 1 : ($2 == "" ? 1000 : ($2 == "n" ? 1e-6 : 1e-3)); printf "%.2f", $1 * f }')
    echo "round $r $b: max_queue_delay ${ms} ms, load $(cut -d' ' -f1 /proc/loadavg)"
    all[$b]="${all[$b]:-} $ms"
  done
done
for b in "$@"; do
  tr ' ' '\n' <<<"${all[$b]}" | sed '/^$/d' | sort -n |
    awk -v b="$b" '{ a[NR] = $1 } END { printf "%s: median %.2f ms, max %.2f ms over %d runs\n", b, a[int((NR + 1) / 2)], a[NR], NR }'
done
