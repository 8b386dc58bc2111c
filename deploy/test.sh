#!/usr/bin/env bash
# The README's second command (and CI's): set-up (idempotent), format check, clippy, every test.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
# each step's wall time, on stderr when it ends (where CI's time goes)
step_start=$SECONDS
took() { echo "test.sh: $1 took $((SECONDS - step_start)) s" >&2; step_start=$SECONDS; }
bash deploy/setup.sh
took set-up
cargo fmt --all --check
cargo clippy --locked --all-targets -- -D warnings
took clippy
# the API docs, links checked
RUSTDOCFLAGS="-D warnings" cargo doc --locked --no-deps --workspace
took rustdoc
# the build for machines that only submit (and the coordinator's): no libtorch anywhere in its graph
cargo clippy --locked -p stylefarm --no-default-features --features client -- -D warnings
if cargo tree --locked -p stylefarm --no-default-features --features client -e normal,build \
    | grep -qE '^[^a-z]*(torch-sys|tch) '; then
    echo "stylefarm --features client depends on libtorch" >&2
    exit 1
fi
took "client-only clippy"
# Debian's packages the tests run: redis-server (the Redis store's tests start servers of their own),
# chromium and chromium-driver (the status page's browser test)
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y -q "${missing[@]}" \
        || { $sudo apt-get update -q && $sudo apt-get install -y -q "${missing[@]}"; }
fi
# the S3 blob store's tests start S3-compatible servers of their own (the s3s-fs crate's; about 2 minutes
# to build once, Rust 1.92 or later)
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
if ! command -v s3s-fs >/dev/null; then
    cargo install --locked s3s-fs@0.14.1 --features binary
fi
took "apt and s3s-fs"
# the deployment files: rendered and checked against their schemas, offline
bash deploy/check-deploy.sh
took "deploy checks"
if ! cargo nextest --version >/dev/null 2>&1; then
    cargo install --locked cargo-nextest
fi
# the end-to-end tests (tests/) run the stylefarm binary of the same profile, with its fail points (fault
# injection through FAILPOINTS; no-ops unless set)
# the binary the end-to-end tests run, and the tests, in one build with one feature set: nextest then
# compiles nothing again (a separate `-p stylefarm` build compiled the workspace twice, about 3 minutes)
cargo build --locked --workspace --bins --tests --features stylefarm/failpoints,stylefarm-worker/failpoints
took "build of the tests"
cargo nextest run --locked --workspace --features stylefarm/failpoints,stylefarm-worker/failpoints \
    --no-fail-fast
took tests
