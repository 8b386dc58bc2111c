#!/usr/bin/env bash
# Temporal coherence of a video job: a synthetic clip (tubingen.jpg from ../shared/data with a red square
# moving across it, a static camera) rendered three ways through `stylefarm local`, and for each, between
# consecutive output frames, the mean absolute difference (0..255, over channels) where the content did
# not change (flicker: lower is steadier) and where it did.
#   bash bench/video_coherence.sh [SIZE] [ITERATIONS] [FRAMES]      defaults 128 100 8
# The three: --batch (each frame alone, from its content, ITERATIONS each); --video with
# --temporal-weight 0 (each frame from the previous result, ITERATIONS/2 after the first); --video with the
# default temporal weight. Needs a release build (cargo build --release) and the tools venv's Pillow
# (.stylefarm/venv, made by deploy/setup.sh; PYTHON=... for another). KEEP=DIR keeps the frames there.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin="$repo/target/release/stylefarm"
img="$repo/../shared/data/images"
py=${PYTHON:-$repo/.stylefarm/venv/bin/python}
size=${1:-128} iterations=${2:-100} frames=${3:-8}
tmp=${KEEP:-$(mktemp -d)}
mkdir -p "$tmp/frames"
trap '[ -n "${KEEP:-}" ] || rm -rf "$tmp"' EXIT

"$py" - "$img/tubingen.jpg" "$tmp/frames" "$size" "$frames" <<'PY'
import sys
from PIL import Image, ImageDraw
src, out, size, frames = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
base = Image.open(src).convert("RGB")
base = base.resize((size, round(size * base.height / base.width)))
side = max(4, size // 6)
for i in range(frames):
    im = base.copy()
    x = (i * (size - side)) // max(1, frames - 1)
    ImageDraw.Draw(im).rectangle([x, im.height // 2 - side // 2, x + side, im.height // 2 + side // 2],
                                 fill=(200, 30, 30))
    im.save(f"{out}/{i:05d}.png")
PY

run() {  # name, flags...
    local name=$1; shift
    local start; start=$(date +%s.%N)
    "$bin" local --workers 1 --device cpu --content "$tmp/frames" --style "$img/starry_night.jpg" \
        --size "$size" --iterations "$iterations" "$@" -o "$tmp/$name" >/dev/null 2>"$tmp/$name.log" \
        || { cat "$tmp/$name.log"; exit 1; }
    echo "$name $(echo "$(date +%s.%N) - $start" | bc)" >>"$tmp/walls"
}
run batch --batch
run video-tw0 --video --temporal-weight 0
run video --video

"$py" - "$tmp" "$frames" <<'PY'
import sys
import numpy as np
from PIL import Image
tmp, frames = sys.argv[1], int(sys.argv[2])
walls = dict(line.split() for line in open(f"{tmp}/walls"))
load = lambda p: np.asarray(Image.open(p).convert("RGB")).astype(float)
content = [load(f"{tmp}/frames/{i:05d}.png") for i in range(frames)]
def outputs(name):
    if name == "batch":  # NNN_content_K_x_style_1.png, in content order
        import glob
        return [load(p) for p in sorted(glob.glob(f"{tmp}/batch/*.png"))]
    return [load(f"{tmp}/{name}/frame-{i + 1:05d}.png") for i in range(frames)]
print("| frames | unchanged pixels: mean abs difference to the previous output frame "
      "| changed pixels | wall |")
print("| --- | --- | --- | --- |")
for name, label in [("batch", "`--batch` (each frame alone)"),
                    ("video-tw0", "`--video --temporal-weight 0`"),
                    ("video", "`--video` (temporal weight 1000)")]:
    out = outputs(name)
    still, moved = [], []
    for i in range(1, frames):
        same = np.abs(content[i] - content[i - 1]).max(axis=2) <= 12
        d = np.abs(out[i] - out[i - 1]).mean(axis=2)
        still.append(d[same].mean())
        moved.append(d[~same].mean())
    print(f"| {label} | {np.median(still):.2f} (median of {frames - 1}; max {max(still):.2f}) "
          f"| {np.median(moved):.2f} | {float(walls[name]):.0f} s |")
PY
