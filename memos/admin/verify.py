"""``memos admin verify``: check that what is stored still agrees with itself. Reads only, in one
REPEATABLE READ transaction (one consistent view while the service keeps writing).

Each check is a statement that returns the rows breaking one rule, at most ``SHOWN`` of them with the
total. The rules are the ones the write paths keep, so a problem means damage from outside them (a
manual edit, a restored backup of one table, a disk fault) or a bug:

- ``content_hash``, ``version_hash``: a text no longer hashes to its recorded ``content_sha256``;
- ``version_chain``: a memory's versions are not exactly 1..n, the first a ``create``, or the memory row
  is not its newest version (in every column a version copies: ``SNAPSHOT``);
- ``tenancy``: a memory, link, grant, cube owner, cache entry or activation that crosses tenants;
- ``embedding``: a vector without the model that made it, or the reverse, or a live plaintext memory
  with neither (search would never find it by meaning);
- ``cache_entry``: a cached-answer entry on a memory that is not a ``response`` or in another cube;
- ``kv_file``: an activation whose file is missing, of the wrong length, or (with ``blob_bytes``) whose
  bytes no longer hash to its key, or whose recorded key is not a blob key at all; ``kv_corrupt``: one that
  a read found corrupt and that was not rebuilt.

Stored files that nothing refers to are counted, not reported as problems: ``memos admin gc`` frees them.
Memories embedded by another model than the configured one are counted too (``memos admin reembed``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Collection, Sequence
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from memos.admin import require_cubes
from memos.memories.versioning import SNAPSHOT
from memos.store.blobs import BlobCorrupt, BlobNotFound, BlobStore, is_key
from memos.store.db import Database

SHOWN = 20
"""Offending rows shown per check (the total is counted)."""

# The columns a version copies from the memory (constant names from the code, never input): the memory row
# must equal its newest version in each.
_DIFFERS = " OR ".join(f"v.{c} IS DISTINCT FROM m.{c}" for c in SNAPSHOT)
_WHICH = ", ".join(f"CASE WHEN v.{c} IS DISTINCT FROM m.{c} THEN '{c}' END" for c in SNAPSHOT)

_CHAIN_HEAD = """WITH chain AS (
                SELECT memory_id, count(*) AS n, min(version) AS first, max(version) AS last,
                       bool_or(version = 1 AND op = 'create') AS created,
                       count(*) FILTER (WHERE op = 'create') AS creates
                FROM memory_versions GROUP BY memory_id)
            SELECT m.id::text AS target,
                CASE WHEN c.memory_id IS NULL THEN 'no version rows'
                     WHEN c.first <> 1 OR c.n <> c.last THEN 'versions ' || c.first || '..' || c.last
                          || ' in ' || c.n || ' rows (a gap or a missing first version)'
                     WHEN NOT c.created OR c.creates <> 1 THEN 'the first version is not the only create'
                     WHEN c.last <> m.version THEN 'the memory says version ' || m.version
                          || ', its newest version row is ' || c.last
                     ELSE 'the memory row differs from its newest version in: ' || concat_ws(', ', """
_CHAIN_TAIL = """) END AS detail
            FROM memories m
            LEFT JOIN chain c ON c.memory_id = m.id
            LEFT JOIN memory_versions v ON v.memory_id = m.id AND v.version = m.version
            WHERE (CAST(:cubes AS uuid[]) IS NULL OR m.cube_id = ANY(:cubes))
              AND (c.memory_id IS NULL OR c.first <> 1 OR c.n <> c.last OR NOT c.created OR c.creates <> 1
                   OR c.last <> m.version OR """
_CHAIN_SQL = _CHAIN_HEAD + _WHICH + _CHAIN_TAIL + _DIFFERS + ")"

# Each: (check, SQL returning (target, detail) for the rows that break the rule). `:cubes` is NULL for
# every cube, else an array of cube ids. Constant SQL only; every value is a bound parameter.
_CHECKS: list[tuple[str, str]] = [
    (
        "content_hash",
        """SELECT m.id::text AS target, 'content hashes to ' || encode(sha256(convert_to(m.content, 'UTF8')), 'hex')
                || ', recorded ' || coalesce(m.content_sha256, 'nothing') AS detail
            FROM memories m
            WHERE m.content IS NOT NULL
              AND m.content_sha256 IS DISTINCT FROM encode(sha256(convert_to(m.content, 'UTF8')), 'hex')
              AND (CAST(:cubes AS uuid[]) IS NULL OR m.cube_id = ANY(:cubes))""",
    ),
    (
        "version_hash",
        """SELECT v.memory_id::text || ' v' || v.version AS target,
                'content hashes to ' || encode(sha256(convert_to(v.content, 'UTF8')), 'hex') || ', recorded '
                || coalesce(v.content_sha256, 'nothing') AS detail
            FROM memory_versions v JOIN memories m ON m.id = v.memory_id
            WHERE v.content IS NOT NULL
              AND v.content_sha256 IS DISTINCT FROM encode(sha256(convert_to(v.content, 'UTF8')), 'hex')
              AND (CAST(:cubes AS uuid[]) IS NULL OR m.cube_id = ANY(:cubes))""",
    ),
    ("version_chain", _CHAIN_SQL),
    (
        "tenancy",
        """SELECT m.id::text AS target, 'memory of tenant ' || m.tenant_id || ' in a cube of tenant '
                || c.tenant_id AS detail
            FROM memories m JOIN cubes c ON c.id = m.cube_id
            WHERE m.tenant_id <> c.tenant_id AND (CAST(:cubes AS uuid[]) IS NULL OR c.id = ANY(:cubes))
          UNION ALL
            SELECT c.id::text, 'cube of tenant ' || c.tenant_id || ' owned by an agent of tenant ' || a.tenant_id
            FROM cubes c JOIN agents a ON a.id = c.owner_agent_id
            WHERE a.tenant_id <> c.tenant_id AND (CAST(:cubes AS uuid[]) IS NULL OR c.id = ANY(:cubes))
          UNION ALL
            SELECT g.cube_id::text || ' -> ' || g.agent_id, 'grant to an agent of tenant ' || a.tenant_id
                || ' on a cube of tenant ' || c.tenant_id
            FROM cube_grants g JOIN cubes c ON c.id = g.cube_id JOIN agents a ON a.id = g.agent_id
            WHERE a.tenant_id <> c.tenant_id AND (CAST(:cubes AS uuid[]) IS NULL OR c.id = ANY(:cubes))
          UNION ALL
            SELECT l.id::text, 'link of tenant ' || l.tenant_id || ' from a memory of tenant ' || f.tenant_id
                || ' to one of tenant ' || t.tenant_id
            FROM memory_links l JOIN memories f ON f.id = l.from_id JOIN memories t ON t.id = l.to_id
            WHERE (l.tenant_id <> f.tenant_id OR l.tenant_id <> t.tenant_id)
              AND (CAST(:cubes AS uuid[]) IS NULL OR f.cube_id = ANY(:cubes) OR t.cube_id = ANY(:cubes))
          UNION ALL
            SELECT a.id::text, 'activation row of tenant ' || a.tenant_id || ', cube ' || a.cube_id
                || '; its memory: tenant ' || d.tenant_id || ', cube ' || d.cube_id || '; its source: tenant '
                || s.tenant_id
            FROM activations a JOIN memories d ON d.id = a.id JOIN memories s ON s.id = a.memory_id
            WHERE (a.tenant_id <> d.tenant_id OR a.cube_id <> d.cube_id OR s.tenant_id <> a.tenant_id)
              AND (CAST(:cubes AS uuid[]) IS NULL OR a.cube_id = ANY(:cubes))""",
    ),
    (
        "embedding",
        """SELECT m.id::text AS target,
                CASE WHEN m.embedding IS NULL AND m.embedding_model IS NOT NULL
                          THEN 'no vector, but embedding_model says ' || m.embedding_model
                     WHEN m.embedding IS NOT NULL AND m.embedding_model IS NULL
                          THEN 'a vector, but no embedding_model'
                     ELSE 'a live plaintext memory with no vector (search by meaning never finds it)' END AS detail
            FROM memories m
            WHERE m.purged_at IS NULL AND (CAST(:cubes AS uuid[]) IS NULL OR m.cube_id = ANY(:cubes))
              AND ((m.embedding IS NULL) <> (m.embedding_model IS NULL)
                   OR (m.embedding IS NULL AND m.kind = 'plaintext' AND m.state <> 'deleted'
                       AND m.content IS NOT NULL))""",
    ),
    (
        "purge",
        """SELECT m.id::text AS target, 'purged, but ' || CASE
                     WHEN m.content IS NOT NULL OR m.embedding IS NOT NULL OR m.event_time IS NOT NULL
                          OR m.metadata <> '{}' OR m.tags <> '{}' OR m.provenance <> '{}'
                          THEN 'the memory row keeps its text, vector, metadata, tags or provenance'
                     WHEN EXISTS (SELECT 1 FROM activations a WHERE a.memory_id = m.id)
                          THEN 'KV activations of its text are kept'
                     WHEN EXISTS (SELECT 1 FROM cache_entries e WHERE e.memory_id = m.id)
                          THEN 'its cache entry (a context embedding) is kept'
                     ELSE 'version rows keep their text, vector, metadata, tags or provenance' END AS detail
            FROM memories m
            WHERE m.purged_at IS NOT NULL AND (CAST(:cubes AS uuid[]) IS NULL OR m.cube_id = ANY(:cubes))
              AND (m.content IS NOT NULL OR m.embedding IS NOT NULL OR m.event_time IS NOT NULL
                   OR m.metadata <> '{}' OR m.tags <> '{}' OR m.provenance <> '{}'
                   OR EXISTS (SELECT 1 FROM activations a WHERE a.memory_id = m.id)
                   OR EXISTS (SELECT 1 FROM cache_entries e WHERE e.memory_id = m.id)
                   OR EXISTS (SELECT 1 FROM memory_versions v WHERE v.memory_id = m.id
                              AND (v.content IS NOT NULL OR v.embedding IS NOT NULL OR v.event_time IS NOT NULL
                                   OR v.metadata <> '{}' OR v.tags <> '{}' OR v.provenance <> '{}')))""",
    ),
    (
        "kv_row",
        """SELECT m.id::text AS target, 'a memory of kind activation with no activations row' AS detail
            FROM memories m
            WHERE m.kind = 'activation' AND NOT EXISTS (SELECT 1 FROM activations a WHERE a.id = m.id)
              AND (CAST(:cubes AS uuid[]) IS NULL OR m.cube_id = ANY(:cubes))""",
    ),
    (
        "cache_entry",
        """SELECT e.memory_id::text AS target,
                CASE WHEN m.kind <> 'response' THEN 'a cache entry on a ' || m.kind || ' memory'
                     ELSE 'a cache entry of cube ' || e.cube_id || ' on a memory of cube ' || m.cube_id END
            FROM cache_entries e JOIN memories m ON m.id = e.memory_id
            WHERE (m.kind <> 'response' OR m.cube_id <> e.cube_id)
              AND (CAST(:cubes AS uuid[]) IS NULL OR e.cube_id = ANY(:cubes) OR m.cube_id = ANY(:cubes))""",
    ),
    (
        "kv_corrupt",
        """SELECT a.id::text AS target, 'its file ' || a.sha256 || ' failed its checksum at ' || a.corrupt_at
                || ' and was not rebuilt' AS detail
            FROM activations a
            WHERE a.corrupt_at IS NOT NULL AND (CAST(:cubes AS uuid[]) IS NULL OR a.cube_id = ANY(:cubes))""",
    ),
]

_FILES = """
SELECT sha256, max(bytes) AS bytes, min(bytes) AS least, array_agg(id::text ORDER BY id) AS ids
FROM activations
WHERE (CAST(:cubes AS uuid[]) IS NULL OR cube_id = ANY(:cubes))
  AND (CAST(:keys AS text[]) IS NULL OR sha256 = ANY(:keys))
GROUP BY sha256 ORDER BY sha256
"""
"""The files the activations of ``:cubes`` refer to (NULL: every cube), or only ``:keys`` (NULL: all)."""

_MODELS = """
SELECT embedding_model AS model, count(*) AS n FROM memories
WHERE embedding_model IS NOT NULL AND (CAST(:cubes AS uuid[]) IS NULL OR cube_id = ANY(:cubes))
GROUP BY embedding_model ORDER BY embedding_model
"""


@dataclasses.dataclass
class Problem:
    check: str
    target: str
    detail: str


@dataclasses.dataclass
class Verified:
    problems: list[Problem] = dataclasses.field(default_factory=list)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    """Problems per check (all of them; ``problems`` holds at most ``SHOWN`` per check)."""
    checked: dict[str, int] = dataclasses.field(default_factory=dict)
    """What was looked at: memories, versions, activations, files (and files whose bytes were hashed)."""
    models: dict[str, int] = dataclasses.field(default_factory=dict)
    orphan_files: int = 0
    orphan_bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.counts

    def add(self, check: str, target: str, detail: str) -> None:
        self.counts[check] = self.counts.get(check, 0) + 1
        if self.counts[check] <= SHOWN:
            self.problems.append(Problem(check, target, detail))


async def verify(
    db: Database, store: BlobStore, *, cube_ids: Sequence[uuid.UUID] = (), blob_bytes: bool = False
) -> Verified:
    """Run every check; with ``blob_bytes``, read and hash every stored file too (slow: all the KV bytes)."""
    cubes = [str(c) for c in cube_ids] or None
    report = Verified()
    async with db.snapshot() as conn:
        await require_cubes(conn, cube_ids)
        await check_rows(conn, report, cube_ids)
        report.checked = await _sizes(conn, cubes)
        report.models = {r.model: r.n for r in await conn.execute(text(_MODELS), {"cubes": cubes})}
        files = (await conn.execute(text(_FILES), {"cubes": cubes, "keys": None})).all()
    report.checked["files"] = len(files)
    report.checked["files_hashed"] = len(files) if blob_bytes else 0
    suspects = await asyncio.to_thread(_check_files, store, files, blob_bytes)
    if suspects:
        # The files are looked at after the snapshot: a purge, drop or repair that committed meanwhile can make
        # a sound store look wrong. What the rows say now decides (a file still referenced, still wrong).
        async with db.read() as conn:
            now = (await conn.execute(text(_FILES), {"cubes": None, "keys": sorted(suspects)})).all()
        for target, detail in (await asyncio.to_thread(_check_files, store, now, blob_bytes)).values():
            report.add("kv_file", target, detail)
    if cubes is None:
        referenced = {f.sha256 for f in files}
        for blob in await asyncio.to_thread(lambda: list(store.blobs())):
            if blob.key not in referenced:
                report.orphan_files += 1
                report.orphan_bytes += blob.nbytes
    return report


async def check_rows(
    conn: AsyncConnection, report: Verified, cube_ids: Sequence[uuid.UUID] = (), only: Collection[str] | None = None
) -> None:
    """Add to ``report`` the rows of ``cube_ids`` (every cube: empty) breaking each row check (``only`` these).
    ``memos admin import`` runs some on the rows it wrote, before it commits: one statement of each rule."""
    cubes = [str(c) for c in cube_ids] or None
    for check, sql in _CHECKS:
        if only is None or check in only:
            for target, detail in await conn.execute(text(sql), {"cubes": cubes}):
                report.add(check, target, detail)


async def _sizes(conn: AsyncConnection, cubes: list[str] | None) -> dict[str, int]:
    row = (
        await conn.execute(
            text(
                "SELECT (SELECT count(*) FROM memories WHERE CAST(:cubes AS uuid[]) IS NULL OR cube_id = ANY(:cubes))"
                " AS memories, (SELECT count(*) FROM memory_versions v JOIN memories m ON m.id = v.memory_id"
                " WHERE CAST(:cubes AS uuid[]) IS NULL OR m.cube_id = ANY(:cubes)) AS versions,"
                " (SELECT count(*) FROM activations WHERE CAST(:cubes AS uuid[]) IS NULL OR cube_id = ANY(:cubes))"
                " AS activations"
            ),
            {"cubes": cubes},
        )
    ).one()
    return {"memories": row.memories, "versions": row.versions, "activations": row.activations}


def _check_files(store: BlobStore, files: Sequence[Any], blob_bytes: bool) -> dict[str, tuple[str, str]]:
    """Each referenced file: there, of the recorded length, and (``blob_bytes``) hashing to its key. The bad
    ones: key -> (target, what is wrong)."""
    bad: dict[str, tuple[str, str]] = {}
    for f in files:
        target = f"{f.sha256} (activation {', '.join(f.ids[:3])}{', ...' if len(f.ids) > 3 else ''})"
        if f.bytes != f.least:
            bad[f.sha256] = (target, f"activations disagree on its length ({f.least} and {f.bytes} bytes)")
            continue
        if not is_key(f.sha256):
            # A manual edit, a restored table: store.size raised ValueError on it, a traceback and exit 1 (as
            # if problems were listed) instead of this problem.
            bad[f.sha256] = (target, "not a blob key (a lowercase hex SHA-256): it names no stored file")
            continue
        try:
            size = store.size(f.sha256)
            if size != f.bytes:
                bad[f.sha256] = (target, f"{size} bytes stored, {f.bytes} recorded")
            elif blob_bytes:
                store.read(f.sha256, verify=True)
        except BlobCorrupt as exc:
            bad[f.sha256] = (target, f"its bytes hash to {exc.actual}")
        except BlobNotFound:
            bad[f.sha256] = (target, "missing from the blob store")
    return bad
