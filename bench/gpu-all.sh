#!/usr/bin/env bash
# Issue 10's GPU figures in one call of a lent GPU machine (its time is short: about 15 minutes in all,
# start-up included), with the kit of bench/gpu-kit.sh: bench/gpu.sh's engine and tiled parts, then
# bench/gpu-lbfgs.sh, then gpu.sh's memory part, each under a time limit so that the whole stays under
# 10 minutes and what finished still comes back. The tables go to $OUT (what the device tool returns, at
# most 8 files), with the logs in one $OUT/logs.tar.gz; bulky outputs (images, weights) stay in /tmp/gpuwork.
#
#   bash bench/gpu-kit.sh                                        # here, first
#   bash bench/gpu-all.sh                                        # there, from the repository root
#   (device tool: carry bench/gpu-kit, timeout 600 s)
set -u
res=${OUT:-/tmp/gpu-results}
work=/tmp/gpuwork
mkdir -p "$res" "$work/logs"
# the whole from here: the device tool's 600 s count the probes too
t0=$(date +%s)
nvidia-smi > "$work/logs/nvidia-smi.txt" 2>&1
python3 -c 'import torch, PIL; print(torch.__version__, torch.cuda.get_device_name(0))' \
    > "$work/logs/env.txt" 2>&1
# a stage's leftovers (a job past its stage's limit) must not run into the next stage's figures
stage() {
    pkill -f 'gpu-kit/stylefarm|gatys_torch.py|nvidia-smi --query-gpu' 2>/dev/null && sleep 2
    echo "== $1 at $(($(date +%s) - t0)) s" | tee -a "$work/logs/stages.txt"
}
stage "engine and tiled"
OUT=$work/main TILED_TIMEOUT=${TILED_TIMEOUT:-125} PARTS="engine tiled" timeout -k 5 320 bash bench/gpu.sh \
    > "$res/gpu-main.md" 2> "$work/logs/gpu-main.err"
stage lbfgs
OUT=$work/lbfgs timeout -k 5 75 bash bench/gpu-lbfgs.sh > "$res/gpu-lbfgs.txt" 2> "$work/logs/gpu-lbfgs.err"
stage memory
# what is left of 570 s (the device tool's 600, less the logs' packing), at least a minute
left=$((570 - ($(date +%s) - t0)))
OUT=$work/mem TILED_TIMEOUT=${MEMORY_TIMEOUT:-45} PARTS=memory timeout -k 5 $((left > 60 ? left : 60)) \
    bash bench/gpu.sh > "$res/gpu-memory.md" 2> "$work/logs/gpu-memory.err"
stage done
for d in main lbfgs mem; do
    mkdir -p "$work/logs/$d"
    find "$work/$d" -maxdepth 1 -type f -size -3M \
        \( -name '*.err' -o -name '*.out' -o -name '*.jsonl' -o -name '*.csv' \) \
        -exec cp {} "$work/logs/$d/" \;
done
tar -czf "$res/logs.tar.gz" -C "$work" logs
cat "$work/logs/stages.txt" "$res/gpu-main.md" "$res/gpu-lbfgs.txt" "$res/gpu-memory.md"
