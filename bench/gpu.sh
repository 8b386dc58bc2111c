#!/usr/bin/env bash
# The farm on an NVIDIA GPU (issue 10's table), with the kit bench/gpu-kit.sh prepares, on a machine whose
# python3 has torch 2.11 with CUDA (its libraries serve the CPU-built stylefarm: LD_LIBRARY_PATH and
# LD_PRELOAD of libtorch_cuda.so). Prints, side by side in one run on tubingen.jpg x starry_night.jpg:
#   - ms per iteration at 512 px, L-BFGS and Adam: stylefarm render against bench/gatys_torch.py (PyTorch
#     eager, the same objective) on the same GPU, medians after two warm-up iterations;
#   - `render` wall time for 500 L-BFGS iterations at 512 px, start-up included;
#   - the tiled job `local --workers 1 --tiled --size $TILED_SIZE`: wall time, GPU utilization and memory
#     (nvidia-smi, every 200 ms), and per task `task_s - engine_s` from the worker's log.
#
#   bash bench/gpu.sh                       # on the GPU machine, from the repository root
#   PARTS=tiled bash bench/gpu.sh           # only the tiled job (PARTS: engine, tiled)
#   DEVICE=cpu SIZE=64 ITERATIONS=6 TILED_SIZE=600 TILED_ITERATIONS=2,1 bash bench/gpu.sh   # a dry run
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
kit=${KIT:-$repo/bench/gpu-kit}
out=${OUT:-$(mktemp -d)}
device=${DEVICE:-cuda}
size=${SIZE:-512}
iterations=${ITERATIONS:-500}
tiled_size=${TILED_SIZE:-4096}
tiled_iterations=${TILED_ITERATIONS:-}
tiled_timeout=${TILED_TIMEOUT:-300}
py=${PYTHON:-python3}
mkdir -p "$out"

if [ "$device" != cpu ]; then
    torch_lib=$("$py" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
    export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export LD_PRELOAD="$torch_lib/libtorch_cuda.so"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
sf="$kit/stylefarm"
[ -x "$sf" ] || sf="$repo/target/release/stylefarm"
weights="$out/vgg19.safetensors"
# float16 (conv5_2..5_4 zeroed) -> float32, for both implementations
gunzip -c "$kit/vgg19-fp16.safetensors.gz" > "$out/vgg19-fp16.safetensors"
"$py" "$repo/bench/safetensors_cast.py" "$out/vgg19-fp16.safetensors" "$weights" f32
content="$kit/tubingen.jpg"
style="$kit/starry_night.jpg"
export STYLEFARM_WEIGHTS="$weights" STYLEFARM_DEVICE="$device"

# median ms per iteration of JSON progress lines (elapsed_s), the first two evaluations dropped
ms_per_iteration() {
    "$py" -c '
import json, statistics, sys
t = [json.loads(l)["elapsed_s"] for l in open(sys.argv[1]) if l.startswith("{")]
d = [b - a for a, b in zip(t[2:], t[3:])]
print(f"{1000 * statistics.median(d):.2f}" if d else "n/a")' "$1"
}

row() { printf '| %s | %s | %s |\n' "$1" "$2" "$3"; }

echo "| work | stylefarm | PyTorch eager (bench/gatys_torch.py) |"
echo "| --- | --- | --- |"
parts=" ${PARTS:-engine tiled} "
[[ $parts == *" engine "* ]] && for opt in lbfgs adam; do
    t0=$(date +%s.%N)
    "$sf" render --content "$content" --style "$style" --size "$size" --iterations "$iterations" \
        --optimizer "$opt" --progress json -o "$out/render-$opt.png" > "$out/sf-$opt.jsonl" 2> "$out/sf-$opt.err"
    rc=$?
    wall=$("$py" -c "print($(date +%s.%N) - $t0)")
    if "$py" -c 'import PIL' 2>/dev/null; then
        "$py" "$kit/gatys_torch.py" --content "$content" --style "$style" --size "$size" \
            --iterations "$iterations" --optimizer "$opt" --weights "$weights" --device "$device" \
            > "$out/pt-$opt.jsonl" 2> "$out/pt-$opt.err"
        pt=$(ms_per_iteration "$out/pt-$opt.jsonl")
    else
        pt="not run (no PIL in $py)"
    fi
    row "$opt, $iterations iterations at $size px: ms per iteration" \
        "$(ms_per_iteration "$out/sf-$opt.jsonl") (exit $rc)" "$pt"
    row "$opt: \`render\` wall time, start-up included" "$(printf '%.1f' "$wall") s" ""
done

# the tiled job, GPU sampled meanwhile
[[ $parts == *" tiled "* ]] || exit 0
if [ "$device" != cpu ]; then
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 200 \
        > "$out/smi.csv" 2>/dev/null &
    smi=$!
fi
t0=$(date +%s.%N)
STYLEFARM_LOG=info timeout "$tiled_timeout" "$sf" local --workers 1 --tiled --size "$tiled_size" \
    ${tiled_iterations:+--scale-iterations "$tiled_iterations"} \
    --content "$content" --style "$style" -o "$out/tiled.png" > "$out/tiled.out" 2> "$out/tiled.err"
rc=$?
wall=$("$py" -c "print($(date +%s.%N) - $t0)")
[ -n "${smi:-}" ] && kill "$smi" 2>/dev/null
row "\`local --tiled --size $tiled_size\` on 1 worker: wall time" "$(printf '%.1f' "$wall") s (exit $rc)" ""
"$py" - "$out/tiled.err" "$out/smi.csv" <<'PY'
import re, statistics, sys
log = open(sys.argv[1], errors="replace").read()
ansi = re.compile(r"\x1b\[[0-9;]*m")
log = ansi.sub("", log)
engine = [float(x) for x in re.findall(r"engine_s=([0-9.]+)", log)]
task = [float(x) for x in re.findall(r"task_s=([0-9.]+)", log)]
over = [t - e for t, e in zip(task, engine)]
if over:
    print(f"| tiled: per task task_s - engine_s (median, max; {len(over)} tasks) | "
          f"{statistics.median(over):.3f} s, {max(over):.3f} s | |")
try:
    rows = [tuple(map(float, l.split(","))) for l in open(sys.argv[2]) if l.strip()]
except (OSError, ValueError):
    rows = []
if rows:
    util = [u for u, _ in rows]
    print(f"| tiled: GPU utilization (mean over the run), memory in use (peak) | "
          f"{statistics.mean(util):.0f} %, {max(m for _, m in rows) / 1024:.1f} GiB | |")
PY
echo "(outputs in $out)"
