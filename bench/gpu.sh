#!/usr/bin/env bash
# The farm on an NVIDIA GPU (issue 10's table), with the kit bench/gpu-kit.sh prepares, on a machine whose
# python3 has torch 2.11 with CUDA (its libraries serve the CPU-built stylefarm: LD_LIBRARY_PATH and
# LD_PRELOAD of libtorch_cuda.so). Prints, side by side in one run on tubingen.jpg x starry_night.jpg:
#   - ms per iteration at 512 px, L-BFGS and Adam: stylefarm render against bench/gatys_torch.py (PyTorch
#     eager, the same objective) on the same GPU, twice: with PyTorch's defaults and tuned as stylefarm's
#     engine is; medians over spans of 10 iterations after the first two;
#   - `render` wall time for 500 L-BFGS iterations at 512 px, start-up included;
#   - L-BFGS and Adam again with one engine option changed from its default (VARIANTS: nchw for
#     --channels-last false and nobench for --cudnn-benchmark false by default, fp32 for --tf32 false),
#     the defaults being chosen by these figures; with cuDNN's autotuner off, the wall time too (the
#     autotuner's timing runs are part of the start-up);
#   - the tiled job `local --workers 1 --tiled --size $TILED_SIZE`, its scales planned for the GPU's memory:
#     wall time, GPU utilization and memory (nvidia-smi, every 200 ms), the plan (tile size per scale), per
#     task `task_s - engine_s` and the engine's idle time before each render (`engine_idle_s`) from the
#     worker's log; again with --cudnn-benchmark false (TILED_NOBENCH=
#     for none); and the one-pass `render --size $TILED_SIZE --scales N` with the same schedule, for the
#     ratio;
#   - peak GPU memory of short tiled jobs with fixed tiles of 512, 1024 and 2048 px (TILE_SIZES) with
#     cuDNN's autotuner off (its trial runs take a workspace as large as the free memory allows: 131 GiB
#     peaks on an H200 before, whatever the tile), then the smallest tiles with the worker held to
#     --device-memory $CAP (16GiB: the cap that lets workers share a GPU), the planned job on two workers
#     sharing the GPU (half of its memory each), and last the smallest tiles with the autotuner on.
#
#   bash bench/gpu.sh                       # on the GPU machine, from the repository root
#   PARTS=tiled bash bench/gpu.sh           # only the tiled job (PARTS: engine, tiled, memory)
#   DEVICE=cpu SIZE=64 ITERATIONS=15 TILED_SIZE=600 TILED_ITERATIONS=2,1 bash bench/gpu.sh   # a dry run
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
for f in vgg19-fp16.safetensors.gz tubingen.jpg starry_night.jpg; do
    if [ ! -f "$kit/$f" ]; then
        echo "gpu.sh: $kit/$f is missing: run bash bench/gpu-kit.sh first (here, before the GPU machine)" >&2
        exit 2
    fi
done

