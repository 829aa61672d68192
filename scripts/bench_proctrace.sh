#!/usr/bin/env bash
# Runs proctrace and forkstat side by side on the same fork storm and prints, for each,
# the events captured, the events lost (as far as each tool can tell) and CPU seconds per
# 1000 events.
#
# Usage (as root): scripts/bench_proctrace.sh [SECONDS] [WORKERS]
#   defaults: a 10 s `stress-ng --fork 2` storm.
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${1:-10}
WORKERS=${2:-2}

[ "$(id -u)" = 0 ] || { echo "run as root: the proc connector needs CAP_NET_ADMIN" >&2; exit 1; }
if ! command -v forkstat >/dev/null || ! command -v stress-ng >/dev/null; then
  echo "installing forkstat and stress-ng..." >&2
  apt-get update -qq && apt-get install -y -qq forkstat stress-ng >/dev/null
fi
cargo build --release --quiet --bin proctrace
PT=./target/release/proctrace

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# CPU seconds (user + system) of a live process, from /proc/<pid>/stat fields 14 and 15.
cpu_secs() {
  awk -v t="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.2f", ($12 + $13) / t }' "/proc/$1/stat"
}

"$PT" --json --stats >/dev/null 2>"$out/proctrace.err" &
pt=$!
forkstat -e all >"$out/forkstat.out" 2>"$out/forkstat.err" &
fs=$!
sleep 1
stress-ng --fork "$WORKERS" --timeout "$DUR" --metrics-brief >"$out/stress.log" 2>&1 || true
sleep 2 # let both drain their queues
pt_cpu=$(cpu_secs "$pt")
fs_cpu=$(cpu_secs "$fs")
kill -INT "$pt" "$fs"
wait "$pt" || true
wait "$fs" || true

forks=$(awk '/stress-ng.*fork /{ for (i = 1; i <= NF; i++) if ($i == "fork") { print $(i + 1); exit } }' "$out/stress.log")

# proctrace: its summary line states events delivered and lost.
pt_events=$(sed -n 's/^proctrace: \([0-9]*\) events.*/\1/p' "$out/proctrace.err")
pt_lost=$(sed -n 's/.*; lost: \([^;]*\);.*/\1/p' "$out/proctrace.err")
# forkstat prints a fork as two lines (parent and child); every other event as one.
fs_events=$(awk 'NR > 1 && NF >= 3 { if ($2 == "fork") f++; else if ($2 ~ /^(exec|exit|comm|clone|ptrace|uid|sid|core|coredump)$/) o++ }
                 END { printf "%d", f / 2 + o }' "$out/forkstat.out")
fs_lost=$(cat "$out/forkstat.err" "$out/forkstat.out" | grep -ci 'enobufs\|no buffer space' || true)

per1k() { awk -v c="$1" -v e="$2" 'BEGIN { if (e > 0) printf "%.3f", c * 1000 / e; else print "n/a" }'; }

echo "storm: stress-ng --fork $WORKERS --timeout $DUR  (bogo fork ops: ${forks:-?}; each fork also makes an exit event)"
printf '%-10s %12s  %-48s %10s %16s\n' tool events lost "CPU s" "CPU s/1000 ev"
printf '%-10s %12s  %-48s %10s %16s\n' proctrace "$pt_events" "$pt_lost" "$pt_cpu" "$(per1k "$pt_cpu" "$pt_events")"
printf '%-10s %12s  %-48s %10s %16s\n' forkstat "$fs_events" "not reported ($fs_lost ENOBUFS mentions)" "$fs_cpu" "$(per1k "$fs_cpu" "$fs_events")"
