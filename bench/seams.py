"""Seam measure of a tiled render, computed independently of the Rust code (numpy + Pillow).

Issue 4's definition: the mean absolute pixel gradient in a band of +-2 px around each tile edge line, divided by
the mean absolute gradient of the whole image. The tile grid is rebuilt here from its description in
ALGORITHM.md and core/src/tiling.rs's docs: along an axis of length L, tiles of extent min(T, L); the fewest
tiles n with evenly spread starts floor(i * (L - T) / (n - 1)) so that neighbours overlap by >= O; the last one
ends at L. Edge lines: every tile start but the first and every tile end but the last.
The gradient of a pixel: |I(x+1,y) - I(x,y)| + |I(x,y+1) - I(x,y)|, averaged over RGB, on the pixels that have
both neighbours; a pixel is in the band when some edge line l has l - 2 <= x < l + 2 (or the same for y).

    .stylefarm/venv/bin/python bench/seams.py IMAGE --tile-size 512 --overlap 128
"""

import argparse

import numpy as np
from PIL import Image


def starts(length, tile, overlap):
    if length <= tile:
        return [0], length
    n = -(-(length - overlap) // (tile - overlap))
    return [i * (length - tile) // (n - 1) for i in range(n)], tile


def edge_lines(length, tile, overlap):
    s, extent = starts(length, tile, overlap)
    lines = set(s[1:]) | {x + extent for x in s[:-1]}
    return sorted(lines)


def band_mask(n, lines, half=2):
    p = np.arange(n)
    mask = np.zeros(n, dtype=bool)
    for l in lines:
        mask |= (p >= l - half) & (p < l + half)
    return mask


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("image")
    ap.add_argument("--tile-size", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=128)
    a = ap.parse_args()
    img = np.asarray(Image.open(a.image).convert("RGB"), dtype=np.float64)
    h, w, _ = img.shape
    gx = np.abs(img[:-1, 1:] - img[:-1, :-1])
    gy = np.abs(img[1:, :-1] - img[:-1, :-1])
    g = (gx + gy).mean(axis=2)  # (h-1) x (w-1)
    cols = band_mask(w - 1, edge_lines(w, a.tile_size, a.overlap))
    rows = band_mask(h - 1, edge_lines(h, a.tile_size, a.overlap))
    band = cols[None, :] | rows[:, None]
    measure = g[band].mean() / g.mean()
    print(f"{a.image}: {w}x{h}, band pixels {band.sum()}, seam measure {measure:.4f}")


if __name__ == "__main__":
    main()
