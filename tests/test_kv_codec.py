"""The KV library without a model: MEMOS_MODELS parsing, the error tree, and the memos-kv/1 codec."""

from __future__ import annotations

import hashlib
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from memos_client import kv as sdk_kv
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from memos.kv import codec
from memos.kv.codec import FORMAT, KVChunk, KVMeta, decode, encode, read_meta
from memos.kv.errors import FingerprintMismatch, KVChecksumError, KVError, KVFormatError, NotShiftable
from memos.kv.spec import ModelSpec, parse_models

FP = "ab" * 32
META = KVMeta(
    fingerprint=FP, model="tiny", memory_id="m-1", version=3, dtype="float32", created_at="2025-01-02T03:04:05Z"
)


def make_chunk(
    layers: int = 3, kv_heads: int = 2, tokens: int = 5, head_dim: int = 8, dtype: torch.dtype = torch.float32
) -> KVChunk:
    g = torch.Generator().manual_seed(7)
    return KVChunk(
        keys=[torch.randn(kv_heads, tokens, head_dim, generator=g).to(dtype) for _ in range(layers)],
        values=[torch.randn(kv_heads, tokens, head_dim, generator=g).to(dtype) for _ in range(layers)],
        token_ids=torch.arange(100, 100 + tokens, dtype=torch.int64),
        positions=torch.arange(tokens, dtype=torch.int64),
    )


def header_end(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


def forge(tensors: dict[str, torch.Tensor], **overrides: str) -> bytes:
    """A safetensors file with memos-kv/1 metadata and a correct checksum, whatever the tensors are."""
    metadata = {
        "format": FORMAT,
        "fingerprint": FP,
        "model": "tiny",
        "memory_id": "m-1",
        "version": "1",
        "dtype": "float32",
        "created_at": "2025-01-02T03:04:05Z",
        "payload_sha256": "0" * 64,
        **overrides,
    }
    draft = st_save(tensors, metadata=metadata)
    if "payload_sha256" not in overrides:
        # The tensor bytes do not depend on the header, so a second save with the real digest keeps them.
        metadata["payload_sha256"] = hashlib.sha256(draft[header_end(draft) :]).hexdigest()
    return st_save(tensors, metadata=metadata)


def tensors_of(chunk: KVChunk) -> dict[str, torch.Tensor]:
    out = {f"k.{i}": k for i, k in enumerate(chunk.keys)} | {f"v.{i}": v for i, v in enumerate(chunk.values)}
    return out | {"token_ids": chunk.token_ids, "positions": chunk.positions}


# --- MEMOS_MODELS --------------------------------------------------------------------------------


def test_parse_models_reads_every_field_and_defaults() -> None:
    specs = parse_models(
        json.dumps(
            {
                "small": {"path": "/models/small", "dtype": "bfloat16", "device": "cpu"},
                "qwen-0.5b": {"path": "~/m"},
            }
        )
    )
    assert specs["small"] == ModelSpec(name="small", path=Path("/models/small"), dtype="bfloat16", device="cpu")
    assert specs["qwen-0.5b"].dtype == "float32"
    assert specs["qwen-0.5b"].device == "auto"
    assert specs["qwen-0.5b"].path == Path("~/m").expanduser()
    assert parse_models("") == {}
    assert parse_models("  ") == {}


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('{"small": {"path": "/m", "dtype": "int8"}}', "models.small.dtype"),
        ('{"small": {"path": "/m", "device": "tpu"}}', "models.small.device"),
        ('{"small": {"dtype": "float32"}}', "models.small.path"),
        ('{"small": {"path": ""}}', "models.small.path"),
        ('{"small": {"path": "/m", "colour": "red"}}', "models.small.colour"),
        ('{"small": "/m"}', "models.small"),
        ('{"bad name!": {"path": "/m"}}', "models.bad name!"),
        ('["small"]', "models"),
        ("{not json", "models"),
    ],
)
def test_parse_models_names_the_bad_key(text: str, key: str) -> None:
    with pytest.raises(ValueError, match="^" + key.replace(".", r"\.").replace("!", "!") + ":"):
        parse_models(text)


