"""A model's identity for KV: two models share a fingerprint only if their KV caches are interchangeable.

The fingerprint is the SHA-256 of canonical JSON (sorted keys, no spaces) of everything that shapes a
KV cache: architecture, layer and head counts, RoPE parameters, sliding window, KV dtype, a hash of the
tokenizer (vocabulary, special tokens, chat template, pipeline) and a hash of the weight files.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

FINGERPRINT_VERSION = "memos-fingerprint/1"
"""Changes whenever the recipe changes, so old and new fingerprints can never collide."""

_CHUNK = 8 * 1024 * 1024


def canonical_json(value: Any) -> bytes:
    """JSON with sorted keys and no whitespace: one byte string per value."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def weights_hash(model_dir: Path) -> str:
    """SHA-256 over the names and SHA-256s of the ``*.safetensors`` files in ``model_dir``."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    return hashlib.sha256(canonical_json({f.name: _sha256_file(f) for f in files})).hexdigest()


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """SHA-256 of the vocabulary, the special and added tokens, the chat template and the fast pipeline."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts: dict[str, Any] = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0])),
        "special": {key: str(value) for key, value in sorted(tokenizer.special_tokens_map.items())},
        "added": sorted((int(i), str(t)) for i, t in tokenizer.added_tokens_decoder.items()),
        "chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, str | dict) else None,
        # Normalizer, pre-tokenizer, model and post-processor: lower-casing or a merge list change the
        # token ids of the same text even with the same vocabulary.
        "pipeline": json.loads(backend.to_str()) if backend is not None else None,
    }
    return hashlib.sha256(canonical_json(parts)).hexdigest()


def _rope(config: PretrainedConfig) -> Any:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if params is None and getattr(config, "rope_theta", None) is not None:
        params = {"rope_type": "default", "rope_theta": config.rope_theta}
    # Round-trip through JSON to turn tensors/tuples into plain values and fail loudly on anything else.
    return json.loads(json.dumps(params, default=float)) if params is not None else None


def _sliding_window(config: PretrainedConfig) -> Any:
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    uses = getattr(config, "use_sliding_window", True)
    if window is None or not uses or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return {"window": int(window), "layer_types": list(layer_types) if layer_types is not None else None}


def fingerprint_fields(
    model_dir: Path, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, kv_dtype: str
) -> dict[str, Any]:
    """The values the fingerprint hashes, as a dict (handy to show why two fingerprints differ)."""
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
    rope = _rope(config)
    partial = getattr(config, "partial_rotary_factor", None)
    if partial is None and isinstance(rope, dict):
        partial = rope.get("partial_rotary_factor")
    return {
        "recipe": FINGERPRINT_VERSION,
        "model_type": str(config.model_type),
        "layers": int(config.num_hidden_layers),
        "kv_heads": int(getattr(config, "num_key_value_heads", None) or heads),
        "head_dim": int(head_dim),
        "hidden_size": int(config.hidden_size),
        "rope": rope,
        "partial_rotary_factor": float(partial) if partial is not None else 1.0,
        "sliding_window": _sliding_window(config),
        "kv_dtype": kv_dtype,
        "tokenizer": tokenizer_hash(tokenizer),
        "weights": weights_hash(model_dir),
    }


def model_fingerprint(
    model_dir: Path, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, kv_dtype: str
) -> str:
    """Hex SHA-256 of :func:`fingerprint_fields` in canonical JSON."""
    return hashlib.sha256(canonical_json(fingerprint_fields(model_dir, config, tokenizer, kv_dtype))).hexdigest()
