#!/usr/bin/env bash
# L-BFGS on an NVIDIA GPU against torch.optim.LBFGS, on images already at the working size (so that neither
# program resamples): iteration-0 objective (exactness, TF32 convolutions in both), total loss along the
# trajectory, ms per iteration with history 100 and 5. Uses the kit of bench/gpu-kit.sh; on the GPU machine,
# from the repository root:
#
#   bash bench/gpu-lbfgs.sh
set -u
kit=${KIT:-bench/gpu-kit}
out=${OUT:-$(mktemp -d)}
torch_lib=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
w=$(mktemp -d)
gunzip -c "$kit/vgg19-fp16.safetensors.gz" > "$w/w16.safetensors"
python3 bench/safetensors_cast.py "$w/w16.safetensors" "$w/vgg19.safetensors" f32
for h in 100 5; do
    LD_LIBRARY_PATH="$torch_lib" LD_PRELOAD="$torch_lib/libtorch_cuda.so" STYLEFARM_WEIGHTS="$w/vgg19.safetensors" \
        "$kit/stylefarm" render --device cuda --content "$kit/tub512.png" --style "$kit/starry512.png" \
        --size 512 --iterations 500 --history-size "$h" --progress json -o "$w/o$h.png" \
        > "$out/sf-h$h.jsonl" 2> "$out/sf-h$h.err"
done
python3 "$kit/gatys_torch.py" --content "$kit/tub512.png" --style "$kit/starry512.png" --size 512 \
    --iterations 500 --weights "$w/vgg19.safetensors" --device cuda > "$out/pt.jsonl" 2> "$out/pt.err"
OUT="$out" python3 - <<'PY'
import json, os, statistics
o = os.environ["OUT"]
def rd(n): return [json.loads(l) for l in open(os.path.join(o, n)) if l.startswith("{")]
def ms(r):
    t = [x["elapsed_s"] for x in r]; d = [b - a for a, b in zip(t[2:], t[3:])]
    return 1000 * statistics.median(d)
pt = rd("pt.jsonl")
for n in ["sf-h100.jsonl", "sf-h5.jsonl"]:
    s = rd(n)
    print(n, "ms/it", round(ms(s), 2), "first_eval_s", round(s[0]["elapsed_s"], 2), "last_s", round(s[-1]["elapsed_s"], 2))
    for k in ["content_loss", "style_loss", "tv_loss", "total_loss"]:
        a, b = s[0][k], pt[0][k]
        print("  it0", k, a, b, "rel", abs(a - b) / max(abs(b), 1e-30))
    for i in [10, 50, 100, 500]:
        print("  it", i, "total", s[i]["total_loss"], pt[i]["total_loss"], "ratio", s[i]["total_loss"] / pt[i]["total_loss"])
print("pytorch ms/it", round(ms(pt), 2), "first_eval_s", round(pt[0]["elapsed_s"], 2))
PY
