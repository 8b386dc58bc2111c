#!/usr/bin/env bash
# The README's first command: set-up (idempotent), release build, and a demo render through `stylefarm local`.
#   bash deploy/demo.sh [OUTPUT.png]      (default: stylefarm-demo.png)
# The photos come from the scikit-image wheel (deploy/setup.sh): Chelsea the cat (CC0, Stefan van der Walt)
# in the style of a cup of coffee (CC0, Rachel Michetti).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
bash deploy/setup.sh
cargo build --release --locked -p stylefarm
out=${1:-stylefarm-demo.png}
# an embedded coordinator and one local worker: the farm's default way to render on one machine
./target/release/stylefarm local --workers 1 \
    --content .stylefarm/demo/chelsea.png --style .stylefarm/demo/coffee.png \
    --size 256 --scales 2 --scale-iterations 150,100 --output "$out"
echo "demo: $out"
