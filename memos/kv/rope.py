"""RoPE re-encoding: move cached keys from the positions they were rotated for to new positions, exactly.

Llama, Qwen2 and Mistral rotate each key by its position with the "rotate half" layout
(``k * cos + rotate_half(k) * sin``, the two halves of the head dimension forming the pairs). A key
rotated for position ``p`` is moved to ``q`` by undoing the rotation at ``p`` and applying the one at
``q``, both computed the way the model computes them (fp32 angles ``position * inv_freq``), so the
result matches what the model would have cached at ``q``. That only holds when the rotary
frequencies are fixed: RoPE variants whose frequencies depend on the sequence length, or that rotate
part of the head, are refused with :class:`NotShiftable`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from memos.kv.errors import NotShiftable

SHIFTABLE_MODEL_TYPES = frozenset({"llama", "qwen2", "mistral", "qwen3"})
"""Architectures known to cache keys after a full-width rotate-half RoPE."""

STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})
"""RoPE types whose frequencies are computed once from the config (a shift is exact)."""

_REFUSED_ROPE_TYPES = {
    "dynamic": "dynamic NTK scaling recomputes the rotary frequencies from the sequence length, "
    "so a key rotated in a short context is not the key of a longer one",
    "longrope": "LongRoPE switches between short and long frequency factors at original_max_position_embeddings, "
    "so keys rotated for one length do not match another",
}


@dataclass(frozen=True, slots=True)
class RopeParams:
    """The model's rotary frequencies: all that is needed to move a key from one position to another."""

    inv_freq: torch.Tensor
    """fp32 ``[head_dim // 2]`` on the CPU: the angle per position of each rotated pair."""

    rope_type: str
    theta: float

    @property
    def head_dim(self) -> int:
        return 2 * int(self.inv_freq.shape[0])


def _single_rope_parameters(config: Any) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None)
    if params is None:
        params = getattr(config, "rope_scaling", None) or {}
        if getattr(config, "rope_theta", None) is not None:
            params = {"rope_theta": config.rope_theta, **params}
    if not isinstance(params, dict):
        raise NotShiftable(f"unreadable RoPE parameters {params!r}")
    layer_types = getattr(config, "layer_types", None) or ()
    nested = [key for key in params if key in layer_types]
    if nested:
        distinct = {repr(sorted(params[key].items())) for key in nested if params[key] is not None}
        if len(distinct) != 1:
            raise NotShiftable("layers use different RoPE parameters")
        params = next(params[key] for key in nested if params[key] is not None)
    return dict(params)


def rope_params(config: Any) -> RopeParams:
    """The rotary parameters of ``config``, or :class:`NotShiftable` with the reason keys cannot be moved."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    model_type = str(getattr(config, "model_type", ""))
    if model_type not in SHIFTABLE_MODEL_TYPES:
        raise NotShiftable(
            f"model type {model_type!r} is not one memos knows to use full-width rotate-half RoPE "
            f"({', '.join(sorted(SHIFTABLE_MODEL_TYPES))})"
        )
    params = _single_rope_parameters(config)
    rope_type = str(params.get("rope_type") or params.get("type") or "default")
    if rope_type in _REFUSED_ROPE_TYPES:
        raise NotShiftable(_REFUSED_ROPE_TYPES[rope_type])
    if rope_type not in STATIC_ROPE_TYPES:
        raise NotShiftable(f"RoPE type {rope_type!r} is not one memos can shift exactly")
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    if partial is not None and float(partial) != 1.0:
        raise NotShiftable(
            f"partial rotary embedding (partial_rotary_factor={partial}): only part of each head is rotated"
        )
    if params.get("mrope_section"):
        raise NotShiftable("multimodal RoPE (mrope_section) rotates by several position axes")
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or int(config.hidden_size) // heads)
    if head_dim % 2:
        raise NotShiftable(f"head dimension {head_dim} is odd")
    theta = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    if rope_type == "default":
        # The formula every rotate-half model uses for plain RoPE (transformers' compute_default_rope_parameters).
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim))
    else:
        inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    inv_freq = inv_freq.detach().to(device="cpu", dtype=torch.float32)
    if tuple(inv_freq.shape) != (head_dim // 2,):
        raise NotShiftable(f"rotary frequencies have shape {list(inv_freq.shape)}, expected [{head_dim // 2}]")
    return RopeParams(inv_freq=inv_freq, rope_type=rope_type, theta=theta)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Same arithmetic as the model's rotary embedding: fp32 positions times fp32 frequencies.
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # [T, head_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, head_dim]
    return emb.cos(), emb.sin()


def rerotate(
    keys: torch.Tensor, from_positions: torch.Tensor, to_positions: torch.Tensor, params: RopeParams
) -> torch.Tensor:
    """Keys ``[..., T, head_dim]`` rotated for ``from_positions`` ``[T]``, re-rotated for ``to_positions`` ``[T]``.

    Computed in fp32, returned in ``keys``' dtype; ``keys`` is not modified. A scale the model applies
    to cos and sin (YaRN's attention factor) multiplies the key in both rotations and cancels out.
    """
    tokens, head_dim = int(keys.shape[-2]), int(keys.shape[-1])
    if head_dim != params.head_dim:
        raise ValueError(f"keys have head dimension {head_dim}, the rotary parameters {params.head_dim}")
    if tuple(from_positions.shape) != (tokens,) or tuple(to_positions.shape) != (tokens,):
        raise ValueError(
            f"positions must be [{tokens}], got {list(from_positions.shape)} and {list(to_positions.shape)}"
        )
    if torch.equal(from_positions.cpu(), to_positions.cpu()):
        return keys.clone()
    device = keys.device
    inv_freq = params.inv_freq.to(device)
    k = keys.to(torch.float32)
    cos_from, sin_from = _cos_sin(from_positions.to(device), inv_freq)
    cos_to, sin_to = _cos_sin(to_positions.to(device), inv_freq)
    # The inverse of a rotation by angle a is the rotation by -a: k * cos(a) - rotate_half(k) * sin(a).
    unrotated = k * cos_from - rotate_half(k) * sin_from
    rotated = unrotated * cos_to + rotate_half(unrotated) * sin_to
    return rotated.to(keys.dtype)
