"""The ``memos-kv/1`` file: one memory's KV cache as safetensors, with its model identity and a checksum.

Layout (a plain safetensors file, readable by any safetensors library):

- ``k.{layer}``, ``v.{layer}``: keys and values, ``[kv_heads, tokens, head_dim]``, one dtype for all;
- ``token_ids``: int64 ``[tokens]``, the tokens the KV was computed for;
- ``positions``: int64 ``[tokens]``, the positions the keys were rotated for;
- ``__metadata__``: ``format`` (``memos-kv/1``), ``fingerprint``, ``model``, ``memory_id``, ``version``,
  ``dtype``, ``created_at`` (RFC 3339) and ``payload_sha256``: the SHA-256 of every byte after the header,
  so a copy can be verified wherever it travels.

Decoding never unpickles: safetensors parses a JSON header and copies raw little-endian buffers.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from memos.kv.errors import FingerprintMismatch, KVChecksumError, KVFormatError

if TYPE_CHECKING:
    from transformers import DynamicCache, PretrainedConfig

FORMAT = "memos-kv/1"

KV_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The dtypes keys and values may have, by the name the metadata uses."""

METADATA_KEYS = ("format", "fingerprint", "model", "memory_id", "version", "dtype", "created_at", "payload_sha256")
"""Every ``__metadata__`` key a ``memos-kv/1`` file carries, all required."""

MAX_HEADER_BYTES = 100 * 1024 * 1024
"""safetensors' own cap on the JSON header; a larger length prefix is a corrupt or hostile file."""

_MAX_VERSION_DIGITS = 18  # fits int64; memory versions stop at 2**31 - 1

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_LAYER_NAME = re.compile(r"^([kv])\.(0|[1-9][0-9]*)$")


