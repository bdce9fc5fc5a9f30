"""Load a causal LM and run it for KV work: prefill, compose, generate on top of reused KV.

Everything here blocks (a forward pass takes milliseconds to seconds): the service calls it from a
worker thread, never on the event loop. torch and transformers are imported with this module.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memos.kv.codec import KV_DTYPES, KVChunk
from memos.kv.errors import KVFormatError, KVInputError, ModelLoadError, NotShiftable
from memos.kv.fingerprint import model_fingerprint
from memos.kv.rope import RopeParams, rerotate, rope_params, rotate_half
from memos.kv.spec import ModelSpec

MEMORY_SEPARATOR = "\n\n"
"""Appended to a memory's text before tokenizing, so composed memories read as separate paragraphs."""

_QUERY_BLOCK = 512
"""Queries per attention block in selective recompute: bounds the score matrix to [heads, 512, tokens]."""


@dataclass(slots=True)
class LoadedModel:
    """A configured model in memory, with what KV code needs to know about its cache."""

    name: str
    spec: ModelSpec
    model: Any
    """The transformers ``*ForCausalLM``, in eval mode."""
    tokenizer: Any
    config: Any
    fingerprint: str
    layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    device: str
    rope: RopeParams | None
    """None when keys cannot be moved exactly; then ``rope_unshiftable_reason`` says why."""
    rope_unshiftable_reason: str | None
    max_positions: int
    """The model's ``max_position_embeddings``: no cache, prompt and answer may run past it."""

    @property
    def torch_dtype(self) -> torch.dtype:
        return KV_DTYPES[self.dtype]

    @property
    def kv_bytes_per_token(self) -> int:
        """2 x layers x kv_heads x head_dim x dtype bytes."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.torch_dtype.itemsize

    def memory_token_ids(self, text: str) -> list[int]:
        """The tokens a memory's KV is built from: ``text + "\\n\\n"``, no special tokens.

        No BOS: a memory's KV may be placed anywhere in a composition, so it carries no start marker.
        """
        return [int(i) for i in self.tokenizer(text + MEMORY_SEPARATOR, add_special_tokens=False)["input_ids"]]

    def prompt_token_ids(self, text: str) -> list[int]:
        """The tokens of a prompt that follows the memories: the text as is, no special tokens."""
        return [int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]

    def check_chunk(self, chunk: KVChunk) -> None:
        """Raise :class:`KVFormatError` unless ``chunk`` has this model's layers, heads, head dim and dtype."""
        chunk.check()
        got = (chunk.layers, chunk.kv_heads, chunk.head_dim, chunk.dtype)
        want = (self.layers, self.kv_heads, self.head_dim, self.torch_dtype)
        if got != want:
            raise KVFormatError(
                f"KV of {got[0]} layers x {got[1]} KV heads x head dim {got[2]} ({got[3]}) does not fit "
                f"model {self.name!r} ({want[0]} x {want[1]} x {want[2]}, {want[3]})"
            )


