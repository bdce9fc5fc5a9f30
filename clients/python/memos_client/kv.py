"""Use a downloaded KV activation in your own process: ``memos-kv/1`` bytes to a transformers ``DynamicCache``.

Needs the ``[kv]`` extra (``pip install "./clients/python[kv]"`` from a checkout: torch, transformers,
safetensors). The file is checked before any tensor is used: format, checksum (``payload_sha256``), shapes,
and the model fingerprint, which is computed here from the local model directory with the server's recipe
(docs/kv.md, "Fingerprint"). KV of another model, another tokenizer or other weights is refused with
:class:`KVMismatch`, never loaded. Nothing is unpickled: safetensors parses a JSON header and copies
raw buffers.

    data = client.activations.download(activation_id)
    cache = load_dynamic_cache(data, "/models/qwen2.5-0.5b")
    # cache holds the memory's tokens at positions 0..n-1; feed the prompt's tokens after them.

This module is an independent reader of the documented format (the server has its own, in
``memos.kv``); a test in the server's suite checks that both agree on the fingerprint and the tensors.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import DynamicCache

__all__ = ["KVError", "KVFile", "KVMismatch", "load_dynamic_cache", "model_fingerprint", "read_kv"]

FORMAT = "memos-kv/1"
FINGERPRINT_RECIPE = "memos-fingerprint/2"
_UNHASHED_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "name_or_path",
        "_commit_hash",
        "transformers_version",
        "architectures",
        "id2label",
        "label2id",
        "num_labels",
        "problem_type",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "dtype",
        "torch_dtype",
        "initializer_range",
    }
)
"""Config fields the server's fingerprint leaves out (``memos.kv.fingerprint.UNHASHED_CONFIG_KEYS``)."""
_DTYPES = ("float32", "bfloat16", "float16")
_METADATA_KEYS = ("format", "fingerprint", "model", "memory_id", "version", "dtype", "created_at", "payload_sha256")
_MAX_HEADER = 100 * 1024 * 1024
_LAYER = re.compile(r"^([kv])\.(0|[1-9][0-9]*)$")
_CHUNK = 8 * 1024 * 1024


class KVError(ValueError):
    """The bytes are not a sound ``memos-kv/1`` file (format, truncation, checksum, shapes)."""


class KVMismatch(KVError):
    """The file's fingerprint is not the local model's: its KV would be wrong in this model."""

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f"the KV was built for model fingerprint {actual}, the local model's is {expected}")
        self.expected = expected
        self.actual = actual


@dataclass(frozen=True)
class KVFile:
    """A checked ``memos-kv/1`` file: metadata and tensors (keys and values ``[kv_heads, tokens, head_dim]``)."""

    metadata: dict[str, str]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    token_ids: torch.Tensor
    positions: torch.Tensor

    @property
    def fingerprint(self) -> str:
        return self.metadata["fingerprint"]

    @property
    def tokens(self) -> int:
        return int(self.token_ids.shape[0])


def _bytes(source: bytes | bytearray | memoryview | str | PathLike[str]) -> bytes:
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    return Path(source).read_bytes()