sf="$kit/stylefarm"
[ -x "$sf" ] || sf="$repo/target/release/stylefarm"
if [ "$device" != cpu ]; then
    torch_lib=$("$py" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
    # the machine's libtorch for stylefarm alone: exported, every date, timeout and python helper would
    # load libtorch_cuda too (a time taken with date would include that load)
    printf '#!/bin/sh\nLD_LIBRARY_PATH="%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" LD_PRELOAD="%s" exec "%s" "$@"\n' \
        "$torch_lib" "$torch_lib/libtorch_cuda.so" "$sf" > "$out/stylefarm"
    chmod +x "$out/stylefarm"
    sf="$out/stylefarm"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
# wall times from bash's clock, not a process started to read one
now() { echo "${EPOCHREALTIME:-$(date +%s.%N)}"; }
weights="$out/vgg19.safetensors"
# float16 (conv5_2..5_4 zeroed) -> float32, for both implementations
gunzip -c "$kit/vgg19-fp16.safetensors.gz" > "$out/vgg19-fp16.safetensors"
"$py" "$repo/bench/safetensors_cast.py" "$out/vgg19-fp16.safetensors" "$weights" f32
content="$kit/tubingen.jpg"
style="$kit/starry_night.jpg"
export STYLEFARM_WEIGHTS="$weights" STYLEFARM_DEVICE="$device"

# median ms per iteration of JSON progress lines (elapsed_s), over spans of 10 evaluations (on a GPU the
# engine reads the losses 10 evaluations at a time, so a line's elapsed_s is its batch's), the first two
# evaluations dropped
ms_per_iteration() {
    "$py" -c '
import json, statistics, sys
t = [json.loads(l)["elapsed_s"] for l in open(sys.argv[1]) if l.startswith("{")]
d = [(t[i + 10] - t[i]) / 10 for i in range(2, len(t) - 10)]
print(f"{1000 * statistics.median(d):.2f}" if d else "n/a")' "$1"
}

row() { printf '| %s | %s | %s |\n' "$1" "$2" "$3"; }

# where a render's wall time (WALL s) went, from its log (render's "render timed" line) and its first
# progress line: ERR JSONL WALL
phases() {
    "$py" - "$@" <<'PY'
import json, re, sys
err, jsonl, wall = sys.argv[1], sys.argv[2], float(sys.argv[3])
log = re.sub(r"\x1b\[[0-9;]*m", "", open(err, errors="replace").read())
phases = ("inputs", "load", "render", "write")
m = re.search("render timed " + " ".join(rf"{p}_s=([0-9.e-]+)" for p in phases), log)
if not m:
    print("n/a (no \"render timed\" line)")
    sys.exit()
inputs, load, render, write = map(float, m.groups())
first = [json.loads(l)["elapsed_s"] for l in open(jsonl) if l.startswith("{")][:1]
print(f"inputs {inputs:.2f} s, engine load {load:.2f} s, render {render:.2f} s"
      + (f" (first progress at {first[0]:.2f} s)" if first else "")
      + f", output {write:.2f} s; process start and exit {wall - inputs - load - render - write:.2f} s")
PY
}

# the PyTorch column twice: as PyTorch runs by default (TF32 on, NCHW, cuDNN's autotuner off, its losses read
# at each evaluation), and tuned as stylefarm's engine is on a GPU (channels-last, the autotuner on, the losses
# read every 10 evaluations in one read)
pt_tuned="--channels-last true --cudnn-benchmark true --read-every 10"
echo "| work | stylefarm | PyTorch eager (bench/gatys_torch.py): its defaults; tuned ($pt_tuned) |"
echo "| --- | --- | --- |"
parts=" ${PARTS:-engine tiled memory} "
# the engine's defaults, then each with one option changed (to choose the defaults by these figures):
# VARIANTS of nchw, fp32 and nobench (fp32's figures are in BENCHMARKS.md, and gpu-lbfgs.sh checks it)
variants=(${VARIANTS:-nchw nobench})
opts=(lbfgs adam)
[ ${#variants[@]} -gt 0 ] && opts+=("${variants[@]/#/lbfgs-}" "${variants[@]/#/adam-}")
[[ $parts == *" engine "* ]] && for opt in "${opts[@]}"; do
    case $opt in
        *-nchw) variant="--channels-last false" ;;
        *-fp32) variant="--tf32 false" ;;
        *-nobench) variant="--cudnn-benchmark false" ;;
        *-*) echo "VARIANTS: unknown variant ${opt#*-} (nchw, fp32 or nobench)" >&2; continue ;;
        *) variant= ;;
    esac
    t0=$(now)
    STYLEFARM_LOG=info "$sf" render --content "$content" --style "$style" --size "$size" \
        --iterations "$iterations" \
        --optimizer "${opt%-*}" $variant \
        --progress json -o "$out/render-$opt.png" > "$out/sf-$opt.jsonl" 2> "$out/sf-$opt.err"
    rc=$?
    wall=$("$py" -c "print($(now) - $t0)")
    if [ -n "$variant" ]; then
        row "${opt%-*} with $variant: ms per iteration" \
            "$(ms_per_iteration "$out/sf-$opt.jsonl") (exit $rc)" ""
        [[ $opt == *-nobench ]] && row "${opt%-*} with $variant: \`render\` wall time" \
            "$(printf '%.1f' "$wall") s: $(phases "$out/sf-$opt.err" "$out/sf-$opt.jsonl" "$wall")" ""
        continue
    fi
    if "$py" -c 'import PIL' 2>/dev/null; then
        pt=
        for pt_run in defaults tuned; do
            [ $pt_run = tuned ] && tuning=$pt_tuned || tuning=
            "$py" "$kit/gatys_torch.py" --content "$content" --style "$style" --size "$size" \
                --iterations "$iterations" --optimizer "$opt" --weights "$weights" --device "$device" \
                $tuning > "$out/pt-$opt-$pt_run.jsonl" 2> "$out/pt-$opt-$pt_run.err"
            pt+="${pt:+; }$(ms_per_iteration "$out/pt-$opt-$pt_run.jsonl") $pt_run"
        done
    else
        pt="not run (no PIL in $py)"
    fi
    row "$opt, $iterations iterations at $size px: ms per iteration" \
        "$(ms_per_iteration "$out/sf-$opt.jsonl") (exit $rc)" "$pt"
    row "$opt: \`render\` wall time, start-up included" \
        "$(printf '%.1f' "$wall") s: $(phases "$out/sf-$opt.err" "$out/sf-$opt.jsonl" "$wall")" ""
