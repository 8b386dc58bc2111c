#!/usr/bin/env bash
# Prepares bench/gpu-kit/ (git-ignored, at most 64 MiB) for bench/gpu.sh on a machine with an NVIDIA GPU:
# the release stylefarm, stripped (a CPU build of libtorch's API runs CUDA there against that machine's own
# PyTorch 2.11 libraries), the VGG19 weights in float16 with the convolutions no default layer reads
# (conv5_2..conv5_4) zeroed, gzipped (widened back to float32 there), and the two benchmark images.
#
#   bash bench/gpu-kit.sh        # then, on the GPU machine, from the repository root: bash bench/gpu.sh
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
kit=bench/gpu-kit
mkdir -p "$kit"
cargo build --release --locked -p stylefarm
strip -o "$kit/stylefarm" target/release/stylefarm
.stylefarm/venv/bin/python - .stylefarm/vgg19.safetensors "$kit/vgg19-fp16.safetensors" <<'PY'
import json, struct, sys
import numpy as np
src, dst = sys.argv[1:]
with open(src, "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))
    data = f.read()
meta = header.pop("__metadata__", {})
out, blobs, at = {"__metadata__": meta}, [], 0
for name in sorted(header):
    info = header[name]
    a, b = info["data_offsets"]
    x = np.frombuffer(data[a:b], dtype="<f4").astype("<f2")
    if name.split(".")[0] in ("conv5_2", "conv5_3", "conv5_4"):
        x = np.zeros_like(x)
    blob = x.tobytes()
    out[name] = {"dtype": "F16", "shape": info["shape"], "data_offsets": [at, at + len(blob)]}
    blobs.append(blob)
    at += len(blob)
head = json.dumps(out).encode()
head += b" " * (-len(head) % 8)
with open(dst, "wb") as f:
    f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))
PY
gzip -f -9 "$kit/vgg19-fp16.safetensors"
cp ../shared/data/images/tubingen.jpg ../shared/data/images/starry_night.jpg "$kit/"
cp bench/gatys_torch.py "$kit/"
du -sh "$kit"
ls -la "$kit"