def test_spec_and_errors_import_without_torch() -> None:
    code = (
        "import sys, memos.kv, memos.kv.spec, memos.kv.errors; "
        "sys.exit(1 if {'torch', 'transformers', 'safetensors'} & set(sys.modules) else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_error_tree_carries_what_the_service_reports() -> None:
    mismatch = FingerprintMismatch(expected="a" * 64, actual="b" * 64)
    assert (mismatch.expected, mismatch.actual) == ("a" * 64, "b" * 64)
    assert "a" * 64 in str(mismatch)
    assert "b" * 64 in str(mismatch)
    refused = NotShiftable("dynamic NTK")
    assert refused.reason == "dynamic NTK"
    assert "dynamic NTK" in str(refused)
    for cls in (KVFormatError, KVChecksumError, FingerprintMismatch, NotShiftable):
        assert issubclass(cls, KVError)


# --- codec -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_exact(dtype: torch.dtype) -> None:
    chunk = make_chunk(dtype=dtype)
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    meta = KVMeta(**{**{f: getattr(META, f) for f in META.__slots__}, "dtype": name})
    data = encode(chunk, meta)
    back, back_meta = decode(data, expect_fingerprint=FP)
    assert back_meta == meta
    assert back.layers == 3
    assert back.tokens == 5
    assert back.nbytes == chunk.nbytes == 2 * 3 * 2 * 5 * 8 * dtype.itemsize
    for a, b in zip(chunk.keys + chunk.values, back.keys + back.values, strict=True):
        assert a.dtype == b.dtype
        assert torch.equal(a, b)
    assert torch.equal(back.token_ids, chunk.token_ids)
    assert torch.equal(back.positions, chunk.positions)


def test_file_is_plain_safetensors_with_the_documented_names_and_metadata() -> None:
    data = encode(make_chunk(layers=2), META)
    tensors = st_load(data)
    assert set(tensors) == {"k.0", "k.1", "v.0", "v.1", "token_ids", "positions"}
    assert tensors["k.0"].shape == (2, 5, 8)
    assert tensors["token_ids"].dtype == torch.int64
    meta = read_meta(data)
    assert meta == {
        "format": "memos-kv/1",
        "fingerprint": FP,
        "model": "tiny",
        "memory_id": "m-1",
        "version": "3",
        "dtype": "float32",
        "created_at": "2025-01-02T03:04:05Z",
        "payload_sha256": hashlib.sha256(data[header_end(data) :]).hexdigest(),
    }
    assert codec.payload_sha256(data) == meta["payload_sha256"]


def test_views_of_a_larger_cache_encode() -> None:
    # A chunk sliced out of a bigger tensor shares its storage, which safetensors refuses as is.
    big = torch.randn(2, 2, 9, 8)
    chunk = KVChunk(
        keys=[big[0, :, 2:7]],
        values=[big[1, :, 2:7]],
        token_ids=torch.arange(5, dtype=torch.int64),
        positions=torch.arange(2, 7, dtype=torch.int64),
    )
    back, _ = decode(encode(chunk, META))
    assert torch.equal(back.keys[0], big[0, :, 2:7])
    assert torch.equal(back.positions, chunk.positions)


def test_a_flipped_payload_byte_is_a_checksum_error() -> None:
    data = bytearray(encode(make_chunk(), META))
    data[header_end(bytes(data)) + 17] ^= 0x01
    with pytest.raises(KVChecksumError):
        decode(bytes(data))
    # verify=False skips the hash (the caller vouches for the bytes): the damage goes unnoticed.
    chunk, _ = decode(bytes(data), verify=False)
    assert chunk.tokens == 5


@pytest.mark.parametrize("keep", [0, 5, 8, 40, -1, -100])
def test_truncated_files_are_format_errors(keep: int) -> None:
    data = encode(make_chunk(), META)
    with pytest.raises(KVFormatError):
        decode(data[:keep])


def test_stray_bytes_after_the_tensors_are_refused() -> None:
    with pytest.raises(KVFormatError, match="stray"):
        decode(encode(make_chunk(), META) + b"\0")


def test_implausible_header_length_is_refused_without_reading_it() -> None:
    with pytest.raises(KVFormatError, match="header length"):
        read_meta((2**60).to_bytes(8, "little") + b"{}")


@pytest.mark.parametrize("where", ["top", "offsets"])
def test_a_header_integer_too_long_for_python_is_a_format_error(where: str) -> None:
    """json.loads raises a plain ValueError (not a JSONDecodeError) for an integer of more than 4300 digits:
    the import answered 500 (found in review)."""
    huge = b"1" * 5000
    if where == "top":
        header = b'{"__metadata__":{"format":"memos-kv/1"},"x":' + huge + b"}"
    else:
        header = b'{"k.0":{"dtype":"F32","shape":[1],"data_offsets":[0,' + huge + b"]}}"
    data = len(header).to_bytes(8, "little") + header
    for read in (read_meta, decode):
        with pytest.raises(KVFormatError, match="integer too long"):
            read(data)


def test_wrong_fingerprint_is_a_mismatch_with_both_values() -> None:
    data = encode(make_chunk(), META)
    other = "cd" * 32
    with pytest.raises(FingerprintMismatch) as caught:
        decode(data, expect_fingerprint=other)
    assert caught.value.expected == other
    assert caught.value.actual == FP


@pytest.mark.parametrize("fingerprint", ["nope", "", "AB" * 32, "ab" * 31, "ab" * 33, "ab" * 32 + "\n"])
def test_a_malformed_fingerprint_is_a_format_error_naming_the_key(fingerprint: str) -> None:
    """Not a mismatch: a value that is no SHA-256 names no model (the service answers 422 on it, not 409)."""
    data = forge(tensors_of(make_chunk()), fingerprint=fingerprint)
    for read in (read_meta, lambda d: decode(d, expect_fingerprint=FP)):
        with pytest.raises(KVFormatError, match="64 lowercase hex digits") as caught:
            read(data)
        assert caught.value.key == "fingerprint"


def test_a_plain_safetensors_file_is_not_memos_kv() -> None:
    chunk = make_chunk()
    with pytest.raises(KVFormatError, match="metadata"):
        decode(st_save(tensors_of(chunk)))
    with pytest.raises(KVFormatError, match="format"):
        decode(forge(tensors_of(chunk), format="memos-kv/2"))
    with pytest.raises(KVFormatError):
        read_meta(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")


@pytest.mark.parametrize("drop", ["positions", "token_ids", "v.1", "k.0"])
def test_missing_tensors_are_format_errors(drop: str) -> None:
    tensors = tensors_of(make_chunk())
    del tensors[drop]
    with pytest.raises(KVFormatError):
        decode(forge(tensors))


def test_missing_metadata_key_is_a_format_error() -> None:
    data = forge(tensors_of(make_chunk()))
    header = json.loads(data[8 : header_end(data)])
    del header["__metadata__"]["created_at"]
    raw = json.dumps(header).encode()
    with pytest.raises(KVFormatError, match="created_at"):
        decode(len(raw).to_bytes(8, "little") + raw + data[header_end(data) :])


@pytest.mark.parametrize(
    "damage",
    [
        "other_kv_heads",
        "other_head_dim",
        "other_tokens",
        "short_positions",
        "float_token_ids",
        "mixed_dtypes",
        "two_d_keys",
        "extra_tensor",
        "dtype_lies",
        "layer_gap",
    ],
)
def test_inconsistent_shapes_and_dtypes_are_format_errors(damage: str) -> None:
    tensors = tensors_of(make_chunk())
    overrides: dict[str, str] = {}
    if damage == "other_kv_heads":
        tensors["k.1"] = torch.randn(3, 5, 8)
        tensors["v.1"] = torch.randn(3, 5, 8)
    elif damage == "other_head_dim":
        tensors["v.2"] = torch.randn(2, 5, 4)
    elif damage == "other_tokens":
        tensors["k.0"] = torch.randn(2, 6, 8)
    elif damage == "short_positions":
        tensors["positions"] = torch.arange(4, dtype=torch.int64)
    elif damage == "float_token_ids":
        tensors["token_ids"] = tensors["token_ids"].float()
    elif damage == "mixed_dtypes":
        tensors["v.0"] = tensors["v.0"].half()
    elif damage == "two_d_keys":
        tensors = {name: t for name, t in tensors.items() if not name.startswith(("k.", "v."))}
        tensors |= {"k.0": torch.randn(5, 8), "v.0": torch.randn(5, 8)}
    elif damage == "extra_tensor":
        tensors["pickle"] = torch.zeros(1)
    elif damage == "dtype_lies":
        overrides["dtype"] = "bfloat16"
    elif damage == "layer_gap":
        tensors["k.3"] = tensors.pop("k.2")
        tensors["v.3"] = tensors.pop("v.2")
    with pytest.raises(KVFormatError):
        decode(forge(tensors, **overrides))


def test_encode_refuses_an_inconsistent_chunk() -> None:
    chunk = make_chunk()
    chunk.values[1] = torch.randn(2, 4, 8)
    with pytest.raises(KVFormatError, match=r"v\.1"):
        encode(chunk, META)
    with pytest.raises(KVFormatError, match="dtype"):
        encode(make_chunk(), KVMeta(**{**{f: getattr(META, f) for f in META.__slots__}, "dtype": "bfloat16"}))


def test_decoding_never_unpickles(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle used while decoding")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    chunk, meta = decode(encode(make_chunk(), META), expect_fingerprint=FP)
    assert meta.version == 3
    assert chunk.layers == 3


def test_a_tensor_name_ending_in_a_newline_is_a_format_error() -> None:
    """``k.0\\n`` passed the layer-name check (its ``$`` matches before a trailing newline) and decoding then
    failed with a KeyError: a 500 from an import (found in review)."""
    tensors = tensors_of(make_chunk())
    tensors["k.0\n"] = tensors.pop("k.0")
    with pytest.raises(KVFormatError, match="unexpected tensor"):
        decode(forge(tensors), expect_fingerprint=FP)
    # The SDK's own reader had the same check (found in the second look).
    with pytest.raises(sdk_kv.KVError, match="unexpected tensor"):
        sdk_kv.read_kv(forge(tensors))


def test_a_model_name_ending_in_a_newline_is_refused() -> None:
    """The name check's ``$`` matched before a trailing newline: a configured name could end in one, and names go
    into headers, log lines and cursors."""
    with pytest.raises(ValueError, match="a model name is"):
        parse_models('{"small\\n": {"path": "/m"}}')