done

# a farm job with the GPU sampled meanwhile: NAME, then the arguments of `stylefarm local`
farm_job() {
    local name=$1
    shift
    if [ "$device" != cpu ]; then
        # timestamps in UTC, as the farm's log lines, to split the samples by scale
        TZ=UTC nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits \
            -lms 200 > "$out/smi-$name.csv" 2>/dev/null &
        smi=$!
    fi
    t0=$(now)
    STYLEFARM_LOG=info timeout -k 5 --foreground "$tiled_timeout" "$sf" local --workers "${farm_workers:-1}" \
        --content "$content" --style "$style" \
        -o "$out/$name.png" "$@" > "$out/$name.out" 2> "$out/$name.err"
    rc=$?
    wall=$("$py" -c "print($(now) - $t0)")
    [ -n "${smi:-}" ] && kill "$smi" 2>/dev/null
    "$py" - "$out/$name.err" "$out/smi-$name.csv" "$name" "$wall" "$rc" <<'PY'
import datetime, re, statistics, sys
log, smi, name, wall, rc = sys.argv[1:]
log = re.sub(r"\x1b\[[0-9;]*m", "", open(log, errors="replace").read())
print(f"| {name}: wall time | {float(wall):.1f} s (exit {rc}) | |")
plan = re.findall(r"scale stitched.*?scale=(\d+).*?next_tiles=(\d+).*?next_tile_size=(\d+)", log)
if plan:
    print(f"| {name}: plan (after scale: tiles x tile size) | "
          + ", ".join(f"{s}: {n} x {t}" for s, n, t in plan) + " | |")
mem = re.findall(r"registered.*?memory_bytes=(\d+)", log)
if mem:
    print(f"| {name}: device memory the worker reported | {int(mem[0]) / 2**30:.1f} GiB | |")
held = re.search(r"device memory held to (\S+)", log)
if held:
    print(f"| {name}: share of the GPU's memory the process is held to | {held.group(1)} | |")
# each task's "task over" with its own "rendered" (by the task's span: two workers' lines interleave, and
# a task that failed has no "rendered")
rendered, engine, over = {}, [], []
for m in re.finditer(r"(task\{[^}]*\}).*?(?:rendered engine_s=([0-9.]+)|task over task_s=([0-9.]+))", log):
    if m.group(2):
        rendered[m.group(1)] = float(m.group(2))
    elif m.group(1) in rendered:
        engine.append(rendered.pop(m.group(1)))
        over.append(float(m.group(3)) - engine[-1])
if over:
    print(f"| {name}: per task task_s - engine_s (median, max; {len(over)} tasks); engine sum | "
          f"{statistics.median(over):.3f} s, {max(over):.3f} s; {sum(engine):.1f} s | |")
# the engine's wait before each render since its previous one (a worker's first has none): the device's
# idle time between tasks (task_s - engine_s includes the report, which now runs beside the next render)
idle = [float(v) for v in re.findall(r"rendered engine_s=\S+ engine_idle_s=([0-9.e+-]+)", log)]
if idle:
    print(f"| {name}: engine idle before a render (median, max; {len(idle)} renders) | "
          f"{statistics.median(idle):.3f} s, {max(idle):.3f} s | |")
def utc(stamp, form):
    when = datetime.datetime.strptime(stamp, form)
    return when.replace(tzinfo=datetime.timezone.utc).timestamp()
rows = []
try:
    for line in open(smi):
        stamp, util, used = line.rsplit(",", 2)
        rows.append((utc(stamp.strip(), "%Y/%m/%d %H:%M:%S.%f"), float(util), float(used)))
except (OSError, ValueError):
    pass
if rows:
    util = [u for _, u, _ in rows]
    print(f"| {name}: GPU utilization (mean over the run), memory in use (peak) | "
          f"{statistics.mean(util):.0f} %, {max(m for _, _, m in rows) / 1024:.1f} GiB | |")
    # per scale: from the first lease (scale 1) or the previous scale's stitch to this scale's stitch,
    # so the process start-up and the weights' loading are left out
    stamp = r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6})\d*Z"
    leased = re.search(stamp + r".*task leased", log, re.M)
    stitched = re.findall(stamp + r".*scale stitched.*?scale=(\d+)", log, re.M)
    if leased and stitched:
        form = "%Y-%m-%dT%H:%M:%S.%f"
        start, per_scale = utc(leased.group(1), form), []
        for end_stamp, scale in stitched:
            end = utc(end_stamp, form)
            window = [u for t, u, _ in rows if start <= t <= end]
            if window:
                per_scale.append(f"{scale}: {statistics.mean(window):.0f} % over {end - start:.1f} s")
            start = end
        print(f"| {name}: GPU utilization per scale (first lease to stitch) | {', '.join(per_scale)} | |")