@dataclass(slots=True)
class KVChunk:
    """The KV of a run of tokens: per layer ``[kv_heads, tokens, head_dim]`` keys and values (batch of one)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    token_ids: torch.Tensor
    """int64 ``[tokens]``."""
    positions: torch.Tensor
    """int64 ``[tokens]``: the positions the keys were rotated for."""

    @property
    def tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def layers(self) -> int:
        return len(self.keys)

    @property
    def kv_heads(self) -> int:
        return int(self.keys[0].shape[0])

    @property
    def head_dim(self) -> int:
        return int(self.keys[0].shape[-1])

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the keys and values (2 x layers x kv_heads x tokens x head_dim x dtype size)."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def check(self) -> None:
        """Raise :class:`KVFormatError` unless the tensors have consistent shapes and dtypes."""
        _check_structure(self)

    def clone(self) -> KVChunk:
        """A deep copy: changing it never changes this chunk."""
        return KVChunk(
            keys=[k.clone() for k in self.keys],
            values=[v.clone() for v in self.values],
            token_ids=self.token_ids.clone(),
            positions=self.positions.clone(),
        )

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> KVChunk:
        """The same chunk on ``device`` (and in ``dtype``); tensors already there are shared, not copied."""
        return KVChunk(
            keys=[k.to(device=device, dtype=dtype) for k in self.keys],
            values=[v.to(device=device, dtype=dtype) for v in self.values],
            token_ids=self.token_ids.to(device),
            positions=self.positions.to(device),
        )

    def to_cache(self, config: PretrainedConfig | None = None) -> DynamicCache:
        """A new transformers ``DynamicCache`` holding copies of this chunk's tensors (``[1, kv_heads, T, hd]``).

        The cache's layers concatenate on update, so generating with it never writes into this chunk.
        ``config`` lets the cache pick sliding-window layers the way the model's own would.
        """
        from transformers import DynamicCache

        cache = DynamicCache(
            [(k.unsqueeze(0), v.unsqueeze(0)) for k, v in zip(self.keys, self.values, strict=True)], config=config
        )
        # DynamicLayer.update concatenates onto an empty tensor, which copies; should a transformers
        # version ever keep the tensor it is given, copy here so a stored cache is never written to.
        layers: list[Any] = list(cache.layers)
        for layer, k, v in zip(layers, self.keys, self.values, strict=True):
            if layer.keys.data_ptr() == k.data_ptr() or layer.values.data_ptr() == v.data_ptr():
                layer.keys, layer.values = layer.keys.clone(), layer.values.clone()
        return cache

    @classmethod
    def from_cache(cls, cache: Any, token_ids: torch.Tensor, positions: torch.Tensor) -> KVChunk:
        """Take the KV out of a transformers cache filled by one forward pass of a batch of one."""
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        for layer in cache.layers:
            keys.append(layer.keys[0])
            values.append(layer.values[0])
        return cls(keys=keys, values=values, token_ids=token_ids, positions=positions)


@dataclass(frozen=True, slots=True)
class KVMeta:
    """What a ``memos-kv/1`` file says about itself, besides the tensors."""

    fingerprint: str
    model: str
    memory_id: str
    version: int
    dtype: str
    created_at: str
    """RFC 3339 timestamp of the build."""


def _dtype_name(dtype: torch.dtype) -> str:
    for name, value in KV_DTYPES.items():
        if value == dtype:
            return name
    raise KVFormatError(f"KV dtype must be one of {', '.join(KV_DTYPES)}, not {dtype}")


def _check_structure(chunk: KVChunk) -> None:
    if not chunk.keys or len(chunk.keys) != len(chunk.values):
        raise KVFormatError(
            f"need one key and one value tensor per layer, got {len(chunk.keys)} and {len(chunk.values)}"
        )
    for name, ids in (("token_ids", chunk.token_ids), ("positions", chunk.positions)):
        if ids.dtype != torch.int64 or ids.dim() != 1:
            raise KVFormatError(f"{name} must be int64 [tokens], got {ids.dtype} {list(ids.shape)}")
    tokens = int(chunk.token_ids.shape[0])
    if tokens == 0:
        raise KVFormatError("a KV chunk needs at least one token")
    if int(chunk.positions.shape[0]) != tokens:
        raise KVFormatError(f"positions has {int(chunk.positions.shape[0])} entries for {tokens} tokens")
    first = chunk.keys[0]
    if first.dim() != 3:
        raise KVFormatError(f"k.0 must be [kv_heads, tokens, head_dim], got {list(first.shape)}")
    _dtype_name(first.dtype)
    expected = (int(first.shape[0]), tokens, int(first.shape[2]))
    for layer, (k, v) in enumerate(zip(chunk.keys, chunk.values, strict=True)):
        for kind, t in (("k", k), ("v", v)):
            if tuple(t.shape) != expected:
                raise KVFormatError(f"{kind}.{layer} has shape {list(t.shape)}, expected {list(expected)}")
            if t.dtype != first.dtype:
                raise KVFormatError(f"{kind}.{layer} is {t.dtype}, expected {first.dtype} like k.0")


def _for_save(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().to("cpu")
    # safetensors refuses views and tensors that share storage; a slice of a larger cache is both.
    if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def _split(data: bytes | bytearray | memoryview) -> tuple[dict[str, Any], int]:
    """Parse the safetensors header: (the header object, offset where the tensor bytes start)."""
    view = memoryview(data)
    if len(view) < 8:
        raise KVFormatError(f"truncated: {len(view)} bytes is too short for a safetensors header")
    size = int.from_bytes(view[:8], "little")
    if size > MAX_HEADER_BYTES:
        raise KVFormatError(f"header length {size} is not plausible: not a safetensors file")
    if 8 + size > len(view):
        raise KVFormatError(f"truncated: the header needs {size} bytes, {len(view) - 8} remain")
    try:
        header = json.loads(bytes(view[8 : 8 + size]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KVFormatError(f"the header is not JSON: {exc}") from None
    except ValueError:
        # The plain ValueError int() raises for an integer of more than 4300 digits (Python's limit on converting
        # text to int): the file's fault, not a 500 (found in review).
        raise KVFormatError("the header holds an integer too long to read (over 4300 digits)") from None
    except RecursionError:
        # A header of arrays nested thousands deep exhausts the parser's stack: the file's fault, not a 500.
        raise KVFormatError("the header's JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise KVFormatError("the header is not a JSON object")
    return header, 8 + size


def _metadata(header: Mapping[str, Any]) -> dict[str, str]:
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise KVFormatError("no __metadata__ of strings: not a memos-kv file")
    fmt = meta.get("format")
    if fmt != FORMAT:
        raise KVFormatError(f"format is {fmt!r}, expected {FORMAT!r}", key="format")
    missing = [key for key in METADATA_KEYS if key not in meta]
    if missing:
        raise KVFormatError(f"metadata lacks {', '.join(missing)}", key=missing[0])
    if not _SHA256.fullmatch(meta["fingerprint"]):
        # A fingerprint is a SHA-256: anything else is a malformed file (422), not KV of another model (409).
        raise KVFormatError(
            f"fingerprint {meta['fingerprint'][:80]!r} is not 64 lowercase hex digits", key="fingerprint"
        )
    if meta["dtype"] not in KV_DTYPES:
        raise KVFormatError(f"metadata dtype {meta['dtype']!r} is not one of {', '.join(KV_DTYPES)}", key="dtype")
    if not _SHA256.fullmatch(meta["payload_sha256"]):
        raise KVFormatError("payload_sha256 is not 64 lowercase hex digits", key="payload_sha256")
    if not (meta["version"].isascii() and meta["version"].isdigit()):
        raise KVFormatError(f"version {meta['version'][:80]!r} is not a non-negative integer", key="version")
    if len(meta["version"]) > _MAX_VERSION_DIGITS:
        # int() refuses over 4300 digits with a ValueError (a 500), and no memory version comes near 18.
        raise KVFormatError(f"version has {len(meta['version'])} digits; at most {_MAX_VERSION_DIGITS}", key="version")
    return dict(meta)


def _payload_end(header: Mapping[str, Any]) -> int:
    """Bytes of tensor data the header describes (the largest end offset)."""
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise KVFormatError(f"tensor {name!r} has no valid data_offsets")
        end = max(end, offsets[1])
    return end


def encode(chunk: KVChunk, meta: KVMeta) -> bytes:
    """Serialize ``chunk`` as ``memos-kv/1`` bytes. ``meta.dtype`` must name the tensors' dtype."""
    _check_structure(chunk)
    dtype = _dtype_name(chunk.dtype)
    if meta.dtype != dtype:
        raise KVFormatError(f"metadata says dtype {meta.dtype!r} but the tensors are {dtype}")
    tensors: dict[str, torch.Tensor] = {}
    for layer, (k, v) in enumerate(zip(chunk.keys, chunk.values, strict=True)):
        tensors[f"k.{layer}"] = _for_save(k)
        tensors[f"v.{layer}"] = _for_save(v)
    tensors["token_ids"] = _for_save(chunk.token_ids)
    tensors["positions"] = _for_save(chunk.positions)
    metadata = {
        "format": FORMAT,
        "fingerprint": meta.fingerprint,
        "model": meta.model,
        "memory_id": meta.memory_id,
        "version": str(meta.version),
        "dtype": dtype,
        "created_at": meta.created_at,
        # The checksum covers the tensor bytes, which do not depend on the header, so a placeholder of the
        # same length is written first and replaced in place: offsets stay valid and nothing is serialized twice.
        "payload_sha256": "0" * 64,
    }
    from safetensors.torch import save

    draft = bytearray(save(tensors, metadata=metadata))
    _, start = _split(draft)
    digest = hashlib.sha256(memoryview(draft)[start:]).hexdigest()
    placeholder = b'"payload_sha256":"' + b"0" * 64 + b'"'
    at = draft.find(placeholder, 8, start)
    if at < 0 or draft.find(placeholder, at + 1, start) >= 0:
        raise RuntimeError("safetensors wrote the header in an unexpected form; cannot place the checksum")
    draft[at : at + len(placeholder)] = b'"payload_sha256":"' + digest.encode("ascii") + b'"'
    return bytes(draft)


