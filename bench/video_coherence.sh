#!/usr/bin/env bash
# Temporal coherence of video jobs on two synthetic clips made from tubingen.jpg (../shared/data):
#   square: a static camera, a red square moving across the frame;
#   pan:    the camera pans right by PAN px a frame (default size / 32), nothing else moving.
# Each clip is rendered three ways through `stylefarm local`: --batch (each frame alone, from its content,
# ITERATIONS each); --video --optical-flow false (frames compared in place); --video (the default: the
# previous result warped along the optical flow). For each, between consecutive output frames moved by the
# clip's true motion (none for the square clip's background, PAN px for the pan), the mean absolute
# difference (0..255, over channels) where the moved content matches (flicker: lower is steadier), and where
# it does not (the square's old and new places; the pan's entering strip has no previous pixel).
#   bash bench/video_coherence.sh [SIZE] [ITERATIONS] [FRAMES]      defaults 128 100 8
# Needs a release build (cargo build --release) and the tools venv's Pillow and numpy (.stylefarm/venv, made
# by deploy/setup.sh; PYTHON=... for another). KEEP=DIR keeps the frames there.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin="$repo/target/release/stylefarm"
img="$repo/../shared/data/images"
py=${PYTHON:-$repo/.stylefarm/venv/bin/python}
size=${1:-128} iterations=${2:-100} frames=${3:-8}
pan=${PAN:-$(( size / 32 > 0 ? size / 32 : 1 ))}
tmp=${KEEP:-$(mktemp -d)}
mkdir -p "$tmp/square/frames" "$tmp/pan/frames"
trap '[ -n "${KEEP:-}" ] || rm -rf "$tmp"' EXIT

"$py" - "$img/tubingen.jpg" "$tmp" "$size" "$frames" "$pan" <<'PY'
import sys
from PIL import Image, ImageDraw
src, out, size, frames, pan = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
photo = Image.open(src).convert("RGB")
base = photo.resize((size, round(size * photo.height / photo.width)))
side = max(4, size // 6)
for i in range(frames):
    im = base.copy()
    x = (i * (size - side)) // max(1, frames - 1)
    ImageDraw.Draw(im).rectangle([x, im.height // 2 - side // 2, x + side, im.height // 2 + side // 2],
                                 fill=(200, 30, 30))
    im.save(f"{out}/square/frames/{i:05d}.png")
# the pan: windows of a wider copy, each PAN px right of the one before
wide = photo.resize((size + pan * (frames - 1), base.height))
for i in range(frames):
    wide.crop((i * pan, 0, i * pan + size, base.height)).save(f"{out}/pan/frames/{i:05d}.png")
PY

run() {  # clip, name, flags...
    local clip=$1 name=$2; shift 2
    local start; start=$(date +%s.%N)
    "$bin" local --workers 1 --device cpu --content "$tmp/$clip/frames" --style "$img/starry_night.jpg" \
        --size "$size" --iterations "$iterations" "$@" -o "$tmp/$clip/$name" >/dev/null \
        2>"$tmp/$clip/$name.log" || { cat "$tmp/$clip/$name.log"; exit 1; }
    echo "$clip/$name $(echo "$(date +%s.%N) - $start" | bc)" >>"$tmp/walls"
}
for clip in square pan; do
    run "$clip" batch --batch
    run "$clip" in-place --video --optical-flow false
    run "$clip" flow --video
done

"$py" - "$tmp" "$frames" "$pan" <<'PY'
import glob, sys
import numpy as np
from PIL import Image
tmp, frames, pan = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
walls = dict(line.split() for line in open(f"{tmp}/walls"))
load = lambda p: np.asarray(Image.open(p).convert("RGB")).astype(float)
def outputs(clip, name):
    if name == "batch":  # NNN_<frame>_x_<style>.png, in content order
        return [load(p) for p in sorted(glob.glob(f"{tmp}/{clip}/batch/*.png"))]
    return [load(f"{tmp}/{clip}/{name}/frame-{i + 1:05d}.png") for i in range(frames)]
def moved(clip, a, b):  # frame b's pixels and frame a's at the same scene point, by the true motion
    return (a[:, pan:], b[:, :-pan]) if clip == "pan" else (a, b)
print("| clip | frames | flicker: mean abs difference to the previous output frame, moved "
      "| where the content changed | wall |")
print("| --- | --- | --- | --- | --- |")
for clip in ["square", "pan"]:
    content = [load(f"{tmp}/{clip}/frames/{i:05d}.png") for i in range(frames)]
    for name, label in [("batch", "`--batch` (each frame alone)"),
                        ("in-place", "`--video --optical-flow false`"),
                        ("flow", "`--video` (optical flow)")]:
        out = outputs(clip, name)
        still, changed = [], []
        for i in range(1, frames):
            before, now = moved(clip, content[i - 1], content[i])
            same = np.abs(now - before).max(axis=2) <= 12
            a, b = moved(clip, out[i - 1], out[i])
            d = np.abs(b - a).mean(axis=2)
            still.append(d[same].mean())
            if (~same).any():
                changed.append(d[~same].mean())
        changed = f"{np.median(changed):.2f}" if changed else "-"
        print(f"| {clip} | {label} | {np.median(still):.2f} (median of {frames - 1}; max {max(still):.2f}) "
              f"| {changed} | {float(walls[f'{clip}/{name}']):.0f} s |")
PY
