#!/usr/bin/env bash
# Runs a command in a Python venv with PyTorch 2.11.0 (CPU use), for the benchmarks and cross-checks only
# (never CI). PyPI's torch==2.11.0 asks for nvidia-nccl-cu13==2.28.9, which the registry here lacks: the venv
# takes the torch wheel without dependencies, then its CUDA libraries with NCCL 2.32.3 (ABI-compatible).
set -euo pipefail
home=${STYLEFARM_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/stylefarm}
venv="$home/bench-venv"
if ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --no-deps torch==2.11.0
    "$venv/bin/pip" install -q filelock 'typing-extensions>=4.10' 'sympy>=1.13.3' networkx jinja2 fsspec numpy pillow \
        'cuda-toolkit[cublas,cudart,cufft,cufile,cupti,curand,cusolver,cusparse,nvjitlink,nvrtc,nvtx]==13.0.2' \
        'cuda-bindings<14,>=13.0.3' nvidia-cudnn-cu13==9.19.0.56 nvidia-cusparselt-cu13==0.8.0 \
        nvidia-nccl-cu13==2.32.3 nvidia-nvshmem-cu13==3.4.5
fi
if [ "${1:-}" = python ]; then shift; exec "$venv/bin/python" "$@"; fi
exec env PATH="$venv/bin:$PATH" "$@"
