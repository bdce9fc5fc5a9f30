"""``memos admin export`` / ``import``: a cube as one file (``memos-bundle/1``), to back it up, move it to
another deployment or copy it within one.

A bundle is a zip archive of fixed members, read by name and never extracted:

- ``manifest.json``: the format, the cube (id, name, description, metadata), the vectors' width, counts, what
  was left out, and each other member's size and SHA-256.
- ``memories.jsonl``: a line per memory, its current state as the ``memories`` table holds it.
- ``versions.jsonl``: a line per version, every version of every memory (history and provenance).
- ``links.jsonl``: links whose two ends are both in the bundle (explicit, provenance, ``next``, ``knn``, ...).
- ``cache.json`` and ``cache_entries.jsonl``: the semantic cache's configuration, learned per-category
  thresholds and counters, and its per-entry state (context hash, threshold, hit counts).
- ``vectors.safetensors``: float32 tensors ``memories``, ``versions`` and ``contexts``; a line's ``vector``
  is its row there (null: no embedding). safetensors, never pickle: a bundle is data, not code.

Left out: KV activations (memories of kind ``activation``: model-bound caches of another memory's text,
rebuilt with ``POST /v1/memories/{id}/activations`` from the imported memories) and links with an end
outside the cube or on an activation, both counted in the manifest; grants and API keys (agents belong to a
deployment) and the audit log (the export and the import each write a row of their own).

An export refuses to write a bundle the import would refuse (a cube ``memos admin verify`` finds damaged in
what the bundle carries, or lines the import's checks refuse) unless told to (``--allow-damaged``, said again
on stderr): a backup that cannot be restored should be found when it is written, not when it is needed.

An import reads and checks the whole bundle before it writes anything (checksums, every line against its
schema, the references between lines, the vectors' width), then writes the cube in one transaction, which
runs verify's embedding and purge checks on the rows written before it commits: everything lands or nothing
does. Ids are kept by default, so clients that know them keep working after a
move; ``new_ids`` gives the cube, its memories and links fresh ids (a copy beside the original), with
``derived_from`` references inside the bundle rewritten to match. Who wrote each version (``created_by``)
is kept as the bundle says: provenance is history, even where the agent does not exist in this
deployment. Memories keep the embedding model that embedded them; when it is not this deployment's,
``memos admin reembed`` re-embeds them (search leaves them out until then, decisions 72).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import uuid
import zipfile
import zlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec
import numpy as np
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors
from sqlalchemy import Row, any_, bindparam, insert, select
from sqlalchemy.dialects.postgresql import ARRAY, UUID
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from memos.admin import AdminError
from memos.admin.verify import Verified, check_rows
from memos.cubes.schemas import Description, Name
from memos.errors import Invalid
from memos.identity.principal import OPERATOR
from memos.memories.ann import EXACT_CUBE_MAX
from memos.memories.schemas import MAX_VERSION, LinkType, Provenance, Tags
from memos.memories.versioning import SNAPSHOT, content_sha256
from memos.semcache.policy import PolicyError, parse_category, parse_policy
from memos.semcache.schemas import Category, cached_answer_problems
from memos.store.audit import record
from memos.store.db import Database
from memos.store.models import (
    EMBEDDING_DIMS,
    MEMORY_ROW,
    agents,
    cache_categories,
    cache_configs,
    cache_entries,
    cubes,
    memories,
    memory_links,
    memory_versions,
)
from memos.validation import reject_nul

FORMAT = "memos-bundle/1"
MANIFEST = "manifest.json"
MEMBERS = (
    "memories.jsonl",
    "versions.jsonl",
    "links.jsonl",
    "cache.json",
    "cache_entries.jsonl",
    "vectors.safetensors",
)
MAX_MEMBER_BYTES = 8 * 2**30
"""A member larger than this (uncompressed) is refused before it is read: the bundle is read into memory."""
MAX_BUNDLE_BYTES = 16 * 2**30
"""All the members together (uncompressed, as the manifest gives them, which bounds each read), refused past
this before any is read: a bundle is held in memory whole while it is checked, and each member's own limit
let six of them add up to 48 GiB. Twice a member's limit: room for a cube whose memories and versions are
each near it, on a host that can hold that much."""
CHUNK = 1000
"""Rows per insert statement (all in the import's one transaction)."""

Op = Literal["create", "update", "restore", "delete"]
StoredKind = Literal["plaintext", "response"]
State = Literal["active", "archived", "deleted"]
# The values a line may hold are those the API and the columns accept: a bundle is checked as strictly as a
# request (anyone can recompute its hashes, so they show damage, not intent).
When = Annotated[datetime, msgspec.Meta(tz=True)]
Version = Annotated[int, msgspec.Meta(ge=1, le=MAX_VERSION)]
Count = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Number = Annotated[float, msgspec.Meta(ge=-1e12, le=1e12)]
Row_ = Annotated[int, msgspec.Meta(ge=0)]
MAX_MANIFEST_BYTES = 2**20
MAX_RATIO = 200
"""A member over ``RATIO_FLOOR`` that inflates more than this many times its compressed size is refused unread
(a zip bomb). Export stores such a member uncompressed, so an export always imports."""
RATIO_FLOOR = 64 * 2**20
"""Members up to this size are read whatever their ratio: real text can compress past it (a 460 KB memory of
one repeated sentence: 300 times, and its bundle was refused), and six of them cost 384 MiB at worst."""


L = TypeVar("L", bound=msgspec.Struct)


class BundleError(AdminError):
    """A bundle that cannot be read or imported (or a cube that cannot be exported): what, and where."""


# -- the lines of the bundle's members ---------------------------------------------------------------------


class MemoryLine(msgspec.Struct, forbid_unknown_fields=True):
    id: uuid.UUID
    kind: StoredKind
    state: State
    version: Version
    content: str | None
    metadata: dict[str, Any]
    tags: Tags
    provenance: dict[str, Any]
    content_sha256: str | None
    created_at: When
    updated_at: When
    expires_at: When | None
    created_by: uuid.UUID
    heat: Annotated[float, msgspec.Meta(ge=0, le=1e12)]
    purged_at: When | None
    embedding_model: str | None
    event_time: When | None
    vector: Row_ | None


class VersionLine(msgspec.Struct, forbid_unknown_fields=True):
    memory_id: uuid.UUID
    version: Version
    op: Op
    state: State
    content: str | None
    metadata: dict[str, Any]
    tags: Tags
    provenance: dict[str, Any]
    content_sha256: str | None
    expires_at: When | None
    created_at: When
    created_by: uuid.UUID
    embedding_model: str | None
    event_time: When | None
    vector: Row_ | None


class LinkLine(msgspec.Struct, forbid_unknown_fields=True):
    id: uuid.UUID
    from_id: uuid.UUID
    to_id: uuid.UUID
    type: LinkType
    weight: Annotated[float, msgspec.Meta(ge=0, le=1000)]
    to_version: Version | None
    created_at: When
    created_by: uuid.UUID


class CacheEntryLine(msgspec.Struct, forbid_unknown_fields=True):
    memory_id: uuid.UUID
    context_sha256: str | None
    vector: Row_ | None
    threshold: Number | None
    hits: Count
    false_hits: Count
    last_hit_at: When | None
    updated_at: When


class CacheCategory(msgspec.Struct, forbid_unknown_fields=True):
    category: Category
    """The API's type; _check applies the rest of its rule (not only spaces)."""
    threshold: Number | None
    false_hit_floor: Number
    hits: Count
    misses: Count
    false_hits: Count
    correct_hits: Count
    evicted: Count
    updated_at: When


class CacheState(msgspec.Struct, forbid_unknown_fields=True):
    config: dict[str, Any] | None
    """The cube's cache configuration as its owner wrote it; None: the defaults."""
    categories: list[CacheCategory]


class CubeInfo(msgspec.Struct, forbid_unknown_fields=True):
    id: uuid.UUID
    name: Name
    description: Description
    metadata: dict[str, Any]
    created_at: When


class MemberInfo(msgspec.Struct, forbid_unknown_fields=True):
    bytes: Annotated[int, msgspec.Meta(ge=0, le=MAX_MEMBER_BYTES)]
    sha256: str


class Manifest(msgspec.Struct, forbid_unknown_fields=True):
    format: str
    exported_at: When
    cube: CubeInfo
    dims: int
    counts: dict[str, int]
    left_out: dict[str, int]
    """What the export did not carry (``activations``, ``links_outside``), so an operator knows."""
    members: dict[str, MemberInfo]


@dataclasses.dataclass(slots=True)
class Bundle:
    """A bundle read and checked: ready to import."""

    manifest: Manifest
    memories: list[MemoryLine]
    versions: list[VersionLine]
    links: list[LinkLine]
    cache: CacheState
    cache_entries: list[CacheEntryLine]
    vectors: dict[str, np.ndarray]


@dataclasses.dataclass(slots=True)
class BundleReport:
    cube_id: uuid.UUID
    name: str
    memories: int
    versions: int
    links: int
    cache_entries: int
    left_out: dict[str, int]
    models: dict[str, int]
    """Embedded memories by the model that embedded them."""
    damage: str | None = None
    """Export only: why ``memos admin import`` would refuse the bundle, written all the same (``allow_damaged``)."""


# -- export --------------------------------------------------------------------------------------------------


CARRIED = ("content_hash", "version_hash", "version_chain", "embedding", "purge", "cache_entry")
"""``memos admin verify``'s checks of what a bundle carries (memories, versions, cache entries): damage any of
them finds is refused by the import, by its line checks or by the verify checks it runs before its commit.
Tenancy and KV damage stay behind: the import writes every row in its owner's tenant, and carries no KV."""


async def export_cube(db: Database, cube_id: uuid.UUID, out: Path, *, allow_damaged: bool = False) -> BundleReport:
    """Write cube ``cube_id`` (any tenant's: this is the operator's tool) to ``out`` as a bundle.

    The rows are read in one REPEATABLE READ transaction, so the bundle is one consistent moment of the cube
    even while clients write to it. The file is written beside ``out`` and renamed into place at the end.

    A bundle ``import_bundle`` would refuse (the cube is damaged: ``CARRIED``; or its lines fail the import's
    checks) is not written, ``BundleError`` saying why, unless ``allow_damaged``: then the report's ``damage``
    says it. A backup found unusable only when it is needed is worse than an export that fails."""
    async with db.snapshot() as conn:
        cube = (
            await conn.execute(select(cubes).where(cubes.c.id == cube_id, cubes.c.deleted_at.is_(None)))
        ).one_or_none()
        if cube is None:
            raise BundleError(f"no such cube: {cube_id}")
        rows = (
            await conn.execute(
                select(*MEMORY_ROW).where(memories.c.cube_id == cube_id).order_by(memories.c.created_at, memories.c.id)
            )
        ).all()
        kept = [r for r in rows if r.kind != "activation"]
        ids = [r.id for r in kept]
        exported = select(memories.c.id).where(memories.c.cube_id == cube_id, memories.c.kind != "activation")
        version_rows = (
            await conn.execute(
                select(memory_versions)
                .where(memory_versions.c.memory_id.in_(exported))
                .order_by(memory_versions.c.memory_id, memory_versions.c.version)
            )
        ).all()
        # Every link that touches the cube: those with an end elsewhere (or on an activation) are counted.
        link_rows = (
            await conn.execute(
                select(memory_links)
                .where(
                    memory_links.c.from_id.in_(select(memories.c.id).where(memories.c.cube_id == cube_id))
                    | memory_links.c.to_id.in_(select(memories.c.id).where(memories.c.cube_id == cube_id))
                )
                .order_by(memory_links.c.created_at, memory_links.c.id)
            )
        ).all()
        config = (
            await conn.execute(select(cache_configs.c.config).where(cache_configs.c.cube_id == cube_id))
        ).scalar_one_or_none()
        category_rows = (
            await conn.execute(
                select(cache_categories)
                .where(cache_categories.c.cube_id == cube_id)
                .order_by(cache_categories.c.category)
            )
        ).all()
        entry_rows = (
            await conn.execute(
                select(cache_entries).where(cache_entries.c.memory_id.in_(exported)).order_by(cache_entries.c.memory_id)
            )
        ).all()
        # In the same snapshot: the damage of the rows being exported, in verify's own statements and names.
        found = Verified()
        await check_rows(conn, found, [cube_id], only=CARRIED)

    inside = set(ids)
    links = [r for r in link_rows if r.from_id in inside and r.to_id in inside]
    memory_vectors = _Vectors()
    version_vectors = _Vectors()
    context_vectors = _Vectors()
    memory_lines = [_line(MemoryLine, r, vector=memory_vectors.add(r.embedding)) for r in kept]
    version_lines = [_line(VersionLine, r, vector=version_vectors.add(r.embedding)) for r in version_rows]
    link_lines = [_line(LinkLine, r) for r in links]
    entry_lines = [_line(CacheEntryLine, r, vector=context_vectors.add(r.context_embedding)) for r in entry_rows]
    cache = CacheState(config=config, categories=[_line(CacheCategory, r) for r in category_rows])
    blobs = {
        "memories.jsonl": _jsonl(memory_lines),
        "versions.jsonl": _jsonl(version_lines),
        "links.jsonl": _jsonl(link_lines),
        "cache.json": msgspec.json.encode(cache),
        "cache_entries.jsonl": _jsonl(entry_lines),
        "vectors.safetensors": save_tensors(
            {
                "memories": memory_vectors.matrix(),
                "versions": version_vectors.matrix(),
                "contexts": context_vectors.matrix(),
            }
        ),
    }
    left_out = {"activations": len(rows) - len(kept), "links_outside": len(link_rows) - len(links)}
    manifest = Manifest(
        format=FORMAT,
        exported_at=datetime.now(UTC),
        cube=CubeInfo(
            id=cube.id,
            name=cube.name,
            description=cube.description,
            metadata=cube.metadata,
            created_at=cube.created_at,
        ),
        dims=EMBEDDING_DIMS,
        counts={
            "memories": len(memory_lines),
            "versions": len(version_lines),
            "links": len(link_lines),
            "cache_entries": len(entry_lines),
        },
        left_out=left_out,
        members={
            name: MemberInfo(bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest()) for name, blob in blobs.items()
        },
    )
    damage = _damage(cube_id, found, manifest, blobs)
    if damage is not None and not allow_damaged:
        raise BundleError(
            f"{damage}: nothing written (repair the cube and export again, or --allow-damaged writes it anyway)"
        )
    partial = out.with_name(out.name + ".partial")
    try:
        # Readable by its owner only (it holds every memory's text; a plain open gave 0644 under the usual
        # umask), and made here, not reused: another export to the same file, or a symlink left in its place,
        # is refused rather than written through.
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise BundleError(
            f"cannot write {out}: {partial} exists (another export to it is running, or one was killed: remove it)"
        ) from None
    except OSError as exc:
        raise BundleError(f"cannot write {out}: {exc}") from None
    try:
        with os.fdopen(fd, "wb") as file, zipfile.ZipFile(file, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(MANIFEST, msgspec.json.format(msgspec.json.encode(manifest)))
            for name, blob in blobs.items():
                archive.writestr(name, blob, compress_type=_compression(blob))
        partial.replace(out)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise BundleError(f"cannot write {out}: {exc}") from None
    async with db.transaction() as conn:
        await record(
            conn,
            OPERATOR,
            "cube.export",
            "cube",
            cube_id,
            tenant_id=cube.tenant_id,
            detail={**manifest.counts, "left_out": left_out, **({"damage": damage} if damage else {})},
        )
    return BundleReport(
        cube_id=cube_id,
        name=cube.name,
        memories=len(memory_lines),
        versions=len(version_lines),
        links=len(link_lines),
        cache_entries=len(entry_lines),
        left_out=left_out,
        models=_models(memory_lines),
        damage=damage,
    )


def _damage(cube_id: uuid.UUID, found: Verified, manifest: Manifest, blobs: dict[str, bytes]) -> str | None:
    """Why an import would refuse the bundle of these members (None: it would not), on one line."""
    refused = "`memos admin import` refuses a bundle that carries it"
    if found.counts:
        counted = ", ".join(f"{n} {check}" for check, n in found.counts.items())
        return f"cube {cube_id} is damaged (`memos admin verify --cube {cube_id}` names the rows: {counted}); {refused}"
    # What verify does not check (values past the API's limits, a cache setting it now refuses): read back as
    # the import reads it. Costs a second decoding of the lines; the members are in memory already.
    try:
        _bundle(_decode(Manifest, msgspec.json.encode(manifest), MANIFEST), blobs)
    except BundleError as exc:
        return f"`memos admin import` would refuse the bundle of cube {cube_id}: {exc}"
    return None


def _line(kind: type[L], row: Row[Any], **given: Any) -> L:
    """A line of ``kind`` from a table row: each field from the column of its name, unless ``given``."""
    return kind(**{name: given[name] if name in given else getattr(row, name) for name in kind.__struct_fields__})


def _values(line: msgspec.Struct, **given: Any) -> dict[str, Any]:
    """A line's fields as column values (``vector`` is a row of a tensor, not a column), with ``given`` over them."""
    values = {name: getattr(line, name) for name in line.__struct_fields__ if name != "vector"}
    return {**values, **given}


class _Vectors:
    """Collects the vectors of one tensor; ``add`` gives a vector's row (None for no vector)."""

    def __init__(self) -> None:
        self._rows: list[np.ndarray] = []

    def add(self, vector: Any) -> int | None:
        if vector is None:
            return None
        self._rows.append(np.asarray(vector, dtype=np.float32))
        return len(self._rows) - 1

    def matrix(self) -> np.ndarray:
        if not self._rows:
            return np.zeros((0, EMBEDDING_DIMS), dtype=np.float32)
        return np.stack(self._rows)


def _jsonl(lines: Iterable[msgspec.Struct]) -> bytes:
    encoder = msgspec.json.Encoder()
    buffer = bytearray()
    for line in lines:
        encoder.encode_into(line, buffer, -1)
        buffer += b"\n"
    return bytes(buffer)


def _models(lines: Iterable[MemoryLine]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for line in lines:
        if line.vector is not None and line.embedding_model is not None:
            counts[line.embedding_model] += 1
    return dict(counts)


# -- reading and checking a bundle ---------------------------------------------------------------------------


def read_bundle(path: Path) -> Bundle:
    """Read ``path`` and check it whole (see the module docstring); ``BundleError`` says what is wrong."""
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise BundleError(f"{path}: not a readable memos bundle (zip): {exc}") from None
    with archive:
        manifest = _decode(Manifest, _member(archive, MANIFEST, MAX_MANIFEST_BYTES), MANIFEST)
        if manifest.format != FORMAT:
            raise BundleError(f"{MANIFEST}: format {manifest.format!r}; this memos reads {FORMAT!r}")
        if manifest.dims != EMBEDDING_DIMS:
            raise BundleError(
                f"{MANIFEST}: vectors of {manifest.dims} dimensions; this deployment stores {EMBEDDING_DIMS}"
            )
        missing = [name for name in MEMBERS if name not in manifest.members]
        if missing:
            raise BundleError(f"{MANIFEST}: no entry for member {missing[0]}")
        total = sum(manifest.members[name].bytes for name in MEMBERS)
        if total > MAX_BUNDLE_BYTES:
            raise BundleError(f"{MANIFEST}: members of {total} bytes in all, over the {MAX_BUNDLE_BYTES} read")
        blobs: dict[str, bytes] = {}
        for name in MEMBERS:
            info = manifest.members[name]
            # The manifest's size bounds the read: a member is never inflated past what the export wrote.
            blob = _member(archive, name, info.bytes)
            if len(blob) != info.bytes or hashlib.sha256(blob).hexdigest() != info.sha256:
                raise BundleError(f"{name}: does not match its size and SHA-256 in the manifest (damaged or edited)")
            blobs[name] = blob
    return _bundle(manifest, blobs)


def _bundle(manifest: Manifest, blobs: dict[str, bytes]) -> Bundle:
    """The members (past their sizes and hashes) read and checked: what an import reads, and what an export
    checks it wrote."""
    try:
        vectors = load_tensors(blobs["vectors.safetensors"])
    except Exception as exc:  # safetensors raises its own error types for a malformed header
        raise BundleError(f"vectors.safetensors: not readable: {exc}") from None
    bundle = Bundle(
        manifest=manifest,
        memories=_lines(MemoryLine, blobs["memories.jsonl"], "memories.jsonl"),
        versions=_lines(VersionLine, blobs["versions.jsonl"], "versions.jsonl"),
        links=_lines(LinkLine, blobs["links.jsonl"], "links.jsonl"),
        cache=_decode(CacheState, blobs["cache.json"], "cache.json"),
        cache_entries=_lines(CacheEntryLine, blobs["cache_entries.jsonl"], "cache_entries.jsonl"),
        vectors=vectors,
    )
    _check(bundle)
    return bundle


def _compression(blob: bytes) -> int:
    """How export writes a member: deflated, unless that would make ``_member`` refuse it (then stored).

    Deflates it as zipfile does (raw, zlib's default level), counting the output only, and stops as soon as
    the count shows the ratio is fine: for ordinary text that is after the first few percent."""
    if len(blob) <= RATIO_FLOOR:
        return zipfile.ZIP_DEFLATED
    enough = len(blob) / MAX_RATIO  # deflated to more than this: the import reads it
    deflate = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
    view, size = memoryview(blob), 0
    for start in range(0, len(view), 2**24):
        size += len(deflate.compress(view[start : start + 2**24]))
        if size >= enough:
            return zipfile.ZIP_DEFLATED
    size += len(deflate.flush())
    return zipfile.ZIP_DEFLATED if size >= enough else zipfile.ZIP_STORED


def _member(archive: zipfile.ZipFile, name: str, most: int) -> bytes:
    """The member's bytes, if its header says at most ``most`` and, past ``RATIO_FLOOR``, it inflates no more than
    ``MAX_RATIO`` times."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise BundleError(f"the bundle has no {name}") from None
    if info.file_size > most:
        raise BundleError(f"{name}: {info.file_size} bytes, over the {most} expected (damaged or edited)")
    if info.file_size > RATIO_FLOOR and info.file_size > MAX_RATIO * info.compress_size:
        raise BundleError(f"{name}: inflates {info.file_size} bytes from {info.compress_size}: refused unread")
    try:
        with archive.open(info) as stream:
            # One byte more than declared: a member that inflates past its header's size is refused.
            blob = stream.read(info.file_size + 1)
    except (OSError, zipfile.BadZipFile, EOFError, zlib.error, RuntimeError, NotImplementedError) as exc:
        # RuntimeError: an encrypted member; NotImplementedError: a compression zipfile lacks.
        raise BundleError(f"{name}: cannot be read: {exc}") from None
    if len(blob) != info.file_size:
        raise BundleError(f"{name}: its size does not match the archive's header")
    return blob


def _decode(kind: type[L], blob: bytes, where: str) -> L:
    return _parsed(msgspec.json.Decoder(kind), blob, where)


def _lines(kind: type[L], blob: bytes, where: str) -> list[L]:
    decoder = msgspec.json.Decoder(kind)
    return [
        _parsed(decoder, line, f"{where} line {number}")
        for number, line in enumerate(io.BytesIO(blob), start=1)
        if line.strip()
    ]


def _parsed(decoder: msgspec.json.Decoder[L], data: bytes, where: str) -> L:
    """One JSON value of the decoder's type, or ``BundleError`` naming ``where``; no NUL in any text (Postgres
    stores none, and the API refuses it)."""
    try:
        value = decoder.decode(data)
        # No depth limit: a bundle's records wrap the metadata the API let in (a RecursionError is caught below).
        reject_nul(msgspec.to_builtins(value), "", limit_depth=False)
    except msgspec.ValidationError as exc:
        raise BundleError(f"{where}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise BundleError(f"{where}: not JSON: {exc}") from None
    except RecursionError:
        raise BundleError(f"{where}: nested too deep") from None
    except Invalid:
        raise BundleError(f"{where}: text may not contain the NUL character (\\u0000)") from None
    return value


def _check(bundle: Bundle) -> None:
    """The references between the members: whatever an import would trip over, found before it writes."""
    m = bundle.manifest
    got = {
        "memories": len(bundle.memories),
        "versions": len(bundle.versions),
        "links": len(bundle.links),
        "cache_entries": len(bundle.cache_entries),
    }
    for name, count in got.items():
        if m.counts.get(name) != count:
            raise BundleError(f"{MANIFEST}: counts.{name} is {m.counts.get(name)}, the bundle holds {count}")
    for name in ("memories", "versions", "contexts"):
        matrix = bundle.vectors.get(name)
        if matrix is None:
            raise BundleError(f"vectors.safetensors: no tensor {name!r}")
        if matrix.dtype != np.float32 or matrix.ndim != 2 or matrix.shape[1] != m.dims:
            raise BundleError(
                f"vectors.safetensors: {name} is {matrix.dtype} {matrix.shape}, not float32 [n, {m.dims}]"
            )
        if not np.isfinite(matrix).all():
            raise BundleError(f"vectors.safetensors: {name} holds a value that is not a finite number")

    def row(where: str, index: int | None, tensor: str) -> None:
        if index is not None and not 0 <= index < len(bundle.vectors[tensor]):
            raise BundleError(f"{where}: vector {index} is not a row of {tensor} ({len(bundle.vectors[tensor])} rows)")

    versions: dict[uuid.UUID, dict[int, VersionLine]] = defaultdict(dict)
    for i, v in enumerate(bundle.versions, start=1):
        where = f"versions.jsonl line {i}"
        row(where, v.vector, "versions")
        _check_hash(where, v.content, v.content_sha256)
        _check_provenance(where, v.provenance)
        if v.version in versions[v.memory_id]:
            raise BundleError(f"{where}: version {v.version} of memory {v.memory_id} appears twice")
        if (v.version == 1) != (v.op == "create"):
            raise BundleError(f"{where}: version {v.version} has op {v.op!r}: a memory's first version, only, creates")
        versions[v.memory_id][v.version] = v
    ids: set[uuid.UUID] = set()
    for i, mem in enumerate(bundle.memories, start=1):
        where = f"memories.jsonl line {i}"
        if mem.id in ids:
            raise BundleError(f"{where}: memory {mem.id} appears twice")
        ids.add(mem.id)
        row(where, mem.vector, "memories")
        _check_hash(where, mem.content, mem.content_sha256)
        _check_provenance(where, mem.provenance)
        history = versions.get(mem.id, {})
        if sorted(history) != list(range(1, mem.version + 1)):
            raise BundleError(
                f"{where}: memory {mem.id} is at version {mem.version} but its versions are not 1..{mem.version}"
            )
        _check_current(where, mem, history[mem.version], bundle.vectors)
        if mem.kind == "response":  # every version: a restore makes an old one current
            for n, version in sorted(history.items()):
                _check_cached_answer(f"{where} (version {n})", version.metadata)
    strays = versions.keys() - ids
    if strays:
        raise BundleError(
            f"versions.jsonl: versions of {len(strays)} memories the bundle does not hold, e.g. {min(strays)}"
        )
    seen_links: set[tuple[uuid.UUID, uuid.UUID, str]] = set()
    for i, link in enumerate(bundle.links, start=1):
        where = f"links.jsonl line {i}"
        for end in (link.from_id, link.to_id):
            if end not in ids:
                raise BundleError(f"{where}: links memory {end}, which the bundle does not hold")
        if link.from_id == link.to_id:
            raise BundleError(f"{where}: memory {link.from_id} links to itself")
        key = (link.from_id, link.to_id, link.type)
        if key in seen_links:
            raise BundleError(f"{where}: a second {link.type!r} link from {link.from_id} to {link.to_id}")
        seen_links.add(key)
    entries: set[uuid.UUID] = set()
    kinds = {mem.id: mem.kind for mem in bundle.memories}
    for i, entry in enumerate(bundle.cache_entries, start=1):
        where = f"cache_entries.jsonl line {i}"
        if kinds.get(entry.memory_id) != "response":
            raise BundleError(f"{where}: memory {entry.memory_id} is not a cached answer (kind response) of the bundle")
        if entry.memory_id in entries:
            raise BundleError(f"{where}: a second entry for memory {entry.memory_id}")
        entries.add(entry.memory_id)
        row(where, entry.vector, "contexts")
    if len({c.category for c in bundle.cache.categories}) != len(bundle.cache.categories):
        raise BundleError("cache.json: a category appears twice")
    for i, category in enumerate(bundle.cache.categories):
        try:
            # The API's rule for a name (parse_category checks the name first; no settings, nothing else).
            parse_category(category.category, {})
        except PolicyError as exc:
            raise BundleError(f"cache.json: categories[{i}]: {category.category[:40]!r}: {exc.message}") from None
    if bundle.cache.config is not None:
        try:
            parse_policy(bundle.cache.config)
        except PolicyError as exc:
            raise BundleError(f"cache.json: config.{exc.field}: {exc.message}") from None


def _check_cached_answer(where: str, metadata: dict[str, Any]) -> None:
    """The API's limits on a cached answer's query and context: a lookup reads both, so their size is its cost."""
    if problems := cached_answer_problems(metadata):
        key, why = problems[0]
        raise BundleError(f"{where}: metadata.{key}: {why}")


def _check_provenance(where: str, provenance: dict[str, Any]) -> None:
    """Provenance as the API writes it: code that reads it back (a later PATCH, say) relies on its shape."""
    try:
        msgspec.convert(provenance, Provenance)
    except msgspec.ValidationError as exc:
        raise BundleError(f"{where}: provenance: {exc}") from None


_CURRENT = tuple(c for c in SNAPSHOT if c != "embedding")
"""What a memory's row holds of its newest version: they must agree (the API keeps them equal)."""


def _check_current(where: str, mem: MemoryLine, newest: VersionLine, vectors: dict[str, np.ndarray]) -> None:
    for name in _CURRENT:
        if getattr(mem, name) != getattr(newest, name):
            raise BundleError(f"{where}: {name} differs from the memory's version {mem.version}")
    if mem.vector is None or newest.vector is None:
        same = mem.vector is None and newest.vector is None
    else:
        same = bool(np.array_equal(vectors["memories"][mem.vector], vectors["versions"][newest.vector]))
    if not same:
        raise BundleError(f"{where}: embedding differs from the memory's version {mem.version}")


def _check_hash(where: str, content: str | None, stated: str | None) -> None:
    if content is not None and stated != content_sha256(content):
        raise BundleError(f"{where}: content_sha256 does not match the content")


# -- import --------------------------------------------------------------------------------------------------


async def import_bundle(
    db: Database,
    bundle: Bundle,
    *,
    owner: uuid.UUID,
    name: str | None = None,
    new_ids: bool = False,
    dry_run: bool = False,
) -> BundleReport:
    """Write ``bundle`` (from ``read_bundle``) as a cube owned by agent ``owner``, in its tenant, in one
    transaction. ``name`` replaces the bundle's cube name; ``new_ids``: fresh ids (a copy); ``dry_run``: check
    everything, including what the database already holds, then roll back."""
    ids = _id_map(bundle, new_ids)
    cube_id = ids[bundle.manifest.cube.id]
    cube_name = name if name is not None else bundle.manifest.cube.name
    try:
        msgspec.convert(cube_name, Name)
        reject_nul(cube_name, "name")
    except (msgspec.ValidationError, Invalid) as exc:
        raise BundleError(f"--name: {cube_name!r} is not a cube name: {exc}") from None
    report = BundleReport(
        cube_id=cube_id,
        name=cube_name,
        memories=len(bundle.memories),
        versions=len(bundle.versions),
        links=len(bundle.links),
        cache_entries=len(bundle.cache_entries),
        left_out=dict(bundle.manifest.left_out),
        models=_models(bundle.memories),
    )
    try:
        async with db.transaction() as conn:
            tenant_id = await _owner_tenant(conn, owner)
            await _check_free(conn, tenant_id, cube_name, ids, bundle)
            await _write(conn, bundle, ids, tenant_id=tenant_id, owner=owner, cube_id=cube_id, cube_name=cube_name)
            await _check_written(conn, bundle, ids, cube_id)
            await record(
                conn,
                OPERATOR,
                "cube.import",
                "cube",
                cube_id,
                tenant_id=tenant_id,
                detail={
                    "from_cube": str(bundle.manifest.cube.id),
                    "exported_at": bundle.manifest.exported_at.isoformat(),
                    "new_ids": new_ids,
                    "memories": report.memories,
                    "versions": report.versions,
                    "links": report.links,
                },
            )
            if dry_run:
                await conn.rollback()
    except DBAPIError as exc:
        # _check_free looked first; this is a writer that took a name or id since, or a value the checks let
        # through that a column refuses. (A lost connection is Unavailable, raised by the transaction.)
        raise BundleError(f"the database refused the import, nothing was written: {exc.orig}") from None
    return report


_VERIFIED = ("embedding", "purge")
"""Rules of ``memos admin verify`` that ``_check`` does not hold the lines to (a vector without its model or
the reverse, a live plaintext memory with no vector, a purged memory that keeps its text): run on the rows
just written, before the commit, with verify's own statements, so the two tools cannot drift apart."""


async def _check_written(
    conn: AsyncConnection, bundle: Bundle, ids: dict[uuid.UUID, uuid.UUID], cube_id: uuid.UUID
) -> None:
    found = Verified()
    await check_rows(conn, found, [cube_id], only=_VERIFIED)
    if found.problems:
        first = found.problems[0]
        # The rows carry the ids they were written with: name the memory as the bundle does, and its line.
        lines = {str(ids[m.id]): f"memories.jsonl line {i}: memory {m.id}" for i, m in enumerate(bundle.memories, 1)}
        raise BundleError(
            f"{lines.get(first.target, first.target)}: {first.detail} (`memos admin verify` calls it "
            f"{first.check} damage; {sum(found.counts.values())} such problems in all)"
        )


def _id_map(bundle: Bundle, new_ids: bool) -> dict[uuid.UUID, uuid.UUID]:
    """Every id of the bundle (cube, memories, links) to the id it is written with."""
    old = [bundle.manifest.cube.id, *(m.id for m in bundle.memories), *(link.id for link in bundle.links)]
    return {i: (uuid.uuid4() if new_ids else i) for i in old}


async def _owner_tenant(conn: AsyncConnection, owner: uuid.UUID) -> uuid.UUID:
    tenant_id: uuid.UUID | None = (
        await conn.execute(select(agents.c.tenant_id).where(agents.c.id == owner))
    ).scalar_one_or_none()
    if tenant_id is None:
        raise BundleError(f"no such agent: {owner} (--owner names the agent that will own the cube)")
    return tenant_id


async def _check_free(
    conn: AsyncConnection, tenant_id: uuid.UUID, name: str, ids: dict[uuid.UUID, uuid.UUID], bundle: Bundle
) -> None:
    taken = (
        await conn.execute(
            select(cubes.c.id).where(cubes.c.tenant_id == tenant_id, cubes.c.name == name, cubes.c.deleted_at.is_(None))
        )
    ).first()
    if taken is not None:
        raise BundleError(f"the tenant already has a cube named {name!r} (give another with --name)")
    cube_id = ids[bundle.manifest.cube.id]
    if (await conn.execute(select(cubes.c.id).where(cubes.c.id == cube_id))).first() is not None:
        raise BundleError(f"cube {cube_id} exists in this deployment (import a copy with --new-ids)")
    memory_ids = [ids[m.id] for m in bundle.memories]
    present = (
        await conn.execute(select(memories.c.id).where(memories.c.id == _any(memory_ids)).limit(1))
    ).scalar_one_or_none()
    if present is not None:
        raise BundleError(f"memory {present} exists in this deployment (import a copy with --new-ids)")
    link_ids = [ids[link.id] for link in bundle.links]
    present = (
        await conn.execute(select(memory_links.c.id).where(memory_links.c.id == _any(link_ids)).limit(1))
    ).scalar_one_or_none()
    if present is not None:
        raise BundleError(f"link {present} exists in this deployment (import a copy with --new-ids)")


def _any(values: Sequence[uuid.UUID]) -> Any:
    return any_(bindparam("ids", list(values), type_=ARRAY(UUID(as_uuid=True))))


async def _write(
    conn: AsyncConnection,
    bundle: Bundle,
    ids: dict[uuid.UUID, uuid.UUID],
    *,
    tenant_id: uuid.UUID,
    owner: uuid.UUID,
    cube_id: uuid.UUID,
    cube_name: str,
) -> None:
    info = bundle.manifest.cube
    await conn.execute(
        insert(cubes).values(
            id=cube_id,
            tenant_id=tenant_id,
            name=cube_name,
            description=info.description,
            metadata=info.metadata,
            owner_agent_id=owner,
            created_at=info.created_at,
        )
    )
    vectors = bundle.vectors
    # A cube past the size has its embedded memories in the HNSW index (memos.memories.ann), as a write would.
    ann = sum(m.vector is not None for m in bundle.memories) >= EXACT_CUBE_MAX

    def vector(tensor: str, index: int | None) -> np.ndarray | None:
        return None if index is None else vectors[tensor][index]

    await _insert(
        conn,
        memories,
        (
            _values(
                m,
                id=ids[m.id],
                tenant_id=tenant_id,
                cube_id=cube_id,
                provenance=_remap_provenance(m.provenance, ids),
                embedding=vector("memories", m.vector),
                ann=ann and m.vector is not None,
            )
            for m in bundle.memories
        ),
    )
    await _insert(
        conn,
        memory_versions,
        (
            _values(
                v,
                memory_id=ids[v.memory_id],
                provenance=_remap_provenance(v.provenance, ids),
                embedding=vector("versions", v.vector),
            )
            for v in bundle.versions
        ),
    )
    await _insert(
        conn,
        memory_links,
        (
            _values(link, id=ids[link.id], tenant_id=tenant_id, from_id=ids[link.from_id], to_id=ids[link.to_id])
            for link in bundle.links
        ),
    )
    if bundle.cache.config is not None:
        await conn.execute(insert(cache_configs).values(cube_id=cube_id, config=bundle.cache.config, updated_by=owner))
    await _insert(conn, cache_categories, (_values(c, cube_id=cube_id) for c in bundle.cache.categories))
    await _insert(
        conn,
        cache_entries,
        (
            _values(e, memory_id=ids[e.memory_id], cube_id=cube_id, context_embedding=vector("contexts", e.vector))
            for e in bundle.cache_entries
        ),
    )


async def _insert(conn: AsyncConnection, table: Any, rows: Iterable[dict[str, Any]]) -> None:
    chunk: list[dict[str, Any]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == CHUNK:
            await conn.execute(insert(table), chunk)
            chunk = []
    if chunk:
        await conn.execute(insert(table), chunk)


def _remap_provenance(provenance: dict[str, Any], ids: dict[uuid.UUID, uuid.UUID]) -> dict[str, Any]:
    """``derived_from`` references to memories of the bundle, rewritten to their new ids (others kept: they
    name memories outside the cube, as history)."""
    refs = provenance.get("derived_from")
    if not isinstance(refs, list) or not refs:
        return provenance
    out = []
    for ref in refs:
        if isinstance(ref, dict) and isinstance(ref.get("memory_id"), str):
            try:
                old = uuid.UUID(ref["memory_id"])
            except ValueError:
                old = None
            if old is not None and old in ids:
                ref = {**ref, "memory_id": str(ids[old])}
        out.append(ref)
    return {**provenance, "derived_from": out}
