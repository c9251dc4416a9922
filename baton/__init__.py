"""Baton: LLM inference as disaggregated prefill/decode microservices.

from baton import LLM, SamplingParams
llm = LLM(model="path/to/hf-model-dir")
outputs = llm.generate(["Once upon a time"], SamplingParams(max_tokens=32, temperature=0))
"""

from baton.shared.engine.outputs import CompletionOutput, Logprob, RequestOutput
from baton.shared.engine.sampling_params import SamplingParams
from baton.shared.llm import LLM

__version__ = "0.1.0"

__all__ = ["LLM", "CompletionOutput", "Logprob", "RequestOutput", "SamplingParams", "__version__"]
