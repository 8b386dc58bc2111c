#!/usr/bin/env python3
"""Convert VGG19 weights to the safetensors file that stylefarm's engine loads.

    convert_weights.py keras-h5 vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5 out.safetensors
    convert_weights.py torchvision-pth vgg19-dcbb9e9d.pth out.safetensors

The output holds `convB_C.weight` (out x in x 3 x 3) and `convB_C.bias` for VGG19's 16 convolutions, float32,
and records in its metadata the preprocessing convention the weights were trained with:
- `caffe` (the Keras h5 file: Oxford/Caffe weights): BGR, 0..255, minus the mean [103.939, 116.779, 123.68];
- `torchvision` (vgg19-dcbb9e9d.pth): RGB, 0..1, minus [0.485, 0.456, 0.406], divided by [0.229, 0.224, 0.225].

Needs numpy (and h5py for the h5 file); torch is not needed: the .pth reader below unpickles the zip archive
that torch.save writes into numpy arrays.
"""

import json
import pickle
import struct
import sys
import zipfile

import numpy as np

# (block, conv) of VGG19's convolutions, in order.
CONVS = [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2), (3, 3), (3, 4),
         (4, 1), (4, 2), (4, 3), (4, 4), (5, 1), (5, 2), (5, 3), (5, 4)]
# Index of each convolution in torchvision's `vgg19().features`.
TORCHVISION_INDEX = [0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34]


def from_keras_h5(path):
    import h5py

    tensors = {}
    with h5py.File(path, "r") as f:
        for b, c in CONVS:
            group = f"block{b}_conv{c}"
            kernel = np.asarray(f[f"{group}/{group}_W_1:0"], dtype=np.float32)  # h x w x in x out
            bias = np.asarray(f[f"{group}/{group}_b_1:0"], dtype=np.float32)
            tensors[f"conv{b}_{c}.weight"] = np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))
            tensors[f"conv{b}_{c}.bias"] = bias
    return tensors, "caffe"


class _TorchUnpickler(pickle.Unpickler):
    """Reads the data.pkl of a torch.save zip archive, rebuilding tensors as numpy arrays."""

    DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16}

    def __init__(self, fileobj, archive, prefix):
        super().__init__(fileobj)
        self.archive = archive
        self.prefix = prefix

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._rebuild_tensor
        if module == "torch" and name in self.DTYPES:
            return self.DTYPES[name]
        if module == "collections" and name == "OrderedDict":
            import collections

            return collections.OrderedDict
        raise pickle.UnpicklingError(f"unsupported object in checkpoint: {module}.{name}")

    def persistent_load(self, pid):
        _, dtype, key, _location, _numel = pid
        raw = self.archive.read(f"{self.prefix}/data/{key}")
        return np.frombuffer(raw, dtype=dtype)

    @staticmethod
    def _rebuild_tensor(storage, offset, size, stride, *_):
        itemsize = storage.dtype.itemsize
        return np.lib.stride_tricks.as_strided(
            storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
        ).copy()


def from_torchvision_pth(path):
    with zipfile.ZipFile(path) as archive:
        pkl = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        prefix = pkl[: -len("/data.pkl")]
        with archive.open(pkl) as f:
            state = _TorchUnpickler(f, archive, prefix).load()
    tensors = {}
    for (b, c), index in zip(CONVS, TORCHVISION_INDEX):
        for part in ("weight", "bias"):
            key = f"features.{index}.{part}"
            if key not in state:
                raise SystemExit(f"error: {path}: no tensor {key}: not a torchvision vgg19 state dict")
            tensors[f"conv{b}_{c}.{part}"] = np.ascontiguousarray(state[key], dtype=np.float32)
    return tensors, "torchvision"


def write_safetensors(path, tensors, metadata):
    header = {"__metadata__": metadata}
    offset = 0
    for name, array in tensors.items():
        size = array.nbytes
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    import os

    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(encoded)))
            f.write(encoded)
            for array in tensors.values():
                f.write(array.astype("<f4").tobytes())
        os.replace(tmp, path)
    except BaseException:
        # a write that failed (a full disk) leaves no partial file behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def main(argv):
    if len(argv) != 4 or argv[1] not in ("keras-h5", "torchvision-pth"):
        raise SystemExit(__doc__)
    kind, src, dst = argv[1:]
    tensors, convention = from_keras_h5(src) if kind == "keras-h5" else from_torchvision_pth(src)
    expected_in = 3
    for b, c in CONVS:
        w = tensors[f"conv{b}_{c}.weight"]
        if w.ndim != 4 or w.shape[1] != expected_in or w.shape[2:] != (3, 3):
            raise SystemExit(f"error: {src}: conv{b}_{c}.weight has shape {w.shape}, not VGG19's")
        expected_in = w.shape[0]
    write_safetensors(dst, tensors, {"format": "pt", "preprocessing": convention, "source": kind,
                                     "network": "vgg19"})
    print(f"wrote {dst} ({convention} preprocessing)")


if __name__ == "__main__":
    try:
        main(sys.argv)
    except Exception as e:  # noqa: BLE001 (the top level of a command)
        # one line for the caller (stylefarm weights convert), not a traceback: what could not be read
        raise SystemExit(f"error: {sys.argv[2] if len(sys.argv) > 2 else ''}: {type(e).__name__}: {e}")
