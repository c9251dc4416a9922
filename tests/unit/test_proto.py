"""The wire contract: committed stubs are what proto/ generates, and every message, field, enum value,
service and rpc carries a comment."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from baton.shared.rpc import codegen

PROTO_DIR = Path(__file__).resolve().parents[2] / "proto"
DECLARATION = re.compile(
    r"^\s*(message|enum|service|rpc|oneof)\s+\w+|^\s*(optional |repeated )?[\w.]+\s+\w+\s*=\s*\d+;"
)


def test_committed_stubs_are_current() -> None:
    assert codegen.stale_stubs() == [], "run: python -m baton.shared.rpc.codegen"


@pytest.mark.parametrize("proto", sorted(PROTO_DIR.rglob("*.proto")), ids=lambda p: p.name)
def test_every_declaration_is_documented(proto: Path) -> None:
    lines = proto.read_text().splitlines()
    undocumented = [
        f"{proto.name}:{i + 1}: {line.strip()}"
        for i, line in enumerate(lines)
        if DECLARATION.match(line) and not lines[i - 1].strip().startswith("//")
    ]
    assert undocumented == []


def test_enum_zero_values_are_unspecified() -> None:
    for proto in PROTO_DIR.rglob("*.proto"):
        for name, zero in re.findall(r"enum (\w+) \{[^}]*?\n\s*(\w+) = 0;", proto.read_text()):
            assert zero.endswith("_UNSPECIFIED"), f"{proto.name}: {name}'s 0 value is {zero}"
