"""`baton settings`: every BATON_* variable with its declared defaults, and the README's table equal
to it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from baton.services import settings_table
from baton.services.cli import build_parser, main

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_lists_every_setting_once_as_the_commands_read_them() -> None:
    table = re.search(r"<!-- settings -->\n(.*?)<!-- /settings -->", README.read_text(), re.S)
    assert table, "README lost its settings table"
    assert table.group(1) == settings_table.markdown(build_parser()), "run: baton settings --markdown"
    variables = re.findall(r"^\| `(BATON_\w+)` \|", table.group(1), re.M)
    assert len(variables) == len(set(variables)) >= 40


def test_defaults_are_the_declared_ones_whatever_the_environment_says(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BATON_PORT", "9999")
    monkeypatch.setenv("BATON_LOG_REQUESTS", "1")
    found = {s.variable: s for s in settings_table.settings(build_parser())}
    assert found["BATON_PORT"].defaults == {
        "serve": 8000, "gateway": 8000, "router": 50051, "prefill": 0, "decode": 0
    }  # fmt: skip
    assert found["BATON_LOG_REQUESTS"].defaults["gateway"] is False
    assert found["BATON_REDIS_PASSWORD"].defaults == dict.fromkeys(
        ["serve", "router", "prefill", "decode", "registry check"]
    )
    assert found["BATON_CACHE_DIR"].flag is None
    assert main(["settings"]) == 0
    listed = capsys.readouterr().out
    assert re.search(r"^BATON_LEASE_TTL_S +--lease-ttl-s +router=10\.0, ", listed, re.M)
    assert settings_table.variables_of(build_parser(), "gateway") >= {"BATON_ROUTER", "BATON_CACHE_DIR"}
