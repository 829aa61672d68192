#!/usr/bin/env bash
# Runs proctrace with full enrichment (the default), with eager enrichment (a /proc read
# at every fork), without enrichment, and
# forkstat side by side on the same fork storm (all four at once, each writing to a file),
# and prints, for each, the events captured, the events lost (as far as each tool can tell)
# and tracer CPU (user + system) per event, with the ratio to forkstat's.
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
cargo build --release --quiet -p proctrace
PT=./target/release/proctrace

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# CPU seconds (user + system) of a live process, from /proc/<pid>/stat fields 14 and 15.
cpu_secs() {
  awk -v t="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.2f", ($12 + $13) / t }' "/proc/$1/stat"
}

# Every proctrace with the default receive buffer, --json, to a file.
"$PT" --json --stats --enrich full >"$out/full.out" 2>"$out/full.err" &
pt_full=$!
"$PT" --json --stats --enrich eager >"$out/eager.out" 2>"$out/eager.err" &
pt_eager=$!
"$PT" --json --stats --enrich off >"$out/off.out" 2>"$out/off.err" &
pt_off=$!
forkstat -e all >"$out/forkstat.out" 2>"$out/forkstat.err" &
fs=$!
sleep 1
stress-ng --fork "$WORKERS" --timeout "$DUR" --metrics-brief >"$out/stress.log" 2>&1 || true
sleep 2 # let all of them drain their queues
c_full=$(cpu_secs "$pt_full")
c_eager=$(cpu_secs "$pt_eager")
c_off=$(cpu_secs "$pt_off")
c_fs=$(cpu_secs "$fs")
kill -INT "$pt_full" "$pt_eager" "$pt_off" "$fs"
for p in "$pt_full" "$pt_eager" "$pt_off" "$fs"; do wait "$p" || true; done

forks=$(awk '/stress-ng.*fork /{ for (i = 1; i <= NF; i++) if ($i == "fork") { print $(i + 1); exit } }' "$out/stress.log")

# proctrace: its summary line states events delivered and lost.
events() { sed -n 's/^proctrace: \([0-9]*\) events.*/\1/p' "$1"; }
lost() { sed -n 's/.*; lost: \([^;]*\);.*/\1/p' "$1"; }
# forkstat prints a fork as two lines (parent and child); every other event as one.
fs_events=$(awk 'NR > 1 && NF >= 3 { if ($2 == "fork") f++; else if ($2 ~ /^(exec|exit|comm|clone|ptrace|uid|sid|core|coredump)$/) o++ }
                 END { printf "%d", f / 2 + o }' "$out/forkstat.out")
fs_lost=$(cat "$out/forkstat.err" "$out/forkstat.out" | grep -ci 'enobufs\|no buffer space' || true)

# Microseconds of CPU per event.
us() { awk -v c="$1" -v e="$2" 'BEGIN { if (e > 0) printf "%.2f", c * 1e6 / e; else print "n/a" }'; }
fs_us=$(us "$c_fs" "$fs_events")
ratio() { awk -v a="$fs_us" -v b="$1" 'BEGIN { if (b > 0) printf "%.1fx", a / b; else print "n/a" }'; }

echo "storm: stress-ng --fork $WORKERS --timeout $DUR  (bogo fork ops: ${forks:-?}; each fork also makes an exit event)"
printf '%-22s %10s  %-42s %7s %10s %16s\n' tool events lost "CPU s" "µs/event" "forkstat/this"
row() { # name events lost cpu
  local u; u=$(us "$4" "$2")
  printf '%-22s %10s  %-42s %7s %10s %16s\n' "$1" "$2" "$3" "$4" "$u" "$(ratio "$u")"
}
row "proctrace enrich full" "$(events "$out/full.err")" "$(lost "$out/full.err")" "$c_full"
row "proctrace enrich eager" "$(events "$out/eager.err")" "$(lost "$out/eager.err")" "$c_eager"
row "proctrace enrich off" "$(events "$out/off.err")" "$(lost "$out/off.err")" "$c_off"
row forkstat "$fs_events" "not reported ($fs_lost ENOBUFS mentions)" "$c_fs"
grep -h '^enrichment:' "$out/full.err" "$out/eager.err" | sed 's/^/  /' || true
