#!/usr/bin/env python3
"""An independent PyTorch (eager) implementation of ../shared/design/ALGORITHM.md, for two jobs:

1. the cross-check of stylefarm's objective: the same JSON lines as `stylefarm render --progress json`
   (iteration 0 = the objective at the initial image, then after every step);
2. the benchmark's reference: the same work per iteration, timed the same way (elapsed_s per evaluation).

    bench/pytorch-env.sh python bench/gatys_torch.py --content C.png --style S.png --init I.png \\
        --size 128 --optimizer adam --learning-rate 10 --iterations 20 --tv-weight 0 --weights W.safetensors

It shares no code with the engine: its own safetensors reader, VGG19, losses; torch.optim.LBFGS / Adam.
Images must already be at the working size or are resized with PIL's Lanczos filter.
"""
import argparse
import json
import struct
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CAFFE_MEAN_BGR = [103.939, 116.779, 123.68]
BLOCKS = [2, 2, 4, 4, 4]


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    meta = header.pop("__metadata__", {})
    tensors = {}
    for name, info in header.items():
        a, b = info["data_offsets"]
        tensors[name] = torch.from_numpy(np.frombuffer(data[a:b], dtype="<f4").reshape(info["shape"]).copy())
    return tensors, meta


class VGG19:
    def __init__(self, path, device, layout):
        tensors, meta = read_safetensors(path)
        assert meta.get("preprocessing") == "caffe", meta
        self.convs = []
        for b, n in enumerate(BLOCKS, 1):
            for c in range(1, n + 1):
                self.convs.append((f"relu{b}_{c}",
                                   tensors[f"conv{b}_{c}.weight"].to(device, memory_format=layout),
                                   tensors[f"conv{b}_{c}.bias"].to(device)))
        self.pool_after = {"relu1_2", "relu2_2", "relu3_4", "relu4_4"}

    def __call__(self, x, layers, pooling):
        out, deepest = {}, max(i for i, (n, _, _) in enumerate(self.convs) if n in layers)
        for i, (name, w, b) in enumerate(self.convs[: deepest + 1]):
            x = F.relu(F.conv2d(x, w, b, padding=1))
            if name in layers:
                out[name] = x
            if name in self.pool_after and i < deepest:
                x = F.max_pool2d(x, 2) if pooling == "max" else F.avg_pool2d(x, 2)
        return out


def load(path, longest):
    img = Image.open(path).convert("RGB")
    w, h = img.size
    size = (longest, max(1, round(h * longest / w))) if w >= h else (max(1, round(w * longest / h)), longest)
    return img if img.size == size else img.resize(size, Image.LANCZOS)


def preprocess(img, device, layout=torch.contiguous_format):
    x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)[None]
    x = (x.flip(1) - torch.tensor(CAFFE_MEAN_BGR).view(1, 3, 1, 1)).to(device)
    return x.contiguous(memory_format=layout)


def gram(f):
    _, c, h, w = f.shape
    f = f.reshape(c, h * w)
    return f @ f.t() / (c * h * w)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--content", required=True)
    p.add_argument("--style", required=True)
    p.add_argument("--init", default="content")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--iterations", type=int, default=500)
    p.add_argument("--optimizer", default="lbfgs")
    p.add_argument("--learning-rate", type=float, default=10.0)
    p.add_argument("--content-weight", type=float, default=5.0)
    p.add_argument("--style-weight", type=float, default=100.0)
    p.add_argument("--tv-weight", type=float, default=1e-3)
    p.add_argument("--pooling", default="max")
    p.add_argument("--weights", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tf32", choices=["true", "false"], default="true",
                   help="torch.backends.cudnn.allow_tf32 (PyTorch's default: true), as stylefarm's --tf32")
    # PyTorch's defaults below; stylefarm's engine on a GPU has true, true and 10 (chosen by BENCHMARKS.md's
    # figures)
    p.add_argument("--channels-last", choices=["true", "false"], default="false",
                   help="image and weights in torch.channels_last (NHWC), as stylefarm's --channels-last")
    p.add_argument("--cudnn-benchmark", choices=["true", "false"], default="false",
                   help="torch.backends.cudnn.benchmark (cuDNN's autotuner), as stylefarm's "
                        "--cudnn-benchmark")
    p.add_argument("--read-every", type=int, default=1,
                   help="read the losses to the host every N evaluations, in one read (a line's elapsed_s "
                        "is then its batch's), as stylefarm on a GPU (N = 10); 1 reads them at each "
                        "evaluation")
    a = p.parse_args()
    if a.read_every < 1:
        p.error("--read-every: must be at least 1")
    torch.backends.cudnn.allow_tf32 = a.tf32 == "true"
    torch.backends.cudnn.benchmark = a.cudnn_benchmark == "true"
    layout = torch.channels_last if a.channels_last == "true" else torch.contiguous_format

    started = time.perf_counter()
    dev = torch.device(a.device)
    vgg = VGG19(a.weights, dev, layout)
    content_layers, style_layers = ["relu4_2"], ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"]
    content_img = load(a.content, a.size)
    with torch.no_grad():
        p_feats = vgg(preprocess(content_img, dev, layout), content_layers, a.pooling)
        s_feats = vgg(preprocess(load(a.style, a.size), dev, layout), style_layers, a.pooling)
        targets = {n: gram(f) for n, f in s_feats.items()}
    init = content_img if a.init == "content" else load(a.init, a.size)
    if init.size != content_img.size:
        init = init.resize(content_img.size, Image.LANCZOS)
    # the optimized image stays contiguous NCHW (torch.optim.LBFGS flattens its gradient with view(-1));
    # the network takes it in `layout`
    x = preprocess(init, dev).requires_grad_(True)

    def terms():
        feats = vgg(x.contiguous(memory_format=layout), set(content_layers + style_layers), a.pooling)
        c = sum(a.content_weight * F.mse_loss(feats[n], p_feats[n]) for n in content_layers)
        s = sum(a.style_weight * F.mse_loss(gram(feats[n]), targets[n]) for n in style_layers)
        tv = a.tv_weight * 0.5 * (((x[..., :, 1:] - x[..., :, :-1]) ** 2).sum()
                                  + ((x[..., 1:, :] - x[..., :-1, :]) ** 2).sum())
        return c, s, tv, c + s + tv

    iteration, pending = [0], []

    def flush():
        # one device-to-host read for the batch: its lines share the time of that read
        values = torch.stack(pending).tolist() if pending else []
        elapsed = time.perf_counter() - started
        pending.clear()
        for c, s, tv, total in values:
            print(json.dumps({"iteration": iteration[0], "content_loss": c, "style_loss": s,
                              "tv_loss": tv, "total_loss": total, "elapsed_s": elapsed}), flush=True)
            iteration[0] += 1

    def report(*values):
        pending.append(torch.stack([torch.as_tensor(v, dtype=torch.float32, device=dev).detach()
                                    for v in values]))
        if len(pending) >= a.read_every:
            flush()

    def closure():
        opt.zero_grad()
        c, s, tv, total = terms()
        total.backward()
        report(c, s, tv, total)
        return total

    if a.optimizer == "lbfgs":
        opt = torch.optim.LBFGS([x], lr=1, max_iter=a.iterations, history_size=100,
                                tolerance_grad=-1, tolerance_change=-1, line_search_fn=None)
        opt.step(closure)
    else:
        opt = torch.optim.Adam([x], lr=a.learning_rate)
        for _ in range(a.iterations):
            closure()
            opt.step()
    with torch.no_grad():
        report(*terms())
    flush()


if __name__ == "__main__":
    main()
