#!/usr/bin/env bash
# The scheduler's throughput (bench/scheduler_load.rs, a FAKE ENGINE) side by side with an earlier commit:
# builds the benchmark at the working tree and at OLD (the coordinator's sources of OLD swapped into the tree
# for that build, then put back), then runs each RUNS times, alternating.
#
#     bash bench/scheduler_load_vs.sh OLD [TASKS] [WORKERS] [RUNS]
#
# Defaults: 10000 tasks, 50 workers, 3 runs. Needs jq. The coordinator crate of OLD must build against the
# other crates of the working tree (true while they have not changed between the two).
set -euo pipefail
old=${1:?usage: bench/scheduler_load_vs.sh OLD [TASKS] [WORKERS] [RUNS]}
tasks=${2:-10000} workers=${3:-50} runs=${4:-3}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bins=$(mktemp -d)
build() {
    cargo bench -p stylefarm-coordinator --bench scheduler_load --no-run --message-format=json 2>/dev/null \
        | jq -r 'select(.executable != null and .target.name == "scheduler_load") | .executable' | tail -1
}
cp "$(build)" "$bins/new"
mapfile -t files < <(git diff --name-only "$old" -- coordinator/src)
for f in "${files[@]}"; do
    mkdir -p "$bins/cur/$(dirname "$f")"
    cp "$f" "$bins/cur/$f"
    git show "$old:$f" > "$f"
done
restore() { for f in "${files[@]}"; do cp "$bins/cur/$f" "$f"; done; }
trap restore EXIT
cp "$(build)" "$bins/old"
restore
trap - EXIT
for i in $(seq "$runs"); do
    for v in old new; do
        echo "$v (run $i): $("$bins/$v" "$tasks" "$workers" 2>&1 | tail -1)"
    done
done
rm -rf "$bins"
