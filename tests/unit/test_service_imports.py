"""The gateway and a disaggregated router never load torch: they start in a fraction of the time and
memory of a worker (torch alone is ~1.5 s of imports and ~190 MiB), and their heaps stay small."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["baton.services.gateway.main", "baton.services.router.main"])
def test_the_service_imports_without_torch(module: str) -> None:
    code = (
        "import importlib, sys\n"
        "import baton.services.cli\n"
        f"importlib.import_module({module!r})\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "print(loaded[:3])\n"
        "sys.exit(1 if loaded else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{module} loaded torch: {result.stdout}{result.stderr[-2000:]}"