def read_kv(source: bytes | bytearray | memoryview | str | PathLike[str]) -> KVFile:
    """Parse and check a ``memos-kv/1`` file (bytes or a path). Raises :class:`KVError` when it is not sound."""
    data = _bytes(source)
    if len(data) < 8:
        raise KVError("truncated: too short for a safetensors header")
    size = int.from_bytes(data[:8], "little")
    if size > _MAX_HEADER or 8 + size > len(data):
        raise KVError("truncated or not a safetensors file: the header length does not fit")
    try:
        header = json.loads(data[8 : 8 + size])
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, and int() past 4300 digits
        raise KVError(f"the header is not JSON: {exc}") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise KVError(f"not a {FORMAT} file")
    missing = [key for key in _METADATA_KEYS if not isinstance(meta.get(key), str)]
    if missing:
        raise KVError(f"metadata lacks {', '.join(missing)}")
    if meta["dtype"] not in _DTYPES:
        raise KVError(f"metadata dtype {meta['dtype']!r} is not one of {', '.join(_DTYPES)}")
    if hashlib.sha256(memoryview(data)[8 + size :]).hexdigest() != meta["payload_sha256"]:
        raise KVError("the tensor bytes do not match payload_sha256: the file was altered, damaged or truncated")

    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(data)
    except (SafetensorError, ValueError, TypeError) as exc:
        raise KVError(f"not a readable safetensors file: {exc}") from None
    layers: dict[str, set[int]] = {"k": set(), "v": set()}
    for name in set(tensors) - {"token_ids", "positions"}:
        match = _LAYER.fullmatch(name)  # match: `$` let "k.0\n" through, then a KeyError
        if match is None:
            raise KVError(f"unexpected tensor {name!r}")
        layers[match.group(1)].add(int(match.group(2)))
    count = len(layers["k"])
    if "token_ids" not in tensors or "positions" not in tensors:
        raise KVError("token_ids and positions are required")
    if count == 0 or layers["k"] != set(range(count)) or layers["v"] != set(range(count)):
        raise KVError("tensors k.0..k.{n-1} and v.0..v.{n-1} must all be present")
    kv = KVFile(
        metadata=dict(meta),
        keys=[tensors[f"k.{i}"] for i in range(count)],
        values=[tensors[f"v.{i}"] for i in range(count)],
        token_ids=tensors["token_ids"],
        positions=tensors["positions"],
    )
    _check_shapes(kv)
    return kv


def _check_shapes(kv: KVFile) -> None:
    import torch

    tokens = kv.tokens
    for name, ids in (("token_ids", kv.token_ids), ("positions", kv.positions)):
        if ids.dtype != torch.int64 or ids.dim() != 1 or int(ids.shape[0]) != tokens or tokens == 0:
            raise KVError(f"{name} must be int64 [tokens] with at least one token")
    first = kv.keys[0]
    expected = (int(first.shape[0]), tokens, int(first.shape[-1])) if first.dim() == 3 else None
    for layer, (k, v) in enumerate(zip(kv.keys, kv.values, strict=True)):
        for kind, t in (("k", k), ("v", v)):
            if expected is None or tuple(t.shape) != expected or t.dtype != first.dtype:
                raise KVError(f"{kind}.{layer} is {t.dtype} {list(t.shape)}, expected {first.dtype} {expected}")
    if str(first.dtype).removeprefix("torch.") != kv.metadata["dtype"]:
        raise KVError(f"metadata says dtype {kv.metadata['dtype']!r} but the tensors are {first.dtype}")


# --- the fingerprint (docs/kv.md): must stay byte-for-byte the server's recipe -------------------------


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def load_tokenizer(model_dir: str | PathLike[str]) -> Any:
    """The tokenizer memos uses for a model directory: ``AutoTokenizer``, or the ``tokenizer.json`` as written.

    transformers maps some model types to a fixed tokenizer class whatever the directory declares; when
    that class's model kind differs from the ``tokenizer.json``'s, the file is loaded as written (so
    the fingerprint and the token ids are the server's).
    """
    from transformers import AutoTokenizer, TokenizersBackend

    path = Path(model_dir)
    tokenizer: Any = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        declared = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))["model"]["type"]
    except (OSError, ValueError, KeyError, TypeError):
        return tokenizer
    if backend is None or type(backend.model).__name__ == declared:
        return tokenizer
    return TokenizersBackend.from_pretrained(str(path), local_files_only=True)


def _tokenizer_hash(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    template = tokenizer.chat_template
    parts = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0])),
        "special": {key: str(value) for key, value in sorted(tokenizer.special_tokens_map.items())},
        "added": sorted((int(i), str(t)) for i, t in tokenizer.added_tokens_decoder.items()),
        "chat_template": template if isinstance(template, str | dict) else None,
        "pipeline": json.loads(backend.to_str()) if backend is not None else None,
    }
    return hashlib.sha256(_canonical(parts)).hexdigest()


def _rope(config: Any) -> Any:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if params is None and getattr(config, "rope_theta", None) is not None:
        params = {"rope_type": "default", "rope_theta": config.rope_theta}
    return json.loads(json.dumps(params, default=float)) if params is not None else None


