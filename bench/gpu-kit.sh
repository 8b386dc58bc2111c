#!/usr/bin/env bash
# Prepares bench/gpu-kit/ (git-ignored, at most 64 MiB) for bench/gpu.sh on a machine with an NVIDIA GPU:
# the release stylefarm, stripped (a CPU build of libtorch's API runs CUDA there against that machine's own
# PyTorch 2.11 libraries), the VGG19 weights in float16 with the convolutions no default layer reads
# (conv5_2..conv5_4) zeroed, gzipped (widened back to float32 there), and the two benchmark images.
#
#   bash bench/gpu-kit.sh        # then, on the GPU machine, from the repository root: bash bench/gpu.sh
#                                # (and bench/gpu-lbfgs.sh; or both at once, timed for a short
#                                # loan: bash bench/gpu-all.sh)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
kit=bench/gpu-kit
mkdir -p "$kit"
cargo build --release --locked -p stylefarm
strip -o "$kit/stylefarm" target/release/stylefarm
python3 bench/safetensors_cast.py .stylefarm/vgg19.safetensors "$kit/vgg19-fp16.safetensors" f16 \
    --zero conv5_2,conv5_3,conv5_4
gzip -f -9 "$kit/vgg19-fp16.safetensors"
cp ../shared/data/images/tubingen.jpg ../shared/data/images/starry_night.jpg "$kit/"
# the same, already at the working size (512 px longest side), for bench/gpu-lbfgs.sh
.stylefarm/venv/bin/python - "$kit" <<'PY'
import sys
from PIL import Image
for name, out in [("tubingen.jpg", "tub512.png"), ("starry_night.jpg", "starry512.png")]:
    img = Image.open(f"../shared/data/images/{name}").convert("RGB")
    w, h = img.size
    size = (512, round(h * 512 / w)) if w >= h else (round(w * 512 / h), 512)
    img.resize(size, Image.LANCZOS).save(f"{sys.argv[1]}/{out}")
PY
cp bench/gatys_torch.py "$kit/"
du -sh "$kit"
ls -la "$kit"
