#!/usr/bin/env python3
"""The engine issue's acceptance cross-check against the independent PyTorch implementation (bench/gatys_torch.py).

    bash bench/pytorch-env.sh python bench/crosscheck.py

Images already at size 128 (tubingen.jpg 128x96 content, starry_night.jpg 128x80 style, shipwreck.jpg 128x96
init, from ../shared/data, resized once with PIL's Lanczos filter), Adam, learning rate 10, 20 iterations, TV
weight 0, --init PATH, --progress json. Passes when iteration 0's content, style and total losses agree within
1e-3 relative and iteration 20's total within 1%. Prints the figures either way; exits 1 on a failure.
"""
import json
import os
import subprocess
import sys
import tempfile

from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "..", "shared", "data", "images")


def lines(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def main():
    tmp = tempfile.mkdtemp()
    paths = {}
    for name, size in (("tubingen.jpg", (128, 96)), ("starry_night.jpg", (128, 80)), ("shipwreck.jpg", (128, 96))):
        paths[name] = os.path.join(tmp, name + ".png")
        Image.open(os.path.join(DATA, name)).convert("RGB").resize(size, Image.LANCZOS).save(paths[name])
    common = ["--content", paths["tubingen.jpg"], "--style", paths["starry_night.jpg"],
              "--init", paths["shipwreck.jpg"], "--size", "128", "--optimizer", "adam", "--learning-rate", "10",
              "--iterations", "20", "--tv-weight", "0"]
    weights = os.path.join(REPO, ".stylefarm", "vgg19.safetensors")
    ours = lines([os.path.join(REPO, "target", "release", "stylefarm"), "render", *common, "--device", "cpu",
                  "--weights", weights, "--progress", "json", "--output", os.path.join(tmp, "out.png")])
    theirs = lines([sys.executable, os.path.join(REPO, "bench", "gatys_torch.py"), *common, "--weights", weights])
    ok = True
    for it, keys, tol in ((0, ("content_loss", "style_loss", "total_loss"), 1e-3), (20, ("total_loss",), 1e-2)):
        for key in keys:
            a, b = ours[it][key], theirs[it][key]
            rel = abs(a - b) / abs(b)
            ok &= rel <= tol
            print(f"iteration {it:2} {key:12} stylefarm {a:.9g}  pytorch {b:.9g}  rel diff {rel:.2e} (<= {tol:g})")
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