def relabel(data: bytes, memory_id: str, version: int, created_at: str) -> bytes:
    """``data`` with its header naming ``memory_id`` at ``version``, made at ``created_at``; the tensor bytes and
    their checksum unchanged. A file already naming them is returned as it is.

    One stored file serves every activation of its tenant with the same KV (api.md, "Stored once"), but its
    header names the memory it was first built for: served as stored, it would show that memory's id to a
    reader of another cube, and when it was built (a security review found the time). So the header says the
    caller's activation, and holds the format's keys only. The header is not covered by ``payload_sha256``,
    so only it is written again."""
    header, start = _split(data)
    meta = _metadata(header)
    if meta["memory_id"] == memory_id and meta["version"] == str(version):
        return data
    own = {"memory_id": memory_id, "version": str(version), "created_at": created_at}
    header["__metadata__"] = {key: own.get(key, meta[key]) for key in METADATA_KEYS}
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # as safetensors pads it: the tensor bytes start 8-aligned
    return b"".join((len(text).to_bytes(8, "little"), text, memoryview(data)[start:]))  # one copy of the tensors


def read_meta(data: bytes | bytearray | memoryview) -> dict[str, str]:
    """The ``__metadata__`` of a ``memos-kv/1`` file, validated, without touching the tensor bytes."""
    header, _ = _split(data)
    return _metadata(header)


