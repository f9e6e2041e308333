#!/usr/bin/env bash
# Every row of docs/benchmarks.md: `flax-bert bench` (here `python -m flax_bert.bench`) on this machine.
# Each run first waits (up to 10 min) for the host to be idle; each result records the CPU share
# other processes took meanwhile (host_other_load), so disturbed runs are visible and left out.
# usage: benchmarks/run_benchmarks.sh [REPEATS] [GROUP|ROW...]
#   groups: main ablations modernbert (default: main ablations); rows: any name below, e.g. roberta-base-b8
# Results: benchmarks/results/ROW.N.json (main) and benchmarks/results/ablations/ROW.N.json, with N
# the next free number, so repeating a row adds runs instead of replacing them.
set -euo pipefail
cd "$(dirname "$0")/.."
repeats=${1:-3}; shift || true
selected=" ${*:-main ablations} "
base=(roberta-base --max_seq_length 128 --dtype float32 --steps 5)

bench() {  # bench GROUP NAME ARGS...
  local group=$1 name=$2; shift 2
  [[ "$selected" == *" $group "* || "$selected" == *" $name "* ]] || return 0
  local out=benchmarks/results; [[ $group == ablations ]] && out=$out/ablations
  [[ $group == modernbert ]] && out=$out/modernbert
  mkdir -p "$out"
  for _ in $(seq 1 "$repeats"); do
    local n=1; while [[ -e "$out/$name.$n.json" ]]; do n=$((n + 1)); done
    python benchmarks/wait_for_quiet.py --timeout 600 || true
    python -m flax_bert.bench "$@" --output "$out/$name.$n.json"
  done
}

bench main roberta-base-b8 "${base[@]}" --per_device_train_batch_size 8 --compare torch
bench main roberta-base-b8-remat "${base[@]}" --per_device_train_batch_size 8 --remat_policy dots_no_batch --compare torch
bench main roberta-base-b32 "${base[@]}" --per_device_train_batch_size 32 --compare torch
bench main roberta-base-b32-remat "${base[@]}" --per_device_train_batch_size 32 --remat_policy dots_no_batch --compare torch
bench main tiny-b16 tiny --steps 10 --compare torch
bench main tiny-b32 tiny --per_device_train_batch_size 32 --steps 10 --compare torch
bench modernbert modernbert-base-b2-s256 modernbert-base --max_seq_length 256 --dtype float32 --steps 5 \
    --per_device_train_batch_size 2 --compare torch

bench ablations dense-head "${base[@]}" --per_device_train_batch_size 8 --dense_head
bench ablations no-scan "${base[@]}" --per_device_train_batch_size 8 --scan_layers false
bench ablations no-scan-remat "${base[@]}" --per_device_train_batch_size 8 --scan_layers false --remat_policy dots_no_batch
bench ablations remat-dots "${base[@]}" --per_device_train_batch_size 8 --remat_policy dots
bench ablations remat-full "${base[@]}" --per_device_train_batch_size 8 --remat_policy full
bench ablations no-hugepages "${base[@]}" --per_device_train_batch_size 8 --hugepages false --compare torch