def _resolve_device(device: str) -> str:
    cuda = torch.cuda.is_available()
    if device == "auto":
        return "cuda" if cuda else "cpu"
    if device == "cuda" and not cuda:
        raise ModelLoadError("device is cuda but torch sees no CUDA GPU")
    return device


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load ``spec.path`` with ``AutoModelForCausalLM``/``AutoTokenizer`` from local files only (safetensors only)."""
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    path = Path(spec.path)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model {spec.name!r}: {path} is not a Hugging Face model directory (no config.json)")
    device = _resolve_device(spec.device)
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        config: Any = AutoConfig.from_pretrained(str(path), local_files_only=True)
        tokenizer: Any = _load_tokenizer(path)
        # use_safetensors: a pickled pytorch_model.bin is never loaded, whoever wrote the directory.
        model: Any = AutoModelForCausalLM.from_pretrained(
            str(path), config=config, local_files_only=True, use_safetensors=True, dtype=KV_DTYPES[spec.dtype]
        )
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError, SafetensorError) as exc:
        # A directory an operator named that does not load (bad config, damaged weights, an architecture this
        # transformers lacks) is a configuration problem to report, not a crash.
        raise ModelLoadError(f"model {spec.name!r}: cannot load {path}: {exc}") from exc
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]
    model = model.to(device).eval()
    model.requires_grad_(False)
    config = model.config

    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or int(config.hidden_size) // heads)
    rope: RopeParams | None = None
    reason: str | None = None
    try:
        rope = rope_params(config)
        own = _model_inv_freq(model)
        # The shift must use the frequencies the model really applies; if they differ from what the
        # config implies, something (a remote-code model, a patched rotary module) is not what we think.
        if own is None or own.shape != rope.inv_freq.shape or not torch.allclose(own, rope.inv_freq, rtol=1e-6):
            raise NotShiftable("the model's rotary frequencies differ from the ones its config describes")
    except NotShiftable as exc:
        rope, reason = None, exc.reason
    try:
        fingerprint = model_fingerprint(path, config, tokenizer, spec.dtype)
    except FileNotFoundError as exc:
        raise ModelLoadError(f"model {spec.name!r}: {exc}") from exc
    return LoadedModel(
        name=spec.name,
        spec=spec,
        model=model,
        tokenizer=tokenizer,
        config=config,
        fingerprint=fingerprint,
        layers=int(config.num_hidden_layers),
        kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=head_dim,
        dtype=spec.dtype,
        device=device,
        rope=rope,
        rope_unshiftable_reason=reason,
        max_positions=int(getattr(config, "max_position_embeddings", 0) or 1 << 30),
    )


def _load_tokenizer(path: Path) -> Any:
    """``AutoTokenizer``, unless it replaced the model type written in ``tokenizer.json``.

    transformers 5 maps some model types to a fixed tokenizer class whatever the directory declares
    (every ``qwen2`` directory gets the byte-level BPE ``Qwen2Tokenizer``). A directory whose
    ``tokenizer.json`` holds another kind of tokenizer (the WordPiece one of ``memos dev make-model``)
    would then tokenize character by character; the file as written is loaded instead.
    """
    import json

    from transformers import AutoTokenizer, TokenizersBackend

    tokenizer: Any = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    file = path / "tokenizer.json"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not file.is_file():
        return tokenizer
    try:
        declared = json.loads(file.read_text(encoding="utf-8"))["model"]["type"]
    except (OSError, ValueError, KeyError, TypeError):
        return tokenizer
    # tokenizers' model classes are named like the "type" field of tokenizer.json (BPE, WordPiece, Unigram).
    if type(backend.model).__name__ == declared:
        return tokenizer
    return TokenizersBackend.from_pretrained(str(path), local_files_only=True)


def _model_inv_freq(model: Any) -> torch.Tensor | None:
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    inv_freq = getattr(rotary, "inv_freq", None)
    return inv_freq.detach().to(device="cpu", dtype=torch.float32) if isinstance(inv_freq, torch.Tensor) else None


def _ids(token_ids: Sequence[int], what: str) -> list[int]:
    ids = [int(i) for i in token_ids]
    if not ids:
        raise KVInputError(f"{what} has no tokens")
    return ids


def prefill(lm: LoadedModel, token_ids: Sequence[int], *, start: int = 0) -> KVChunk:
    """One forward pass over ``token_ids`` at positions ``start, start+1, ...``; returns their KV."""
    ids = _ids(token_ids, "the text")
    if start < 0 or start + len(ids) > lm.max_positions:
        raise KVInputError(f"positions {start}..{start + len(ids) - 1} exceed the model's {lm.max_positions}")
    device = torch.device(lm.device)
    input_ids = torch.tensor([ids], dtype=torch.int64, device=device)
    positions = torch.arange(start, start + len(ids), dtype=torch.int64, device=device)
    from transformers import DynamicCache

    with torch.no_grad():
        # A cache without the config keeps every token in every layer: the model's own default would crop
        # sliding-window layers to the window, and a memory's KV must be whole to be composed anywhere.
        # The model still masks those layers to the window. logits_to_keep=1: the full [tokens, vocab]
        # logits would cost more memory than the KV itself.
        out = lm.model(
            input_ids=input_ids,
            position_ids=positions[None],
            past_key_values=DynamicCache(),
            use_cache=True,
            logits_to_keep=1,
        )
    return KVChunk.from_cache(out.past_key_values, token_ids=input_ids[0], positions=positions)


def _candidates_after_first(chunks: Sequence[KVChunk]) -> torch.Tensor:
    first = chunks[0].tokens
    total = sum(c.tokens for c in chunks)
    return torch.arange(first, total, dtype=torch.int64)


def compose(lm: LoadedModel, chunks: Sequence[KVChunk], *, recompute_ratio: float = 0.0) -> KVChunk:
    """Concatenate chunks' KV in order at contiguous positions ``0..total-1``, as one cache.

    Each chunk's keys are re-rotated from the positions they were stored for to their new ones.
    With ``recompute_ratio`` > 0 and more than one chunk, that fraction of the tokens after the first
    chunk, those whose KV deviates most from what a full prefill would give, is recomputed layer by
    layer (CacheBlend-style selective recompute) to restore attention across chunks. The inputs are
    never modified. Raises :class:`NotShiftable` when a chunk must move and the model's RoPE cannot be
    shifted exactly, :class:`KVFormatError` when a chunk does not fit the model.
    """
    if not chunks:
        raise KVInputError("nothing to compose")
    if not 0.0 <= recompute_ratio <= 1.0:
        raise KVInputError(f"recompute_ratio must be between 0 and 1, not {recompute_ratio}")
    for chunk in chunks:
        lm.check_chunk(chunk)
    total = sum(c.tokens for c in chunks)
    if total > lm.max_positions:
        raise KVInputError(f"{total} composed tokens exceed the model's {lm.max_positions} positions")
    device = torch.device(lm.device)
    keys: list[list[torch.Tensor]] = [[] for _ in range(lm.layers)]
    values: list[list[torch.Tensor]] = [[] for _ in range(lm.layers)]
    start = 0
    for chunk in chunks:
        target = torch.arange(start, start + chunk.tokens, dtype=torch.int64)
        stored = chunk.positions.to("cpu")
        moves = not torch.equal(stored, target)
        if moves and lm.rope is None:
            raise NotShiftable(lm.rope_unshiftable_reason or "the model's RoPE cannot be shifted")
        for layer in range(lm.layers):
            k = chunk.keys[layer].to(device)
            keys[layer].append(rerotate(k, stored, target, lm.rope) if moves and lm.rope is not None else k)
            values[layer].append(chunk.values[layer].to(device))
        start += chunk.tokens
    # torch.cat allocates: the composed cache shares no memory with the inputs, even for one chunk.
    composed = KVChunk(
        keys=[torch.cat(parts, dim=1) for parts in keys],
        values=[torch.cat(parts, dim=1) for parts in values],
        token_ids=torch.cat([c.token_ids.to(device) for c in chunks]),
        positions=torch.arange(total, dtype=torch.int64, device=device),
    )
    if recompute_ratio > 0.0 and len(chunks) > 1:
        candidates = _candidates_after_first(chunks)
        count = min(len(candidates), max(1, math.ceil(recompute_ratio * len(candidates))))
        selective_recompute(lm, composed, candidates.to(device), count)
    return composed


_WINDOW_ON_EVERY_LAYER = frozenset({"mistral", "mixtral", "starcoder2"})
"""Architectures whose modelling code masks every layer to ``config.sliding_window`` (when it is set) and
reads no ``layer_types``, even if a config carries one."""


def attention_window(config: Any, layer_index: int) -> int | None:
    """The sliding window layer ``layer_index`` attends within (keys at most ``window - 1`` positions back),
    or None for full causal attention, as the architecture's own modelling code decides it.

    Read from the config, not the attention module: transformers' ``MistralAttention`` has no
    ``sliding_window`` attribute (its window is ``config.sliding_window``, applied to every layer), so
    the module said "no window" for Mistral and selective recompute let tokens attend past it (found in
    review). Qwen2, Qwen3 and Ministral name each layer's kind in ``layer_types`` (which their configs derive
    from ``use_sliding_window`` and ``max_window_layers``).
    """
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    if str(getattr(config, "model_type", "")) in _WINDOW_ON_EVERY_LAYER:
        return int(window)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return int(window) if layer_types[layer_index] == "sliding_attention" else None
    if hasattr(config, "use_sliding_window"):
        # A Qwen2-style config from before layer_types: the layers from max_window_layers on slide.
        uses = bool(config.use_sliding_window) and layer_index >= int(getattr(config, "max_window_layers", 0) or 0)
        return int(window) if uses else None
    return int(window)


def _decoder(lm: LoadedModel) -> Any:
    base = getattr(lm.model, "model", None)
    if base is None or not all(hasattr(base, a) for a in ("embed_tokens", "layers", "rotary_emb")):
        raise NotShiftable("selective recompute needs a Llama-style decoder (embed_tokens, layers, rotary_emb)")
    return base


def _layer_rows(
    lm: LoadedModel,
    layer_index: int,
    hidden: torch.Tensor,
    rows: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache: KVChunk,
) -> torch.Tensor:
    """Run decoder layer ``layer_index`` for the tokens at ``rows`` only, on top of ``cache``.

    ``hidden`` ``[R, hidden]`` is the layer input of those tokens; ``cos``/``sin`` ``[R, head_dim]``
    their rotary tables. Their freshly computed keys and values overwrite the cache's rows first, then
    each token attends causally over the whole cache (the other tokens keep their stored KV).
    Returns the layer output ``[R, hidden]``. Mirrors the Llama/Qwen2/Mistral/Qwen3 decoder layer.
    """
    layer = _decoder(lm).layers[layer_index]
    attn = layer.self_attn
    head_dim = lm.head_dim
    x = layer.input_layernorm(hidden)
    q = attn.q_proj(x).view(len(rows), -1, head_dim)  # [R, heads, hd]
    k = attn.k_proj(x).view(len(rows), -1, head_dim)  # [R, kv_heads, hd]
    v = attn.v_proj(x).view(len(rows), -1, head_dim)
    if getattr(attn, "q_norm", None) is not None:  # Qwen3 normalises q and k per head before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    q = q.transpose(0, 1)  # [heads, R, hd]
    k = k.transpose(0, 1)
    v = v.transpose(0, 1)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    cache.keys[layer_index][:, rows] = k
    cache.values[layer_index][:, rows] = v
    groups = q.shape[0] // lm.kv_heads
    all_k = cache.keys[layer_index].repeat_interleave(groups, dim=0)  # [heads, N, hd]
    all_v = cache.values[layer_index].repeat_interleave(groups, dim=0)
    key_pos = cache.positions
    window = attention_window(lm.config, layer_index)
    keys_t = all_k.float().transpose(1, 2)  # [heads, hd, N]
    out = torch.empty_like(q)
    for begin in range(0, len(rows), _QUERY_BLOCK):
        block = slice(begin, begin + _QUERY_BLOCK)
        query_pos = cache.positions[rows[block]]
        allowed = key_pos[None, :] <= query_pos[:, None]  # [B, N] causal
        if window is not None:
            allowed &= key_pos[None, :] > query_pos[:, None] - window
        scores = torch.matmul(q[:, block].float(), keys_t) * float(attn.scaling)  # [heads, B, N]
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        weights = torch.softmax(scores, dim=-1).to(q.dtype)
        out[:, block] = torch.matmul(weights, all_v)
    attn_out = attn.o_proj(out.transpose(0, 1).reshape(len(rows), -1))
    hidden = hidden + attn_out
    result: torch.Tensor = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return result


def selective_recompute(lm: LoadedModel, cache: KVChunk, candidates: torch.Tensor, count: int) -> torch.Tensor:
    """Recompute, in place in ``cache``, the KV of the ``count`` candidate tokens that deviate most.

    CacheBlend's observation: a chunk prefilled alone misses attention to the chunks before it, and
    the damage concentrates on few tokens. Layer 0's KV depends on no other token, so it is exact;
    running layer 0 for every token gives exact layer-1 inputs, whose keys and values are compared
    with the stored layer-1 KV. The ``count`` candidates with the largest deviation are then carried
    through layers 1..L-1, their KV rewritten layer by layer while every other token keeps its stored
    KV. Cost: one layer for all tokens plus ``count`` tokens through the rest. Returns the chosen rows.
    """
    with torch.no_grad():
        base = _decoder(lm)
        device = torch.device(lm.device)
        everything = torch.arange(cache.tokens, dtype=torch.int64, device=device)
        hidden = base.embed_tokens(cache.token_ids.to(device)[None])  # [1, N, hidden]
        cos, sin = base.rotary_emb(hidden, cache.positions.to(device)[None])  # [1, N, hd] each
        cos, sin = cos[0], sin[0]
        hidden = _layer_rows(lm, 0, hidden[0], everything, cos, sin, cache)  # [N, hidden]
        count = min(count, len(candidates))
        if lm.layers == 1 or count <= 0:
            return candidates[:0]
        # Layer-1 KV of the candidates as a full prefill would have it, against the stored KV.
        layer = base.layers[1]
        attn = layer.self_attn
        x = layer.input_layernorm(hidden[candidates])
        k = attn.k_proj(x).view(len(candidates), -1, lm.head_dim)
        v = attn.v_proj(x).view(len(candidates), -1, lm.head_dim)
        if getattr(attn, "k_norm", None) is not None:
            k = attn.k_norm(k)
        k = k.transpose(0, 1)
        v = v.transpose(0, 1)
        k = k * cos[candidates] + rotate_half(k) * sin[candidates]
        deviation = (k.float() - cache.keys[1][:, candidates].float()).pow(2).sum(dim=(0, 2)) + (
            v.float() - cache.values[1][:, candidates].float()
        ).pow(2).sum(dim=(0, 2))
        chosen = candidates[torch.topk(deviation, count).indices].sort().values
        rows_hidden = hidden[chosen]
        for index in range(1, lm.layers):
            rows_hidden = _layer_rows(lm, index, rows_hidden, chosen, cos[chosen], sin[chosen], cache)
        return chosen


@dataclass(slots=True)
class Generation:
    """A greedy answer and what it cost."""

    text: str
    token_ids: list[int]
    ttft_ms: float
    """From the call to the first generated token (cache copy and prompt prefill included)."""
    total_ms: float
    prefill_tokens: int
    """Tokens run through the model before the first answer token (prompt, or prefix + prompt)."""
    reused_tokens: int
    """Tokens whose KV came from the prefix instead of a forward pass."""


def _at_zero(lm: LoadedModel, prefix: KVChunk) -> KVChunk:
    """``prefix`` at positions ``0..T-1`` on the model's device (re-rotated if it was stored elsewhere)."""
    lm.check_chunk(prefix)
    if torch.equal(prefix.positions.to("cpu"), torch.arange(prefix.tokens, dtype=torch.int64)):
        return prefix.to(lm.device)
    return compose(lm, [prefix])