def payload_sha256(data: bytes | bytearray | memoryview) -> str:
    """SHA-256 of the bytes after the header: what ``payload_sha256`` should say."""
    _, start = _split(data)
    return hashlib.sha256(memoryview(data)[start:]).hexdigest()


def decode(
    data: bytes | bytearray | memoryview, *, expect_fingerprint: str | None = None, verify: bool = True
) -> tuple[KVChunk, KVMeta]:
    """Parse and check a ``memos-kv/1`` file.

    Raises :class:`KVFormatError` (not memos-kv/1, bad header, truncated, wrong tensor names, shapes
    or dtypes), :class:`KVChecksumError` (``verify`` and the tensor bytes do not match
    ``payload_sha256``) and :class:`FingerprintMismatch` (``expect_fingerprint`` differs).
    """
    header, start = _split(data)
    meta = _metadata(header)
    end = _payload_end(header)
    available = len(memoryview(data)) - start
    if end > available:
        raise KVFormatError(f"truncated: the tensors need {end} bytes after the header, {available} remain")
    if end < available:
        raise KVFormatError(f"{available - end} stray bytes after the tensors")
    if verify and hashlib.sha256(memoryview(data)[start:]).hexdigest() != meta["payload_sha256"]:
        raise KVChecksumError("the tensor bytes do not match payload_sha256: the file was altered or damaged")
    names = set(header) - {"__metadata__"}
    layer_ids: dict[str, set[int]] = {"k": set(), "v": set()}
    for name in names - {"token_ids", "positions"}:
        match = _LAYER_NAME.fullmatch(name)  # match: `$` let "k.0\n" through, then a KeyError (a 500)
        if match is None:
            raise KVFormatError(f"unexpected tensor {name!r}")
        layer_ids[match.group(1)].add(int(match.group(2)))
    layers = len(layer_ids["k"])
    for required in ("token_ids", "positions"):
        if required not in names:
            raise KVFormatError(f"missing tensor {required!r}")
    if layers == 0 or layer_ids["k"] != set(range(layers)) or layer_ids["v"] != set(range(layers)):
        raise KVFormatError("tensors k.0..k.{n-1} and v.0..v.{n-1} must all be present, one pair per layer")

    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(bytes(data) if not isinstance(data, bytes) else data)
    except (SafetensorError, ValueError, TypeError) as exc:
        raise KVFormatError(f"not a readable safetensors file: {exc}") from None
    chunk = KVChunk(
        keys=[tensors[f"k.{i}"] for i in range(layers)],
        values=[tensors[f"v.{i}"] for i in range(layers)],
        token_ids=tensors["token_ids"],
        positions=tensors["positions"],
    )
    _check_structure(chunk)
    if _dtype_name(chunk.dtype) != meta["dtype"]:
        raise KVFormatError(f"metadata says dtype {meta['dtype']!r} but the tensors are {chunk.dtype}")
    if expect_fingerprint is not None and meta["fingerprint"] != expect_fingerprint:
        raise FingerprintMismatch(expected=expect_fingerprint, actual=meta["fingerprint"])
    kv_meta = KVMeta(
        fingerprint=meta["fingerprint"],
        model=meta["model"],
        memory_id=meta["memory_id"],
        version=int(meta["version"]),
        dtype=meta["dtype"],
        created_at=meta["created_at"],
    )
    return chunk, kv_meta
