"""The `baton` command line: `baton generate`, `baton tiny-model`."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from baton.shared import env
from baton.shared.demo.tiny_model import ARCHITECTURES

DEMO_ARCH = "llama"
DEMO_SEED = 0


def demo_model_dir() -> Path:
    """The embedded default model: generated once into the cache directory, reused afterwards."""
    from baton.shared.demo.tiny_model import write_tiny_model

    path = env.cache_dir() / "models" / f"tiny-{DEMO_ARCH}-seed{DEMO_SEED}"
    if not (path / "config.json").is_file():
        print(f"baton: generating the demo model in {path} (once)", file=sys.stderr)
        write_tiny_model(path, DEMO_ARCH, DEMO_SEED)
    return path


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    from baton.shared.demo.tiny_model import write_tiny_model

    out = write_tiny_model(args.out_dir, args.arch, args.seed, args.dtype, args.shards)
    print(f"wrote a tiny {args.arch} model (seed {args.seed}) to {out}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from baton import LLM, SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
    )
    llm = LLM(args.model or str(demo_model_dir()), dtype=args.dtype, device=args.device)
    prompts = args.prompt or ["Once upon a time", "It was the best of times,", "Call me Ishmael."]
    start = time.perf_counter()
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    else:
        outputs = llm.generate(prompts, params)
    elapsed_s = time.perf_counter() - start
    for prompt, out in zip(prompts, outputs, strict=True):
        print(
            f"prompt: {prompt!r}\noutput: {out.text!r}  ({len(out.token_ids)} tokens, {out.finish_reason})\n"
        )
    num_tokens = sum(len(o.token_ids) for o in outputs)
    dtype = str(llm.engine.dtype).removeprefix("torch.")
    rate = num_tokens / elapsed_s
    print(
        f"{len(outputs)} prompts, {num_tokens} tokens in {elapsed_s:.2f} s ({rate:.0f} tok/s) "
        f"on {llm.engine.device} ({dtype}), model {llm.config.model}",
        file=sys.stderr,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="baton", description="Baton: disaggregated LLM inference.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine details")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text offline (default model: the generated demo model)")
    gen.add_argument("prompt", nargs="*", help="prompt text (several allowed; default: three examples)")
    gen.add_argument("--model", help="Hugging Face model directory (default: the demo model)")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message (chat template)")
    gen.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    gen.set_defaults(func=_cmd_generate)

    tiny = sub.add_parser("tiny-model", help="write a small random-weight model in Hugging Face format")
    tiny.add_argument("out_dir", help="directory to create (must not exist, or be empty)")
    tiny.add_argument("--arch", default="llama", choices=ARCHITECTURES)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    tiny.add_argument("--shards", type=int, default=1, help="split the weights over N safetensors files")
    tiny.set_defaults(func=_cmd_tiny_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except ValueError as exc:  # bad input: say what is wrong, no traceback
        print(f"baton: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
