"""Which local causal LMs memos may load: ``MEMOS_MODELS`` parsed into :class:`ModelSpec` values.

No torch here: settings imports this module, and the API must start without torch.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast, get_args

DType = Literal["float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]

_DTYPES: tuple[str, ...] = get_args(DType)
_DEVICES: tuple[str, ...] = get_args(Device)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_KEYS = frozenset({"path", "dtype", "device"})


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One configured model: a name clients use, a local Hugging Face directory, and how to run it."""

    name: str
    """What clients send as ``model`` (letters, digits, ``.``, ``_``, ``-``; at most 64 characters)."""

    path: Path
    """A local directory with ``config.json``, safetensors weights and a tokenizer. Nothing is downloaded."""

    dtype: DType = "float32"
    """Weights and KV dtype. Part of the fingerprint: KV of one dtype is never served to another."""

    device: Device = "auto"
    """``auto`` picks CUDA when torch sees a GPU, else the CPU."""


def parse_models(text: str) -> dict[str, ModelSpec]:
    """Parse ``MEMOS_MODELS``: ``{"name": {"path": "/dir", "dtype": "...", "device": "..."}}``.

    An empty string means no models. A bad value raises :class:`ValueError` whose message starts with
    the dotted key at fault (``models.small.dtype: ...``), so settings can name the variable and the key.
    """
    if not text.strip():
        return {}
    try:
        raw: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"models: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(raw, dict):
        raise ValueError('models: must be a JSON object of {"name": {"path": "/dir", ...}}')
    specs: dict[str, ModelSpec] = {}
    for name, entry in raw.items():
        key = f"models.{name}"
        if not _NAME.fullmatch(name):  # match: `$` let a name ending in a newline through
            raise ValueError(f"{key}: a model name is 1-64 letters, digits, '.', '_' or '-', starting alphanumeric")
        if not isinstance(entry, dict):
            raise ValueError(f'{key}: must be an object like {{"path": "/dir"}}')
        unknown = sorted(set(entry) - _KEYS)
        if unknown:
            raise ValueError(f"{key}.{unknown[0]}: unknown key (allowed: device, dtype, path)")
        path = entry.get("path")
        if not isinstance(path, str) or not path.strip():
            raise ValueError(f"{key}.path: required, a local model directory")
        dtype = entry.get("dtype", "float32")
        if dtype not in _DTYPES:
            raise ValueError(f"{key}.dtype: must be one of {', '.join(_DTYPES)}, not {dtype!r}")
        device = entry.get("device", "auto")
        if device not in _DEVICES:
            raise ValueError(f"{key}.device: must be one of {', '.join(_DEVICES)}, not {device!r}")
        specs[name] = ModelSpec(
            name=name, path=Path(path).expanduser(), dtype=cast(DType, dtype), device=cast(Device, device)
        )
    return specs
