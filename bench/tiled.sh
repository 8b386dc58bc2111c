#!/usr/bin/env bash
# A tiled render through a coordinator and N worker processes on this machine (tubingen x starry_night from
# ../shared/data): wall time, peak RSS (VmHWM) of the coordinator and of each worker, the seam measure of the
# result, the engine's time summed over the tasks. Each worker gets its share of the cores (--threads).
#   [SCALES=N] [EXACT=1] [OPTIMIZER=adam] bash bench/tiled.sh SIZE WORKERS SCALE_ITERATIONS [TILE_SIZE] \
#       [OVERLAP] [OUT.png]
#   e.g. bash bench/tiled.sh 2048 2 100,40,20          (needs a release build)
# EXACT=1 submits with --exact (one task per scale, its objective evaluated in tile-sized blocks; with
# WORKERS > 1, each exact scale is cut into shards that the workers optimize together);
# OPTIMIZER=adam|lbfgs picks the optimizer (default: the job's, L-BFGS);
# DEVICE=cuda runs the workers on the GPU (default cpu); THREADS=N gives each worker N libtorch threads
# (default: the cores shared out).
# One-pass references (the same objective untiled): `stylefarm render --size S ...` under /usr/bin/time -v.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin="$repo/target/release/stylefarm"
img="$repo/../shared/data/images"
size=$1 workers=$2 iters=$3 tile=${4:-512} overlap=${5:-128}
tmp=$(mktemp -d)
out=${6:-$tmp/out.png}
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$tmp"' EXIT

"$bin" coordinator --listen 127.0.0.1:0 --data-dir "$tmp/data" >"$tmp/coord.out" 2>"$tmp/coord.log" &
coord=$!
until grep -q listening "$tmp/coord.out"; do sleep 0.1; done
url="http://$(sed 's/listening on //' "$tmp/coord.out")"
pids=()
threads=${THREADS:-$(( $(nproc) / workers ))}
for w in $(seq "$workers"); do
    "$bin" worker --coordinator "$url" --device "${DEVICE:-cpu}" --name "w$w" --threads "$threads" \
        2>"$tmp/w$w.log" &
    pids+=($!)
done
until [ "$(grep -l registered "$tmp"/w*.log 2>/dev/null | wc -l)" -ge "$workers" ]; do sleep 0.1; done
start=$(date +%s.%N)
STYLEFARM_COORDINATOR=$url "$bin" submit --content "$img/tubingen.jpg" --style "$img/starry_night.jpg" \
    --tiled --size "$size" ${SCALES:+--scales "$SCALES"} --tile-size "$tile" --overlap "$overlap" ${EXACT:+--exact} \
    --scale-iterations "$iters" ${OPTIMIZER:+--optimizer "$OPTIMIZER"} \
    --wait -o "$out" >/dev/null 2>"$tmp/submit.err" || { cat "$tmp/submit.err"; exit 1; }
wall=$(echo "$(date +%s.%N) - $start" | bc)
hwm() { awk '/VmHWM/ {printf "%.0f", $2 / 1024}' "/proc/$1/status"; }
worker_mib=$(for p in "${pids[@]}"; do hwm "$p"; echo -n " "; done)
engine=$(grep -ho 'engine_s=[0-9.]*' "$tmp"/w*.log | cut -d= -f2 | paste -sd+ | bc)
tasks=$(grep -ho 'engine_s=' "$tmp"/w*.log | wc -l)
cached=$(grep -ho 'style_cached=true' "$tmp"/w*.log | wc -l || true)
seams=$("$bin" seams "$out" --tile-size "$tile" --overlap "$overlap" | sed 's/.*seam measure //')
# the style loss of the whole output, at its size (in 1024-px blocks past 2048 px, to bound the memory)
eval_block=$([ "$size" -gt 2048 ] && echo "--block 1024" || true)
style=$("$bin" render --content "$img/tubingen.jpg" --style "$img/starry_night.jpg" --evaluate "$out" \
    --device cpu $eval_block 2>/dev/null | grep -o '"style_loss":[0-9.e+]*' | cut -d: -f2)
stitch=$(grep -o 'seconds=[0-9.]*' "$tmp/coord.log" | cut -d= -f2 | paste -sd, -)
# each scale's wall time: from the submit (or the scale before's stitch) to its stitch, from the log's clock
scale_walls=$(grep 'scale stitched' "$tmp/coord.log" | cut -c1-27 |
    while read -r t; do date -d "$t" +%s.%N; done |
    awk -v s="$start" '{printf "%s%.1f", (NR > 1 ? "," : ""), $1 - (NR > 1 ? p : s); p = $1}')
shards=$(cat "$tmp"/w*.log | grep -c 'exact: a shard' || true)
echo "size $size, tiles $tile/$overlap${EXACT:+ exact}, iterations $iters, $workers worker(s) x $threads threads:" \
    "wall ${wall} s (per scale ${scale_walls} s); engine ${engine} s over $tasks tasks" \
    "($cached with cached style targets, $shards shards);" \
    "stitching ${stitch} s per scale; peak RSS coordinator $(hwm $coord) MiB, workers ${worker_mib}MiB;" \
    "seam measure $seams; style loss $style"
