"""What Baton needs from a Hugging Face `config.json`, parsed and checked with clear errors."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_DTYPES = {"float32", "bfloat16", "float16"}


class ModelDirectoryError(ValueError):
    """The model directory is missing a file or holds something Baton cannot serve."""


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    rope_scaling: dict[str, Any] | None = None
    """rope_type plus its parameters (linear: factor; llama3: factor, low/high_freq_factor, ...)."""
    sliding_windows: tuple[int | None, ...] = ()
    """Per layer: attention window, or None for full attention."""
    torch_dtype: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        return cls.from_dict(read_json(path), source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        arch = _architecture(raw, source)
        get = _Getter(raw, source)
        hidden = get.int("hidden_size")
        num_heads = get.int("num_attention_heads")
        num_kv_heads = get.int("num_key_value_heads", num_heads)
        head_dim = raw.get("head_dim") or hidden // num_heads
        num_layers = get.int("num_hidden_layers")
        if num_heads % num_kv_heads:
            raise ModelDirectoryError(
                f"{source}: num_attention_heads ({num_heads}) is not a multiple of "
                f"num_key_value_heads ({num_kv_heads})"
            )
        attention_bias = bool(raw.get("attention_bias", False))
        is_qwen2 = arch == "Qwen2ForCausalLM"
        rope_theta, rope_scaling = _rope(raw, source)
        return cls(
            architecture=arch,
            vocab_size=get.int("vocab_size"),
            hidden_size=hidden,
            intermediate_size=get.int("intermediate_size"),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            max_position_embeddings=get.int("max_position_embeddings", 2048),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=True if is_qwen2 else attention_bias,
            o_bias=False if is_qwen2 else attention_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            rope_scaling=rope_scaling,
            sliding_windows=_sliding_windows(arch, raw, num_layers),
            torch_dtype=_dtype(raw, source),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_as_tuple(raw.get("eos_token_id")),
        )


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelDirectoryError(f"{path} not found: is {path.parent} a Hugging Face model directory?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelDirectoryError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelDirectoryError(f"{path} must hold a JSON object")
    return data


class _Getter:
    def __init__(self, raw: dict[str, Any], source: str) -> None:
        self.raw, self.source = raw, source

    def int(self, key: str, default: int | None = None) -> int:
        value = self.raw.get(key, default)
        if value is None:
            raise ModelDirectoryError(f"{self.source}: required field {key!r} is missing")
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ModelDirectoryError(f"{self.source}: {key!r} must be a positive integer, got {value!r}")
        return value


def _architecture(raw: dict[str, Any], source: str) -> str:
    archs = raw.get("architectures") or []
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return arch
    named = ", ".join(archs) if archs else f"none (model_type={raw.get('model_type')!r})"
    raise ModelDirectoryError(
        f"{source}: unsupported architecture {named}; Baton serves {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _rope(raw: dict[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    """Both spellings: `rope_theta` + `rope_scaling` (usual); `rope_parameters` (transformers 5)."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type not in ("linear", "llama3"):
        raise ModelDirectoryError(
            f"{source}: rope scaling type {rope_type!r} is not supported (default, linear, llama3)"
        )
    if "factor" not in params:
        raise ModelDirectoryError(f"{source}: rope scaling {rope_type!r} needs a 'factor'")
    if rope_type == "llama3":
        params.setdefault("original_max_position_embeddings", raw.get("max_position_embeddings", 8192))
        for key in ("low_freq_factor", "high_freq_factor"):
            if key not in params:
                raise ModelDirectoryError(f"{source}: llama3 rope scaling needs {key!r}")
    return theta, {"rope_type": rope_type, **params}


def _sliding_windows(arch: str, raw: dict[str, Any], num_layers: int) -> tuple[int | None, ...]:
    """Mirror transformers: Mistral windows every layer (4096 when the field is absent); Qwen2 only
    with use_sliding_window, from layer max_window_layers on (or as `layer_types` says)."""
    window = raw.get("sliding_window", 4096 if arch == "MistralForCausalLM" else None)
    if arch == "MistralForCausalLM":
        return (window,) * num_layers
    if arch == "Qwen2ForCausalLM" and raw.get("use_sliding_window") and window is not None:
        layer_types = raw.get("layer_types") or [
            "sliding_attention" if i >= raw.get("max_window_layers", 28) else "full_attention"
            for i in range(num_layers)
        ]
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    return (None,) * num_layers


def _dtype(raw: dict[str, Any], source: str) -> str | None:
    value = raw.get("torch_dtype") or raw.get("dtype")
    if value is not None and value not in _DTYPES:
        raise ModelDirectoryError(f"{source}: dtype {value!r} is not one of {sorted(_DTYPES)}")
    return value


def _as_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (value,)
