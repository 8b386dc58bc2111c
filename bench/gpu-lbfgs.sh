#!/usr/bin/env bash
# L-BFGS on an NVIDIA GPU against torch.optim.LBFGS, on images already at the working size (so that neither
# program resamples): iteration-0 objective (exactness, TF32 convolutions in both, then float32 in both),
# total loss along the trajectory, ms per iteration with history 100 and 5. Uses the kit of
# bench/gpu-kit.sh; on the GPU machine, from the repository root:
#
#   bash bench/gpu-lbfgs.sh
set -u
kit=${KIT:-bench/gpu-kit}
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
torch_lib=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
w=$(mktemp -d)
gunzip -c "$kit/vgg19-fp16.safetensors.gz" > "$w/w16.safetensors"
python3 bench/safetensors_cast.py "$w/w16.safetensors" "$w/vgg19.safetensors" f32
for h in 100 5; do
    LD_LIBRARY_PATH="$torch_lib" LD_PRELOAD="$torch_lib/libtorch_cuda.so" \
        STYLEFARM_WEIGHTS="$w/vgg19.safetensors" \
        "$kit/stylefarm" render --device cuda --content "$kit/tub512.png" --style "$kit/starry512.png" \
        --size 512 --iterations 500 --history-size "$h" --progress json -o "$w/o$h.png" \
        > "$out/sf-h$h.jsonl" 2> "$out/sf-h$h.err"
done
# float32 convolutions in both (--tf32 false): the iteration-0 objective without TF32's rounding
LD_LIBRARY_PATH="$torch_lib" LD_PRELOAD="$torch_lib/libtorch_cuda.so" \
    STYLEFARM_WEIGHTS="$w/vgg19.safetensors" "$kit/stylefarm" render --device cuda \
    --content "$kit/tub512.png" --style "$kit/starry512.png" \
    --size 512 --iterations 50 --tf32 false --progress json -o "$w/o32.png" \
    > "$out/sf-fp32.jsonl" 2> "$out/sf-fp32.err"
for tf32 in true false; do
    python3 "$kit/gatys_torch.py" --content "$kit/tub512.png" --style "$kit/starry512.png" --size 512 \
        --iterations $([ $tf32 = true ] && echo 500 || echo 50) --tf32 $tf32 \
        --weights "$w/vgg19.safetensors" --device cuda \
        > "$out/pt-tf32-$tf32.jsonl" 2> "$out/pt-tf32-$tf32.err"
done
OUT="$out" python3 - <<'PY'
import json, os, statistics
o = os.environ["OUT"]
def rd(n): return [json.loads(l) for l in open(os.path.join(o, n)) if l.startswith("{")]
def ms(r):
    if len(r) < 13:
        return float("nan")
    # spans of 10 evaluations: on a GPU stylefarm reads its losses 10 evaluations at a time
    t = [x["elapsed_s"] for x in r]; d = [(t[i + 10] - t[i]) / 10 for i in range(2, len(t) - 10)]
    return 1000 * statistics.median(d)
for n, p in [("sf-h100.jsonl", "pt-tf32-true.jsonl"), ("sf-h5.jsonl", "pt-tf32-true.jsonl"),
             ("sf-fp32.jsonl", "pt-tf32-false.jsonl")]:
    s, pt = rd(n), rd(p)
    print(n, "against", p)
    if not s or not pt:
        print("  (no lines: see the .err files)")
        continue
    print(n, "ms/it", round(ms(s), 2), "first_report_s", round(s[0]["elapsed_s"], 2),
          "last_s", round(s[-1]["elapsed_s"], 2))
    for k in ["content_loss", "style_loss", "tv_loss", "total_loss"]:
        a, b = s[0][k], pt[0][k]
        print("  it0", k, a, b, "rel", abs(a - b) / max(abs(b), 1e-30))
    for i in [10, 50, 100, 500]:
        if i < min(len(s), len(pt)):
            print("  it", i, "total", s[i]["total_loss"], pt[i]["total_loss"], "ratio",
                  s[i]["total_loss"] / pt[i]["total_loss"])
for p in ["pt-tf32-true.jsonl", "pt-tf32-false.jsonl"]:
    pt = rd(p)
    if pt:
        print(p, "ms/it", round(ms(pt), 2), "first_eval_s", round(pt[0]["elapsed_s"], 2))
PY
