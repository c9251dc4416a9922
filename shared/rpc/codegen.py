"""Regenerate the gRPC stubs in this package from `proto/` (needs grpcio-tools, a test extra).

    python -m baton.shared.rpc.codegen           # rewrite the committed stubs
    python -m baton.shared.rpc.codegen --check   # exit 1 if they differ from what proto/ generates

protoc names imports after the proto path (`from baton.v1 import common_pb2`); the stubs live in
`baton.shared.rpc`, so those imports are rewritten.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROTO_ROOT = PACKAGE_DIR.parents[1] / "proto"
PROTO_FILES = ("baton/v1/common.proto", "baton/v1/router.proto", "baton/v1/worker.proto")
_IMPORT = re.compile(r"^from baton\.v1 import (\w+)", re.MULTILINE)


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on every proto file into `out_dir` (flat), with imports rewritten; returns the files."""
    from grpc_tools import protoc

    if not PROTO_ROOT.is_dir():
        raise FileNotFoundError(f"{PROTO_ROOT} not found: run codegen from a source checkout")
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={tmp}", f"--pyi_out={tmp}"]
        args += [f"--grpc_python_out={tmp}", *PROTO_FILES]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO_FILES}")
        written = []
        for path in sorted(Path(tmp, "baton", "v1").iterdir()):
            text = _IMPORT.sub(r"from baton.shared.rpc import \1", path.read_text())
            target = out_dir / path.name
            target.write_text(text)
            written.append(target)
    return written


def stale_stubs() -> list[str]:
    """Names of committed stubs that differ from freshly generated ones (or are missing)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        return [
            f.name
            for f in fresh
            if not (PACKAGE_DIR / f.name).is_file() or (PACKAGE_DIR / f.name).read_text() != f.read_text()
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m baton.shared.rpc.codegen", description=__doc__)
    parser.add_argument("--check", action="store_true", help="only check that the stubs are current")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_stubs()
        if stale:
            print(f"stale gRPC stubs: {', '.join(stale)}; run python -m baton.shared.rpc.codegen")
            return 1
        print("gRPC stubs are current")
        return 0
    for path in generate(PACKAGE_DIR):
        print(f"wrote {path.relative_to(PACKAGE_DIR.parents[1])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