def _prefix_cache(lm: LoadedModel, prefix: KVChunk) -> Any:
    # No config: every layer keeps all its tokens, as prefill stored them (see prefill).
    return _at_zero(lm, prefix).to_cache()


def _forward_first(
    lm: LoadedModel,
    prompt_ids: Sequence[int],
    prefix: KVChunk | None,
    prefix_token_ids: Sequence[int],
    use_prefix_kv: bool,
) -> tuple[Any, int, int, int]:
    """The first forward pass: (model output, next position, prefill tokens, reused tokens)."""
    from transformers import DynamicCache

    prompt = _ids(prompt_ids, "the prompt")
    prefix_ids = [int(i) for i in prefix_token_ids]
    if prefix is not None:
        stored = [int(i) for i in prefix.token_ids.tolist()]
        if prefix_ids and prefix_ids != stored:
            raise KVInputError("prefix_token_ids differ from the tokens the prefix KV was built for")
        prefix_ids = stored
    device = torch.device(lm.device)
    if prefix is not None and use_prefix_kv:
        cache = _prefix_cache(lm, prefix)
        start, run, reused = prefix.tokens, prompt, prefix.tokens
    else:
        cache, start, run, reused = DynamicCache(), 0, prefix_ids + prompt, 0
    if start + len(run) > lm.max_positions:
        raise KVInputError(f"{start + len(run)} tokens exceed the model's {lm.max_positions} positions")
    input_ids = torch.tensor([run], dtype=torch.int64, device=device)
    positions = torch.arange(start, start + len(run), dtype=torch.int64, device=device)[None]
    out = lm.model(input_ids=input_ids, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out, start + len(run), len(run), reused


def next_token_logits(
    lm: LoadedModel,
    prompt_ids: Sequence[int],
    *,
    prefix: KVChunk | None = None,
    prefix_token_ids: Sequence[int] = (),
    use_prefix_kv: bool = True,
) -> torch.Tensor:
    """fp32 ``[vocab]`` logits for the token after ``prompt_ids`` (on top of ``prefix``), on the CPU."""
    with torch.no_grad():
        out, _, _, _ = _forward_first(lm, prompt_ids, prefix, prefix_token_ids, use_prefix_kv)
        logits: torch.Tensor = out.logits[0, -1].float().cpu()
    return logits


def _eos_ids(lm: LoadedModel) -> set[int]:
    eos = getattr(lm.config, "eos_token_id", None)
    generation = getattr(lm.model, "generation_config", None)
    if eos is None and generation is not None:
        eos = generation.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in eos} if isinstance(eos, list | tuple) else {int(eos)}


