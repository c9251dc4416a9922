#!/usr/bin/env bash
# The anchor workload through `baton serve` (gateway, router, one prefill and one decode worker sharing
# one GPU), then the same requests offline, on the same machine. Results go to $1 (default: .).
#     bash benchmarks/serve_anchor.sh OUT_DIR [--served-only]
# SERVE_ARGS adds flags to `baton serve` (e.g. SERVE_ARGS="--gpus 0,1" to give each worker a GPU).
# CLIENT_PROCESSES (default 4) load processes drive it: one alone is saturated by this workload's
# ~20k streamed events a second (the report's client_cpu_busy says how busy the busiest one was).
# PASSES (default 1) measured passes on the one cluster, each after emptying every prefix cache
# (`baton reset-prefix-cache`), so each starts as cold as the first: serve_anchor.json is the first,
# serve_anchor_N.json the N-th, and the last line printed gives every pass's time and their median.
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
load=(bench serve --url http://127.0.0.1:8000 --model "$model" --num-prompts 256 --client-processes "${CLIENT_PROCESSES:-4}")
# a warm-up pass on other prompts first, as the offline benchmark warms up before it times
python3 -m baton.services.cli "${load[@]}" --dataset-seed 1 --out "$out/serve_warmup.json"
for pass in $(seq 1 "${PASSES:-1}"); do
  python3 -m baton.services.cli reset-prefix-cache --address 127.0.0.1:50051
  name=serve_anchor$([ "$pass" = 1 ] || echo "_$pass")
  python3 -m baton.services.cli "${load[@]}" --out "$out/$name.json"
done
python3 - "$out" <<'PY'
import json, pathlib, statistics, sys
runs = sorted(pathlib.Path(sys.argv[1]).glob("serve_anchor*.json"), key=lambda p: (len(p.name), p.name))
times = [json.loads(p.read_text())["summary"]["duration_s"] for p in runs]
print(f"served passes: {', '.join(f'{t:.2f}' for t in times)} s; median {statistics.median(times):.2f} s")
PY
kill -TERM $server; wait $server || true
trap - EXIT
[ "${2:-}" = --served-only ] && exit 0
python3 -m baton.services.cli bench throughput "${engine[@]}" --out "$out/offline_anchor.json"
