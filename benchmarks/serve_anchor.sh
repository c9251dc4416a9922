#!/usr/bin/env bash
# The anchor workload through `baton serve` (gateway, router, one prefill and one decode worker sharing
# one GPU), then the same requests offline, on the same machine. Results go to $1 (default: .).
#     bash benchmarks/serve_anchor.sh OUT_DIR [--served-only]
# SERVE_ARGS adds flags to `baton serve` (e.g. SERVE_ARGS="--gpus 0,1" to give each worker a GPU).
# CLIENT_PROCESSES (default 4) load processes drive it: one alone is saturated by this workload's
# ~20k streamed events a second (the report's client_cpu_busy says how busy the busiest one was).
set -euo pipefail
out=${1:-.}
here=$(cd "$(dirname "$0")" && pwd)
model=$(mktemp -d)/anchor
python3 "$here/bench_model_dir.py" "$here/models/llama-3.2-1b-shape" "$model" >/dev/null
engine=(--model "$model" --load-format dummy --dtype bfloat16 --num-kv-blocks 30000)
python3 -m baton.services.cli serve "${engine[@]}" ${SERVE_ARGS:-} --port 8000 --router-port 50051 >"$out/serve.log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
  curl -sf http://127.0.0.1:8000/ready >/dev/null && break
  kill -0 $server 2>/dev/null || { tail -30 "$out/serve.log"; exit 1; }
  sleep 1
done
# a warm-up pass on other prompts first, as the offline benchmark warms up before it times
python3 -m baton.services.cli bench serve --url http://127.0.0.1:8000 --model "$model" --num-prompts 256 \
  --dataset-seed 1 --client-processes "${CLIENT_PROCESSES:-4}" --out "$out/serve_warmup.json"
python3 -m baton.services.cli bench serve --url http://127.0.0.1:8000 --model "$model" --num-prompts 256 \
  --client-processes "${CLIENT_PROCESSES:-4}" --out "$out/serve_anchor.json"
kill -TERM $server; wait $server || true
trap - EXIT
[ "${2:-}" = --served-only ] && exit 0
python3 -m baton.services.cli bench throughput "${engine[@]}" --out "$out/offline_anchor.json"