def _plain(value: Any) -> Any:
    """As the server's ``memos.kv.fingerprint._plain``: plain JSON values, anything else as text."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def model_fingerprint(
    model_dir: str | PathLike[str], kv_dtype: str, *, config: Any = None, tokenizer: Any = None
) -> str:
    """The memos fingerprint of the model in ``model_dir`` whose KV is kept in ``kv_dtype``.

    ``kv_dtype`` is the dtype the model runs in (``float32``, ``bfloat16``, ``float16``): KV of the same
    weights in another dtype has another fingerprint. ``config`` and ``tokenizer`` default to the
    directory's.
    """
    from transformers import AutoConfig

    path = Path(model_dir)
    config = config if config is not None else AutoConfig.from_pretrained(str(path), local_files_only=True)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(path)
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    heads = int(config.num_attention_heads)
    rope = _rope(config)
    partial = getattr(config, "partial_rotary_factor", None)
    if partial is None and isinstance(rope, dict):
        partial = rope.get("partial_rotary_factor")
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    sliding = (
        None
        if window is None
        or not getattr(config, "use_sliding_window", True)
        or (layer_types is not None and "sliding_attention" not in layer_types)
        else {"window": int(window), "layer_types": list(layer_types) if layer_types is not None else None}
    )
    fields = {
        "recipe": FINGERPRINT_RECIPE,
        "model_type": str(config.model_type),
        "layers": int(config.num_hidden_layers),
        "kv_heads": int(getattr(config, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(config, "head_dim", None) or int(config.hidden_size) // heads),
        "hidden_size": int(config.hidden_size),
        "rope": rope,
        "partial_rotary_factor": float(partial) if partial is not None else 1.0,
        "sliding_window": sliding,
        "config": {k: _plain(v) for k, v in config.to_dict().items() if k not in _UNHASHED_CONFIG_KEYS},
        "kv_dtype": kv_dtype,
        "tokenizer": _tokenizer_hash(tokenizer),
        "weights": hashlib.sha256(_canonical({f.name: _sha256_file(f) for f in weights})).hexdigest(),
    }
    return hashlib.sha256(_canonical(fields)).hexdigest()


def _model_dir(model: Any, model_dir: str | PathLike[str] | None) -> Path:
    if model_dir is not None:
        return Path(model_dir)
    if isinstance(model, str | PathLike):
        return Path(model)
    name = getattr(getattr(model, "config", None), "_name_or_path", "")
    if name and Path(name).is_dir():
        return Path(name)
    raise ValueError("cannot tell which directory the model was loaded from: pass model_dir=")


def load_dynamic_cache(
    source: bytes | bytearray | memoryview | str | PathLike[str],
    model: Any,
    *,
    model_dir: str | PathLike[str] | None = None,
    tokenizer: Any = None,
    device: Any = None,
) -> DynamicCache:
    """A transformers ``DynamicCache`` holding the KV of a downloaded activation, checked against ``model``.

    ``source``: the ``memos-kv/1`` bytes (``client.activations.download(id)``) or a path to them.
    ``model``: a local Hugging Face model directory, or a model loaded from one with ``from_pretrained``
    (its directory is ``model.config._name_or_path`` unless ``model_dir`` says otherwise). The local
    model's fingerprint (directory, weights, tokenizer, and the dtype it runs in) must equal the
    file's, or :class:`KVMismatch` is raised. The cache is on ``device`` (default: the model's, or CPU)
    and covers the file's tokens at its stored positions (``0..n-1`` for a single activation).
    """
    kv = read_kv(source)
    path = _model_dir(model, model_dir)
    loaded = not isinstance(model, str | PathLike)
    dtype = str(getattr(model, "dtype", "")).removeprefix("torch.") if loaded else kv.metadata["dtype"]
    config = model.config if loaded else None
    local = model_fingerprint(path, dtype, config=config, tokenizer=tokenizer)
    if local != kv.fingerprint:
        raise KVMismatch(expected=local, actual=kv.fingerprint)
    if device is None:
        device = getattr(model, "device", "cpu") if loaded else "cpu"

    from transformers import DynamicCache

    return DynamicCache(
        [(k.unsqueeze(0).to(device), v.unsqueeze(0).to(device)) for k, v in zip(kv.keys, kv.values, strict=True)],
        config=config,
    )
