#!/usr/bin/env bash
# Every row of docs/benchmarks.md: `flax-bert bench` (here `python -m flax_bert.bench`) on this machine.
# Each run first waits (up to 10 min) for the host to be idle; each result records the CPU share
# other processes took meanwhile (host_other_load), so disturbed runs are visible.
# usage: benchmarks/run_benchmarks.sh [REPEATS] [GROUP...]   groups: main ablations (default: both)
set -euo pipefail
cd "$(dirname "$0")/.."
repeats=${1:-3}; shift || true
groups=${*:-main ablations}
out=benchmarks/results
mkdir -p "$out"
base=(roberta-base --max_seq_length 128 --dtype float32 --steps 5)

bench() {  # bench NAME ARGS...: one run -> $out/NAME.<n>.json
  local name=$1; shift
  for i in $(seq 1 "$repeats"); do
    python benchmarks/wait_for_quiet.py --timeout 600 || true
    python -m flax_bert.bench "$@" --output "$out/$name.$i.json"
  done
}

if [[ " $groups " == *" main "* ]]; then
  bench roberta-base-b8 "${base[@]}" --per_device_train_batch_size 8 --compare torch
  bench roberta-base-b8-remat "${base[@]}" --per_device_train_batch_size 8 --remat_policy dots_no_batch --compare torch
  bench roberta-base-b32-remat "${base[@]}" --per_device_train_batch_size 32 --remat_policy dots_no_batch --compare torch
  bench tiny-b16 tiny --steps 10 --compare torch
  bench tiny-b32 tiny --per_device_train_batch_size 32 --steps 10 --compare torch
fi
if [[ " $groups " == *" ablations "* ]]; then
  out=benchmarks/results/ablations
  mkdir -p "$out"
  bench dense-head "${base[@]}" --per_device_train_batch_size 8 --dense_head
  bench no-scan "${base[@]}" --per_device_train_batch_size 8 --scan_layers false
  bench remat-dots "${base[@]}" --per_device_train_batch_size 8 --remat_policy dots
  bench remat-full "${base[@]}" --per_device_train_batch_size 8 --remat_policy full
  bench no-hugepages "${base[@]}" --per_device_train_batch_size 8 --hugepages false --compare torch
fi
