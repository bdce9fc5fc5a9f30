"""A model's identity for KV: two models share a fingerprint only if their KV caches are interchangeable.

The fingerprint is the SHA-256 of canonical JSON (sorted keys, no spaces) of everything that shapes a
KV cache: the model's whole config (less the fields that name or label it, see ``UNHASHED_CONFIG_KEYS``),
architecture, layer and head counts, RoPE parameters, sliding window, KV dtype, a hash of the tokenizer
(vocabulary, special tokens, chat template, pipeline) and a hash of the weight files.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

FINGERPRINT_VERSION = "memos-fingerprint/2"
"""Changes whenever the recipe changes, so old and new fingerprints can never collide. 2: the whole config is
hashed (1 picked fields, and missed ``rms_norm_eps``, ``hidden_act`` and others that change every layer's KV)."""

UNHASHED_CONFIG_KEYS = frozenset(
    {
        # Names, paths and versions: the same files copied, renamed or saved by another transformers release
        # compute the same KV.
        "_name_or_path",
        "name_or_path",
        "_commit_hash",
        "transformers_version",
        "architectures",
        # Classification labels: a causal LM's KV never reads them.
        "id2label",
        "label2id",
        "num_labels",
        "problem_type",
        # How a forward reports its results or caches them, not what it computes.
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "_attn_implementation",
        "_attn_implementation_autoset",
        # The dtype the weights were saved in: the KV dtype is its own field, and the weights' values are hashed.
        "dtype",
        "torch_dtype",
        # Only draws random initial weights; the weights themselves are hashed.
        "initializer_range",
    }
)
"""Config fields left out of the fingerprint: none of them changes a KV cache. Every other field is hashed, so a
config change nobody listed (a norm's epsilon, the activation function, a new transformers option) cannot leave
old KV looking fresh: a field that changes nothing only costs a rebuild."""

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


def _plain(value: Any) -> Any:
    """``value`` as plain JSON values: non-finite floats (``allow_nan`` is off) and anything else JSON lacks
    (a dtype, a tuple) as text, so that every config can be hashed rather than fail to load."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def config_fields(config: PretrainedConfig) -> dict[str, Any]:
    """The model config as transformers resolved it (defaults filled in, derived fields such as ``layer_types``
    computed), less ``UNHASHED_CONFIG_KEYS``. The resolved config, not ``config.json`` as written: a default
    that changes between transformers releases changes the model's computation just as an edit would."""
    return {k: _plain(v) for k, v in config.to_dict().items() if k not in UNHASHED_CONFIG_KEYS}


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
        "config": config_fields(config),
        "kv_dtype": kv_dtype,
        "tokenizer": tokenizer_hash(tokenizer),
        "weights": weights_hash(model_dir),
    }


def model_fingerprint(
    model_dir: Path, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, kv_dtype: str
) -> str:
    """Hex SHA-256 of :func:`fingerprint_fields` in canonical JSON."""
    return hashlib.sha256(canonical_json(fingerprint_fields(model_dir, config, tokenizer, kv_dtype))).hexdigest()
