"""Baton: LLM inference as disaggregated prefill/decode microservices.

from baton import LLM, SamplingParams
llm = LLM(model="path/to/hf-model-dir")
outputs = llm.generate(["Once upon a time"], SamplingParams(max_tokens=32, temperature=0))

The names below are imported when first used, so that commands which need no engine (`baton probe`,
a container's health check, run every few seconds) do not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from baton.shared.engine.outputs import CompletionOutput, Logprob, RequestOutput
    from baton.shared.engine.sampling_params import SamplingParams
    from baton.shared.llm import LLM

__version__ = "0.1.0"

__all__ = ["LLM", "CompletionOutput", "Logprob", "RequestOutput", "SamplingParams", "__version__"]

_MODULES = {
    "LLM": "baton.shared.llm",
    "CompletionOutput": "baton.shared.engine.outputs",
    "Logprob": "baton.shared.engine.outputs",
    "RequestOutput": "baton.shared.engine.outputs",
    "SamplingParams": "baton.shared.engine.sampling_params",
}


def __getattr__(name: str) -> Any:
    """The public API's names, imported on first use (PEP 562)."""
    if name not in _MODULES:
        raise AttributeError(f"module 'baton' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULES[name]), name)
    globals()[name] = value
    return value
