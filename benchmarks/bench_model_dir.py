"""A model directory for serving benchmarks on random weights: the given config.json plus a
word-level tokenizer covering the whole vocabulary (token i is the word "t<i>"), so the gateway can
stream text for every token. Weights come from `--load-format dummy`.

    python benchmarks/bench_model_dir.py benchmarks/models/llama-3.2-1b-shape /tmp/anchor
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers


def write_bench_model_dir(config_dir: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(config_dir / "config.json", out / "config.json")
    vocab_size = json.loads((out / "config.json").read_text())["vocab_size"]
    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins the words with spaces
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 131072}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config_dir", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    print(write_bench_model_dir(args.config_dir, args.out))


if __name__ == "__main__":
    main()
