#!/usr/bin/env python3
"""Casts the tensors of a safetensors file between float32 and float16, metadata kept; pure Python (no numpy,
no torch), so it runs on any machine bench/gpu.sh is taken to.

    python3 bench/safetensors_cast.py SRC DST f16 [--zero conv5_2,conv5_3,conv5_4]
    python3 bench/safetensors_cast.py SRC DST f32

--zero writes the named tensors' values as zeros (e.g. convolutions no default layer reads: they compress).
"""
import argparse
import json
import struct

FORMATS = {"F32": ("f", 4), "F16": ("e", 2)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("to", choices=["f16", "f32"])
    p.add_argument("--zero", default="")
    a = p.parse_args()
    zero = {z for z in a.zero.split(",") if z}
    to = a.to.upper()
    with open(a.src, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out, blobs, at = {"__metadata__": header.pop("__metadata__", {})}, [], 0
    for name in sorted(header):
        info = header[name]
        start, end = info["data_offsets"]
        code, size = FORMATS[info["dtype"]]
        count = (end - start) // size
        if name.split(".")[0] in zero:
            values = [0.0] * count
        else:
            values = struct.unpack(f"<{count}{code}", data[start:end])
        blob = struct.pack(f"<{count}{FORMATS[to][0]}", *values)
        out[name] = {"dtype": to, "shape": info["shape"], "data_offsets": [at, at + len(blob)]}
        blobs.append(blob)
        at += len(blob)
    head = json.dumps(out).encode()
    head += b" " * (-len(head) % 8)
    with open(a.dst, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


if __name__ == "__main__":
    main()
