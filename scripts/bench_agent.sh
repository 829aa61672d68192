#!/usr/bin/env bash
# The agent's CPU per event with and without the NATS sink, side by side in one run:
# two release agents (one plain, one with --nats to a nats-server this script starts on
# 127.0.0.1 with a port it picks and a temporary store) watch the same `stress-ng --fork 2`
# storm. Prints, for each, the events, the CPU (user + system, every thread, from its final
# counters, the sink's shutdown included) per event, the proc-event loss, and the ratio.
#
#   scripts/bench_agent.sh [SECONDS (default 10)]
#
# NATS_ARGS adds options to the agent with the sink (e.g. NATS_ARGS="--nats-linger 0").
#
# Needs nats-server and stress-ng. Target (issue #15): the sink adds no more than the
# agent's own per-event cost (ratio <= 2) and no proc-event loss.
set -euo pipefail
secs=${1:-10}
cd "$(dirname "$0")/.."
for tool in nats-server stress-ng jq; do
    command -v "$tool" >/dev/null || { echo "bench_agent.sh: $tool is required" >&2; exit 2; }
done
cargo build --release -q -p cnbus-agent
bin=$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)/release/cnbus-agent

tmp=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT

nats-server -js -a 127.0.0.1 -p -1 -sd "$tmp/store" --ports_file_dir "$tmp" -l "$tmp/nats.log" &
nats_pid=$!
pids+=("$nats_pid")
for _ in $(seq 500); do
    port=$(grep -ho '127.0.0.1:[0-9]*' "$tmp"/nats-server_*.ports 2>/dev/null | head -1 | cut -d: -f2) || true
    [ -n "${port:-}" ] && break
    sleep 0.02
done
[ -n "${port:-}" ] || { echo "bench_agent.sh: nats-server did not start" >&2; cat "$tmp/nats.log" >&2; exit 1; }

"$bin" --interval 3600 --output "$tmp/plain.jsonl" 2>"$tmp/plain.err" &
plain=$!
pids+=("$plain")
"$bin" --interval 3600 --output "$tmp/nats.jsonl" --nats "nats://127.0.0.1:$port" \
    --spool "$tmp/spool" --shutdown-deadline 60 ${NATS_ARGS:-} 2>"$tmp/nats.err" &
sink=$!
pids+=("$sink")
for f in plain nats; do
    for _ in $(seq 1000); do
        grep -q '"reason":"start"' "$tmp/$f.jsonl" 2>/dev/null && break
        sleep 0.02
    done
done
nats_cpu0=$(awk '{print $14 + $15}' "/proc/$nats_pid/stat")

stress-ng --fork 2 --timeout "$secs" >/dev/null 2>&1
sleep 2
kill -TERM "$plain" "$sink"
wait "$plain" "$sink" || true
nats_cpu1=$(awk '{print $14 + $15}' "/proc/$nats_pid/stat")
hz=$(getconf CLK_TCK)

final() { grep '"final":true' "$tmp/$1.err" | tail -1; }
p=$(final plain)
n=$(final nats)
[ -n "$p" ] && [ -n "$n" ] || { echo "bench_agent.sh: an agent gave no final counters" >&2; cat "$tmp"/*.err >&2; exit 1; }
lines_nats=$(wc -l <"$tmp/nats.jsonl")

jq -rn --argjson p "$p" --argjson n "$n" --argjson lines "$lines_nats" \
    --argjson ncpu "$(( nats_cpu1 - nats_cpu0 ))" --argjson hz "$hz" --arg secs "$secs" '
  def us: (.cpu_s * 1e6 / .events_total);
  def fmt: . * 100 | round / 100;
  "stress-ng --fork 2 for \($secs) s, two agents side by side (release build)",
  "",
  "| agent | events | CPU s | CPU µs/event | proc-event loss |",
  "| --- | ---: | ---: | ---: | --- |",
  "| plain (--output) | \($p.events_total) | \($p.cpu_s) | \($p | us | fmt) | \($p.lost_events) (exact: \($p.lost_exact)), kernel drops \($p.kernel_drops) |",
  "| --output + --nats | \($n.events_total) | \($n.cpu_s) | \($n | us | fmt) | \($n.lost_events) (exact: \($n.lost_exact)), kernel drops \($n.kernel_drops) |",
  "",
  "ratio with/without the sink: \(($n | us) / ($p | us) | fmt) (the sink adds \((($n | us) - ($p | us)) | fmt) µs/event)",
  "sink: lines \($lines), published \($n.nats.published), acknowledged \($n.nats.acknowledged), spooled \($n.nats.spooled), dropped \($n.nats.dropped), unsent \($n.nats.unsent), resent \($n.nats.resent)",
  "nats-server CPU: \($ncpu / $hz) s, \(($ncpu / $hz * 1e6 / $lines) | fmt) µs/line"
'