PY
}

if [[ $parts == *" tiled "* ]]; then
    farm_job "tiled-$tiled_size" --tiled --size "$tiled_size" \
        ${tiled_iterations:+--scale-iterations "$tiled_iterations"}
    # the one-pass render of the same pyramid and schedule (scales as the tiled job's: first <= 512 px)
    scales=1
    while [ $(( (tiled_size + (1 << (scales - 1)) - 1) >> (scales - 1) )) -gt 512 ]; do scales=$((scales + 1)); done
    t0=$(now)
    timeout -k 5 --foreground "$tiled_timeout" "$sf" render --content "$content" --style "$style" \
        --size "$tiled_size" \
        --scales "$scales" ${tiled_iterations:+--scale-iterations "$tiled_iterations"} --progress none \
        -o "$out/onepass.png" 2> "$out/onepass.err"
    rc=$?
    row "one-pass \`render --size $tiled_size --scales $scales\`: wall time" \
        "$(printf '%.1f' "$("$py" -c "print($(now) - $t0)")") s (exit $rc)" ""
    # the tiled job again with cuDNN's autotuner off: its timing runs per new shape, its workspace
    [ -n "${TILED_NOBENCH-1}" ] && farm_job "tiled-$tiled_size-nobench" --tiled --size "$tiled_size" \
        ${tiled_iterations:+--scale-iterations "$tiled_iterations"} --cudnn-benchmark false
fi
if [[ $parts == *" memory "* ]]; then
    tile_sizes=(${TILE_SIZES:-512 1024 2048})
    cap=${CAP:-16GiB}
    tiles() {
        farm_job "$1" --tiled --size "$tiled_size" --tile-size "$2" \
            --iterations "${MEMORY_ITERATIONS:-20}" "${@:3}"
    }
    # the figures still missing first: each tile size's peak with cuDNN's autotuner off (PyTorch gives its
    # trial runs a workspace as large as the free memory allows), then the smallest tiles held to $cap by
    # PyTorch's allocator (--device-memory on a GPU)
    for t in "${tile_sizes[@]}"; do
        tiles "tiles-$t-nobench" "$t" --cudnn-benchmark false
    done
    first=${tile_sizes[0]:-512}
    tiles "tiles-$first-held-$cap" "$first" --device-memory "$cap"
    # two workers sharing the GPU, each held to its half (--device-memory): a scale whose render fits a
    # half stays whole, a larger one is cut into tiles for both, whose kernels then run while the other
    # worker's host side prepares its next (the GPU utilization per scale against the one-worker job's)
    total_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
    half=$(( ${total_mib:-32768} / 2048 ))GiB
    farm_workers=2 farm_job "tiled-$tiled_size-2workers-$half" --tiled --size "$tiled_size" \
        --iterations "${MEMORY_ITERATIONS:-20}" --device-memory "$half"
    # the smallest tiles with the autotuner on, as the default runs them (known: 131 GiB before)
    tiles "tiles-$first" "$first"
fi
echo "(outputs in $out)"
