#!/usr/bin/env bash
# Real-engine batch through the farm on this machine: a 4 contents x 2 styles batch of 128-px, 50-iteration
# L-BFGS tasks, rendered (a) by `stylefarm render` processes one after another (which also gives the engine's
# own time per render), (b) through a coordinator and 1 worker process, (c) through a coordinator and 2 worker
# processes. Prints the wall time of each, the farm's time beyond the engine's per task, and the speed-up of
# 2 workers over 1 (each worker process gets its share of the cores with --threads).
#   bash bench/farm_batch.sh            (needs ../shared/data and a release build)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin="$repo/target/release/stylefarm"
img="$repo/../shared/data/images"
contents=("$img/tubingen.jpg" "$img/chelsea.png" "$img/coffee.png" "$img/astronaut.png")
styles=("$img/starry_night.jpg" "$img/the_scream.jpg")
opts=(--size 128 --iterations 50 --device cpu)
tmp=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$tmp"' EXIT

now() { date +%s.%N; }
start=$(now)
engine=0
for c in "${contents[@]}"; do for s in "${styles[@]}"; do
    # the engine's own time for the render: elapsed_s of its last progress line (no process start, no loading)
    t=$("$bin" render --content "$c" --style "$s" "${opts[@]}" --progress json -o "$tmp/direct.png" 2>/dev/null \
        | tail -1 | sed 's/.*"elapsed_s":\([0-9.e+-]*\).*/\1/')
    engine=$(echo "$engine + $t" | bc -l)
done; done
direct=$(echo "$(now) - $start" | bc)
echo "direct: 8 'stylefarm render' processes one after another: ${direct} s, of which engine time ${engine} s"

for workers in 1 2; do
    "$bin" coordinator --listen 127.0.0.1:0 --data-dir "$tmp/data$workers" >"$tmp/coord$workers.out" 2>/dev/null &
    until grep -q listening "$tmp/coord$workers.out"; do sleep 0.1; done
    url="http://$(sed 's/listening on //' "$tmp/coord$workers.out")"
    for w in $(seq "$workers"); do
        # each worker process gets its share of the cores: with libtorch's default (a thread per core each)
        # 2 workers on 2 cores oversubscribe and run slower than 1
        STYLEFARM_DEVICE=cpu "$bin" worker --coordinator "$url" --name "w$w" --threads $(( $(nproc) / workers )) \
            2>"$tmp/w$workers-$w.log" &
    done
    until [ "$(grep -l registered "$tmp"/w$workers-*.log 2>/dev/null | wc -l)" -ge "$workers" ]; do sleep 0.1; done
    args=()
    for c in "${contents[@]}"; do args+=(--content "$c"); done
    for s in "${styles[@]}"; do args+=(--style "$s"); done
    start=$(now)
    "$bin" submit --coordinator "$url" "${args[@]}" --batch --size 128 --iterations 50 \
        --wait -o "$tmp/out$workers" >/dev/null 2>&1
    farm=$(echo "$(now) - $start" | bc)
    echo "farm, $workers worker process(es): ${farm} s"
    if [ "$workers" = 1 ]; then
        farm1=$farm
        # the same run's own engine time: the worker logs each task's time on its engine thread (engine_s, style
        # targets included) and from lease to reported (task_s); the job's wall time beyond the engine's is
        # everything the farm adds (upload, submit, leases, downloads, result uploads, the job's completion)
        in_farm=$(grep -ho 'engine_s=[0-9.]*' "$tmp/w1-1.log" | cut -d= -f2 | paste -sd+ | bc)
        task=$(grep -ho 'task_s=[0-9.]*' "$tmp/w1-1.log" | cut -d= -f2 | paste -sd+ | bc)
        echo "  in the farm: engine ${in_farm} s, lease-to-reported ${task} s over 8 tasks;" \
            "wall beyond the engine per task: $(echo "($farm - $in_farm) / 8" | bc -l | cut -c1-6) s =" \
            "$(echo "100 * ($farm - $in_farm) / $in_farm" | bc -l | cut -c1-5) % of the engine's time"
        echo "  farm time beyond the engine's, per task: $(echo "($farm - $engine) / 8" | bc -l | cut -c1-6) s," \
            "of a $(echo "$engine / 8" | bc -l | cut -c1-5) s task: $(echo "100 * ($farm - $engine) / $engine" | bc -l | cut -c1-5) %"
    else
        echo "  speed-up over 1 worker: $(echo "$farm1 / $farm" | bc -l | cut -c1-5)x"
    fi
    kill $(jobs -p) 2>/dev/null || true
    wait 2>/dev/null || true
done
