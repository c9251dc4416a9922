"""The decode-interference probe of disagg_study.py on the CPU, with the decode worker's engine core on a
thread of the worker and in a process of its own (--engine-process), alternating: an indication of what
the process buys when the GPU is not there to measure it (a generated tiny Llama, 1P+1D on loopback;
on a machine of few cores every process competes for them, so only same-run comparisons mean anything).

    python3 benchmarks/engine_process_cpu_probe.py [--rounds 2] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from disagg_study import decode_interference, median_ratio

from baton.services.launcher import ClusterSpec, LocalCluster
from baton.shared.demo.tiny_model import write_tiny_model
from baton.shared.models.model_config import ModelConfig

VICTIMS = (8, 32, 96)  # count, prompt tokens, output tokens
ARRIVALS_PER_S = 12.0
ARRIVAL_PROMPT_LEN = (128, 384)
PROBES_PER_CLUSTER = 2


def probe(model: Path, engine_process: bool) -> list[dict[str, Any]]:
    spec = ClusterSpec(
        model=str(model),
        num_prefill=1,
        num_decode=1,
        router_port=0,
        http_port=0,
        threads=1,
        router_args=["--local-prefill-max-tokens", "16"],
        engine_args=["--max-model-len", "1024"],
        decode_args=["--engine-process"] if engine_process else [],
    )
    vocab = ModelConfig.from_dir(model).vocab_size
    with open(os.devnull, "w") as quiet, LocalCluster(spec, log=quiet) as cluster:
        return [
            decode_interference(cluster, vocab, ARRIVALS_PER_S, 1, VICTIMS, ARRIVAL_PROMPT_LEN, repeat=repeat)
            for repeat in range(PROBES_PER_CLUSTER)
        ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2, help="clusters per mode, the modes alternating")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model = Path(tempfile.mkdtemp()) / "tiny"
    write_tiny_model(model)
    result: dict[str, Any] = {"victims": VICTIMS, "arrivals_per_s": ARRIVALS_PER_S, "modes": {}}
    for _ in range(args.rounds):
        for mode in ("engine-thread", "engine-process"):
            probes = probe(model, mode == "engine-process")
            rows = [
                {
                    "alone_tpot_p99_ms": round(p["alone"]["tpot_ms"]["p99"], 2),
                    "loaded_tpot_p99_ms": round(p["loaded"]["tpot_ms"]["p99"], 2),
                    "ratio": round(p["tpot_p99_ratio"], 3),
                    "load_covered_victims": p["background_covered_victims"],
                }
                for p in probes
            ]
            cluster_result = {"probes": rows, "median_ratio": median_ratio(probes)}
            result["modes"].setdefault(mode, []).append(cluster_result)
            print(mode, json.dumps(rows), flush=True)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
