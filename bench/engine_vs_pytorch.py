#!/usr/bin/env python3
"""ms per iteration of `stylefarm render` and of the PyTorch eager script bench/gatys_torch.py, side by side.

    bash bench/pytorch-env.sh python bench/engine_vs_pytorch.py [--rounds 3] [--sizes 128,256,512]

Both run L-BFGS at ALGORITHM.md's defaults on tubingen.jpg x starry_night.jpg from ../shared/data, resized
once beforehand to the working size (so neither resamples), on the CPU with libtorch's default thread count.
Each round runs stylefarm then PyTorch, alternating, so both see the same machine state. An iteration's time
is the difference of consecutive `elapsed_s` of the JSON progress lines (an evaluation plus a step); the first
two evaluations are warm-up and dropped. Reported: the median over all kept iterations of all rounds, the ratio
stylefarm / PyTorch of those medians, and the median of the per-round ratios (paired, so slower drifts of a
shared machine cancel). Also prints the largest relative difference of the loss curves (same algorithm,
same libtorch: they should agree).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "..", "shared", "data", "images")
ITERATIONS = {128: 40, 256: 20, 384: 12, 512: 10}


def run(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def per_iteration(lines):
    t = [line["elapsed_s"] for line in lines]
    return [b - a for a, b in zip(t[2:], t[3:])]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sizes", default="128,256,512")
    a = p.parse_args()
    binary = os.path.join(REPO, "target", "release", "stylefarm")
    weights = os.path.join(REPO, ".stylefarm", "vgg19.safetensors")
    tmp = tempfile.mkdtemp()
    print("| size | iterations x rounds | stylefarm ms/it | PyTorch ms/it | ratio of medians "
          "| median of per-round ratios | max loss diff |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for size in map(int, a.sizes.split(",")):
        paths = {}
        for name in ("tubingen.jpg", "starry_night.jpg"):
            img = Image.open(os.path.join(DATA, name)).convert("RGB")
            w, h = img.size
            img = img.resize((size, round(h * size / w)), Image.LANCZOS)
            paths[name] = os.path.join(tmp, f"{size}_{name}.png")
            img.save(paths[name])
        n = ITERATIONS.get(size, 10)
        common = ["--content", paths["tubingen.jpg"], "--style", paths["starry_night.jpg"],
                  "--size", str(size), "--iterations", str(n)]
        ours, theirs, ratios, diff = [], [], [], 0.0
        for _ in range(a.rounds):
            o = run([binary, "render", *common, "--device", "cpu", "--weights", weights, "--progress", "json",
                     "--output", os.path.join(tmp, "out.png")])
            t = run([sys.executable, os.path.join(REPO, "bench", "gatys_torch.py"), *common, "--weights", weights])
            ours += per_iteration(o)
            theirs += per_iteration(t)
            ratios.append(statistics.median(per_iteration(o)) / statistics.median(per_iteration(t)))
            diff = max([diff] + [abs(x["total_loss"] - y["total_loss"]) / y["total_loss"] for x, y in zip(o, t)])
        mo, mt = statistics.median(ours) * 1000, statistics.median(theirs) * 1000
        paired = statistics.median(ratios)
        print(f"| {size} | {n} x {a.rounds} | {mo:.0f} | {mt:.0f} | {mo / mt:.3f} | {paired:.3f} | {diff:.1e} |",
              flush=True)


if __name__ == "__main__":
    main()
