#!/usr/bin/env python3
"""ALGORITHM.md's objective, written again with numpy alone (float64), for the cross-check test.

    objective_numpy.py [--pooling max|avg|l2] WEIGHTS.safetensors CONTENT.png STYLE.png X.png CONTENT_W STYLE_W
        TV_W [LAYER_W,...]

All images must already be at the working size (no resampling here). Prints one JSON object with the weighted
terms at image X: content_loss, style_loss, tv_loss, total_loss. Max pooling (or avg, or l2: the root of a
window's sum of squares times 0.78, as torch.nn.LPPool2d(2, 2) in crowsonkb/style-transfer-pytorch), content
layer relu4_2, style layers relu1_1 .. relu5_1 with their layer weights LAYER_W (default 1 each), Caffe
preprocessing. Shares no code with the engine.
"""
import json
import struct
import sys

import numpy as np
from PIL import Image

MEAN_BGR = np.array([103.939, 116.779, 123.68])
BLOCKS = [2, 2, 4, 4, 4]
CONTENT = ["relu4_2"]
STYLE = ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"]


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    meta = header.pop("__metadata__", {})
    if meta.get("preprocessing") != "caffe":
        raise SystemExit(f"expected caffe weights, got {meta}")
    out = {}
    for name, info in header.items():
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype="<f4").reshape(info["shape"]).astype(np.float64)
    return out


def conv3x3_relu(x, w, b):
    """x: C x H x W; w: O x C x 3 x 3; padding 1, stride 1."""
    c, h, wd = x.shape
    p = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    cols = np.empty((c, 3, 3, h, wd))
    for i in range(3):
        for j in range(3):
            cols[:, i, j] = p[:, i:i + h, j:j + wd]
    y = w.reshape(w.shape[0], -1) @ cols.reshape(c * 9, h * wd) + b[:, None]
    return np.maximum(y, 0).reshape(-1, h, wd)


def pool2(x, pooling):
    """2x2 stride-2 pooling of C x H x W (an odd last row or column dropped)."""
    c, h, w = x.shape
    windows = x[:, : h // 2 * 2, : w // 2 * 2].reshape(c, h // 2, 2, w // 2, 2)
    if pooling == "max":
        return windows.max(axis=(2, 4))
    if pooling == "avg":
        return windows.mean(axis=(2, 4))
    if pooling == "l2":
        return 0.78 * np.sqrt((windows ** 2).sum(axis=(2, 4)))
    raise SystemExit(f"unknown pooling {pooling}")


def features(weights, x, wanted, pooling):
    out, names = {}, [(b, c) for b, n in enumerate(BLOCKS, 1) for c in range(1, n + 1)]
    deepest = max(i for i, (b, c) in enumerate(names) if f"relu{b}_{c}" in wanted)
    for i, (b, c) in enumerate(names[: deepest + 1]):
        x = conv3x3_relu(x, weights[f"conv{b}_{c}.weight"], weights[f"conv{b}_{c}.bias"])
        name = f"relu{b}_{c}"
        if name in wanted:
            out[name] = x
        if c == BLOCKS[b - 1] and b < 5 and i < deepest:
            x = pool2(x, pooling)
    return out


def gram(f):
    c = f.shape[0]
    f = f.reshape(c, -1)
    return f @ f.T / f.size


def preprocess(path):
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    return (rgb[:, :, ::-1] - MEAN_BGR).transpose(2, 0, 1)


def main(argv):
    pooling = "max"
    if len(argv) > 2 and argv[1] == "--pooling":
        pooling, argv = argv[2], argv[:1] + argv[3:]
    weights_path, content, style, x_path = argv[1:5]
    cw, sw, tvw = map(float, argv[5:8])
    layer_w = [float(w) for w in argv[8].split(",")] if len(argv) > 8 else [1.0] * len(STYLE)
    if len(layer_w) != len(STYLE):
        raise SystemExit(f"{len(layer_w)} layer weights for {len(STYLE)} style layers")
    weights = read_safetensors(weights_path)
    p = features(weights, preprocess(content), CONTENT, pooling)
    a = {k: gram(v) for k, v in features(weights, preprocess(style), STYLE, pooling).items()}
    x = preprocess(x_path)
    f = features(weights, x, CONTENT + STYLE, pooling)
    content_loss = sum(cw * np.mean((f[n] - p[n]) ** 2) for n in CONTENT)
    style_loss = sum(sw * w * np.mean((gram(f[n]) - a[n]) ** 2) for n, w in zip(STYLE, layer_w))
    tv = tvw * 0.5 * (np.sum((x[:, :, 1:] - x[:, :, :-1]) ** 2) + np.sum((x[:, 1:, :] - x[:, :-1, :]) ** 2))
    print(json.dumps({"content_loss": content_loss, "style_loss": style_loss, "tv_loss": tv,
                      "total_loss": content_loss + style_loss + tv}))


if __name__ == "__main__":
    main(sys.argv)