def generate(
    lm: LoadedModel,
    prompt_ids: Sequence[int],
    *,
    prefix: KVChunk | None = None,
    prefix_token_ids: Sequence[int] = (),
    use_prefix_kv: bool = True,
    max_new_tokens: int = 32,
) -> Generation:
    """Greedy generation after ``prompt_ids``.

    With ``prefix`` and ``use_prefix_kv``, only the prompt runs through the model, on top of a copy of
    the prefix KV (the prefix is never modified). Otherwise the prefix tokens (``prefix_token_ids``, or
    the prefix's own tokens) and the prompt are prefilled together: the path to compare against.
    Stops at ``max_new_tokens`` or an end-of-sequence token (not included).
    """
    if max_new_tokens < 1:
        raise KVInputError("max_new_tokens must be at least 1")
    eos = _eos_ids(lm)
    device = torch.device(lm.device)
    began = time.perf_counter()
    with torch.no_grad():
        out, position, computed, reused = _forward_first(lm, prompt_ids, prefix, prefix_token_ids, use_prefix_kv)
        token = int(out.logits[0, -1].argmax())  # .item() waits for the device: the timing is honest
        ttft = time.perf_counter() - began
        if position + max_new_tokens > lm.max_positions:
            max_new_tokens = max(1, lm.max_positions - position)
        generated: list[int] = []
        cache = out.past_key_values
        while token not in eos:
            generated.append(token)
            if len(generated) >= max_new_tokens:
                break
            out = lm.model(
                input_ids=torch.tensor([[token]], dtype=torch.int64, device=device),
                position_ids=torch.tensor([[position]], dtype=torch.int64, device=device),
                past_key_values=cache,
                use_cache=True,
            )
            cache = out.past_key_values
            position += 1
            token = int(out.logits[0, -1].argmax())
    total = time.perf_counter() - began
    return Generation(
        text=lm.tokenizer.decode(generated, skip_special_tokens=True),
        token_ids=generated,
        ttft_ms=ttft * 1000.0,
        total_ms=total * 1000.0,
        prefill_tokens=computed,
        reused_tokens=reused,
    )
