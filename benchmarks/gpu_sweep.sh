#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md section 17, as one command on a lent GPU machine (no Flower, Ray or
# datasets there): DP-SGD throughput against the card's bf16 peak (benchmarks/gpu_check.py), then federation
# sweeps (benchmarks/federation.py) on tasks prepared here with `federation.py prepare` into $DATA.
# Each part has a time limit, so a slow part still leaves the others their share; every JSON line is kept.
# Two leases of a session's 15 minutes: `first` (throughput, then the sweeps) and `second` (the learning rates the
# first pointed to, beside SST-2 at eps 8, which the first's time limit cut).
#   DATA=.gpu/data OUT=/tmp/out benchmarks/gpu_sweep.sh first
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}:$PWD"
: "${DATA:?the prepared tasks}" "${OUT:?where the JSON lines go}"
gpu_check=(python3 benchmarks/gpu_check.py --model-dir smollm2 --peak-tflops 989 --batches 8,64,256,1024 --physical 256
           --length 128 --steps 3 --autocast bf16)
sweep=(python3 benchmarks/federation.py sweep --device cuda --autocast bf16 --physical 0)
if [ "${1:-first}" = second ]; then
    sweep+=(--no-untrained --final-only)
    timeout 200 "${sweep[@]}" "$DATA/sst2.json" --out "$OUT/sst2b.jsonl" "rounds=8;steps=16;batch=64" \
        > /dev/null 2> "$OUT/sst2b.log" &
    timeout 110 "${sweep[@]}" "$DATA/medquad-qtype.json" --deadline-s 95 --out "$OUT/qtypeb.jsonl" \
        "rounds=3;steps=4;batch=16;lr=5e-2" "rounds=3;steps=8;batch=8;lr=3e-2" "rounds=3;steps=4;batch=16;lr=3e-2;seed=1" \
        "rounds=3;steps=4;batch=16;lr=1e-1" "rounds=3;steps=4;batch=16;lr=3e-2;epsilon=3" \
        "rounds=3;steps=2;batch=32;lr=3e-2" "rounds=3;steps=4;batch=16;lr=3e-2;aggregation=fedavg" \
        "rounds=3;steps=4;batch=16;lr=3e-2;clip=1.0" > /dev/null 2> "$OUT/qtypeb.log"
    timeout 80 "${sweep[@]}" "$DATA/medquad.json" --deadline-s 65 --out "$OUT/hospitalb.jsonl" \
        "rounds=3;steps=5;batch=8;lr=3e-2" "rounds=3;steps=5;batch=8;lr=3e-2;aggregation=fedavg" \
        "rounds=3;steps=5;batch=8;lr=5e-2" "rounds=3;steps=3;batch=16;lr=3e-2" "rounds=3;steps=5;batch=8;lr=3e-2;seed=1" \
        > /dev/null 2> "$OUT/hospitalb.log"
    wait
    exit 0
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
timeout 75 "${gpu_check[@]}" > "$OUT/throughput.json" 2> "$OUT/throughput.log"; echo "throughput rc $?"

qtype=("rounds=3;steps=8;batch=8;epsilon=inf;aggregation=fedavg" "rounds=3;steps=8;batch=8"
       "rounds=3;steps=4;batch=16" "rounds=3;steps=2;batch=32" "rounds=2;steps=3;batch=32" "rounds=1;steps=6;batch=32"
       "rounds=3;steps=4;batch=16;lr=3e-2" "rounds=3;steps=4;batch=16;lr=3e-3" "rounds=3;steps=4;batch=16;clip=1.0"
       "rounds=3;steps=4;batch=16;aggregation=fedavg" "rounds=3;steps=4;batch=16;rank=16"
       "rounds=3;steps=4;batch=16;targets=q_proj,k_proj,v_proj,o_proj" "rounds=6;steps=4;batch=16"
       "rounds=3;steps=8;batch=32" "rounds=3;steps=4;batch=16;seed=1" "rounds=3;steps=4;batch=16;epsilon=3")
timeout 170 "${sweep[@]}" "$DATA/medquad-qtype.json" --deadline-s 140 --out "$OUT/qtype.jsonl" "${qtype[@]}" \
    > /dev/null 2> "$OUT/qtype.log"; echo "qtype rc $?"

sst2=("rounds=8;steps=16;batch=64;lr=3e-3;epsilon=inf;aggregation=fedavg" "rounds=8;steps=16;batch=64"
      "rounds=4;steps=16;batch=64" "rounds=8;steps=16;batch=64;seed=1")
timeout 190 "${sweep[@]}" "$DATA/sst2.json" --deadline-s 150 --out "$OUT/sst2.jsonl" "${sst2[@]}" \
    > /dev/null 2> "$OUT/sst2.log"; echo "sst2 rc $?"

hospital=("rounds=3;steps=5;batch=8;epsilon=inf;aggregation=fedavg" "rounds=3;steps=5;batch=8"
          "rounds=3;steps=5;batch=8;aggregation=fedavg" "rounds=3;steps=3;batch=16" "rounds=1;steps=8;batch=16"
          "rounds=3;steps=5;batch=8;lr=3e-2" "rounds=3;steps=5;batch=8;targets=q_proj,k_proj,v_proj,o_proj"
          "rounds=3;steps=10;batch=16")
timeout 100 "${sweep[@]}" "$DATA/medquad.json" --deadline-s 75 --out "$OUT/hospital.jsonl" "${hospital[@]}" \
    > /dev/null 2> "$OUT/hospital.log"; echo "hospital rc $?"
