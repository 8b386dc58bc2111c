#!/usr/bin/env bash
# The farm's cost per tile task beyond the engine, against the canvas size (issue 10 item 2): for each
# canvas size, a tiled job (tubingen x starry_night from ../shared/data, 512-px tiles, 1 iteration per
# scale) through a real coordinator and one real CPU worker; from the worker's log, per task:
# task_s - engine_s (lease to reported, minus the engine thread's time) and the bytes it downloaded; and
# the engine's idle time between two tiles of a scale (from one tile's "rendered" line to the next one's
# "inputs ready", the engine's start: the worker's lease, downloads, preparation, and whatever of the
# previous tile's report it waited for).
#   bash bench/farm_tiles.sh [SIZES]            e.g. bash bench/farm_tiles.sh 2048,4096,8192
# Needs a release build (cargo build --release). KEEP=DIR keeps the logs there; BIN=PATH runs another
# stylefarm binary (an older build, side by side).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=${BIN:-"$repo/target/release/stylefarm"}
img="$repo/../shared/data/images"
sizes=${1:-2048,4096,8192}
tmp=${KEEP:-$(mktemp -d)}
mkdir -p "$tmp"
trap 'kill $(jobs -p) 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$tmp"' EXIT

for size in ${sizes//,/ }; do
    dir="$tmp/$size"
    rm -rf "$dir" && mkdir -p "$dir"
    "$bin" coordinator --listen 127.0.0.1:0 --data-dir "$dir/data" >"$dir/coord.out" 2>"$dir/coord.log" &
    coord=$!
    until grep -q listening "$dir/coord.out"; do sleep 0.1; done
    url="http://$(sed 's/listening on //' "$dir/coord.out")"
    "$bin" worker --coordinator "$url" --device cpu --name w1 --threads "$(nproc)" 2>"$dir/worker.log" &
    worker=$!
    until grep -q registered "$dir/worker.log"; do sleep 0.1; done
    start=$(date +%s.%N)
    STYLEFARM_COORDINATOR=$url "$bin" submit --content "$img/tubingen.jpg" --style "$img/starry_night.jpg" \
        --tiled --size "$size" --tile-size 512 --overlap 128 --iterations 1 \
        --wait -o "$dir/out.png" >/dev/null 2>"$dir/submit.err" || { cat "$dir/submit.err"; exit 1; }
    wall=$(echo "$(date +%s.%N) - $start" | bc)
    kill "$worker" "$coord" 2>/dev/null || true
    wait "$worker" "$coord" 2>/dev/null || true
    echo "$size $wall" >>"$tmp/walls"
    python3 - "$dir/worker.log" "$size" "$wall" <<'EOF'
import datetime, re, statistics, sys
log, size, wall = sys.argv[1], sys.argv[2], float(sys.argv[3])
ansi = re.compile(r"\x1b\[[0-9;]*m")
tasks = {}  # (job, task) -> fields
for line in open(log):
    line = ansi.sub("", line)
    key = re.search(r"job_id=(\S+?)[ }].*?task_id=(\d+)", line)
    if not key:
        continue
    t = tasks.setdefault(key.groups(), {})
    at = re.match(r"(\S+?)Z ", line)
    for event in ("inputs ready", "rendered"):
        if at and re.search(r": " + event + r"( |$)", line):
            t[event] = datetime.datetime.fromisoformat(at.group(1)).timestamp()
    for name in ("engine_s", "task_s", "downloaded"):
        m = re.search(name + r"=([0-9.e+-]+)", line)
        if m:
            t[name] = float(m.group(1))
    m = re.search(r"result uploaded.*?bytes=(\d+)|bytes=(\d+).*?result uploaded", line)
    if m:
        t["uploaded"] = float(m.group(1) or m.group(2))
    m = re.search(r"label=\"?scale (\d+)/(\d+)", line)
    if m:
        t["scale"] = int(m.group(1))
done = [t for t in tasks.values() if "engine_s" in t and "task_s" in t]
tiles = [t for t in done if t.get("scale", 1) > 1]
over = sorted(t["task_s"] - t["engine_s"] for t in tiles)
down = [t.get("downloaded", 0) for t in tiles]
up = [t.get("uploaded", 0) for t in tiles]
eng = [t["engine_s"] for t in tiles]
# the engine idle from one tile's end to the next tile's start, within a scale
starts = sorted(((t["inputs ready"], t) for t in tiles if "inputs ready" in t and "rendered" in t),
                key=lambda s: s[0])
idle = [b[0] - a[1]["rendered"] for a, b in zip(starts, starts[1:]) if a[1].get("scale") == b[1].get("scale")]
q = lambda xs, p: sorted(xs)[min(len(xs) - 1, int(p * len(xs)))]
print(f"| {size} | {len(done)} ({len(tiles)} tiles) | {wall:.0f} s | {statistics.median(over)*1000:.1f} ms "
      f"| {q(over, 0.9)*1000:.1f} ms | {max(over)*1000:.0f} ms | {statistics.mean(over)*1000:.1f} ms "
      f"| {statistics.median(down)/1e3:.0f} kB | {statistics.mean(down)/1e3:.0f} kB | {max(down)/1e6:.1f} MB "
      f"| {statistics.median(up)/1e3:.0f} kB | {statistics.median(eng):.2f} s "
      f"| {statistics.median(idle)*1000:.1f} ms | {max(idle)*1000:.0f} ms |")
EOF
done
