"""The relational schema, as SQLAlchemy Core tables.

Alembic (``memos/migrations/``) owns the schema in the database; these tables mirror
it for queries, and a test checks they agree. Services query through these
objects, so every value travels as a bound parameter.
"""

from __future__ import annotations

from typing import Any

from pgvector.sqlalchemy import Vector
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Computed,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
    func,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, TSVECTOR, UUID

EMBEDDING_DIMS = 384
"""Width of the ``embedding`` columns (all-MiniLM-L6-v2, the default embedder)."""

_TSV_TEXT = (
    "coalesce(metadata->>'speaker', '') || ' ' || coalesce(content, '') || ' ' || coalesce(metadata->>'time', '')"
)
TSV_EXPRESSION = f"to_tsvector('english'::regconfig, normalize({_TSV_TEXT}, NFKC))"
"""The generated full-text vector's expression (migration 0013), on a UTF8 database."""
TSV_EXPRESSION_NOT_UTF8 = f"to_tsvector('english'::regconfig, {_TSV_TEXT})"
"""Its expression on any other encoding, where ``normalize()`` cannot run (migration 0013 leaves it as 0002 made it)."""

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


def created_at() -> Column[Any]:
    return Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now())


tenants = Table(
    "tenants",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("name", Text, nullable=False, unique=True),
    created_at(),
)

agents = Table(
    "agents",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("tenant_id", UUID(as_uuid=True), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("name", Text, nullable=False),
    Column("role", Text, nullable=False),  # "admin" | "agent"
    created_at(),
    UniqueConstraint("tenant_id", "name"),
)

api_keys = Table(
    "api_keys",
    metadata,
    # The prefix is the public handle of a key (shown in listings, used to revoke it);
    # only the SHA-256 of the whole key is stored.
    Column("prefix", Text, primary_key=True),
    Column("agent_id", UUID(as_uuid=True), ForeignKey("agents.id", ondelete="CASCADE"), nullable=False),
    Column("key_hash", LargeBinary, nullable=False),
    created_at(),
    Column("revoked_at", DateTime(timezone=True)),
    Index(None, "agent_id"),
)

cubes = Table(
    "cubes",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("tenant_id", UUID(as_uuid=True), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("name", Text, nullable=False),
    Column("description", Text, nullable=False, server_default=""),
    Column("metadata", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("owner_agent_id", UUID(as_uuid=True), ForeignKey("agents.id"), nullable=False),
    created_at(),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("deleted_at", DateTime(timezone=True)),
    # A name is unique among a tenant's live cubes; a deleted cube frees its name.
    Index(
        "uq_cubes_tenant_id_name_live",
        "tenant_id",
        "name",
        unique=True,
        postgresql_where=text("deleted_at IS NULL"),
    ),
)

cube_grants = Table(
    "cube_grants",
    metadata,
    Column("cube_id", UUID(as_uuid=True), ForeignKey("cubes.id", ondelete="CASCADE"), nullable=False),
    Column("agent_id", UUID(as_uuid=True), ForeignKey("agents.id", ondelete="CASCADE"), nullable=False),
    Column("access", Text, nullable=False),  # "read" | "write"
    created_at(),
    PrimaryKeyConstraint("cube_id", "agent_id"),
    Index(None, "agent_id"),
)

memories = Table(
    "memories",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("tenant_id", UUID(as_uuid=True), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("cube_id", UUID(as_uuid=True), ForeignKey("cubes.id", ondelete="CASCADE"), nullable=False),
    Column("kind", Text, nullable=False),  # "plaintext" | "response" | "activation"
    Column("state", Text, nullable=False),  # "active" | "archived" | "deleted"
    Column("version", Integer, nullable=False),
    # Current content, denormalized from the latest version row; NULL once purged.
    Column("content", Text),
    Column("metadata", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("tags", ARRAY(Text), nullable=False, server_default=text("'{}'::text[]")),
    Column("provenance", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("content_sha256", Text),
    created_at(),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("expires_at", DateTime(timezone=True)),
    Column("created_by", UUID(as_uuid=True), nullable=False),
    # Heat as written before migration 0008 (or imported); the scheduler writes ``memory_heat`` instead.
    Column("heat", Float, nullable=False, server_default=text("0")),
    Column("purged_at", DateTime(timezone=True)),
    Column("embedding", Vector(EMBEDDING_DIMS)),
    Column("embedding_model", Text),
    # When the remembered event happened (metadata.time, normalized to UTC); None when not given.
    Column("event_time", DateTime(timezone=True)),
    # Generated by Postgres (migrations 0002, 0013): speaker + content + user-written time, NFKC-normalized (on a
    # UTF8 database), English config.
    Column("tsv", TSVECTOR, Computed(TSV_EXPRESSION, persisted=True)),
    # In the HNSW index (migration 0006): the memories of cubes past memos.memories.ann.EXACT_CUBE_MAX.
    Column("ann", Boolean, nullable=False, server_default=text("false")),
    Index(None, "cube_id", "created_at", "id"),
    Index(None, "tags", postgresql_using="gin"),
    Index(
        "ix_memories_embedding_hnsw",
        "embedding",
        postgresql_using="hnsw",
        postgresql_ops={"embedding": "vector_cosine_ops"},
        postgresql_where=text("ann"),
    ),
    Index("ix_memories_cube_id_ann", "cube_id", postgresql_where=text("ann")),
    Index("ix_memories_cube_id_exact", "cube_id", postgresql_where=text("NOT ann AND embedding IS NOT NULL")),
    Index("ix_memories_tsv", "tsv", postgresql_using="gin"),
    Index("ix_memories_cube_id_event_time", "cube_id", "event_time"),
    # The semantic cache reads a cube's response memories through this (migration 0003).
    Index("ix_memories_response_cube", "cube_id", "updated_at", postgresql_where=text("kind = 'response'")),
    # A graph's catch-up finds the memories changed since it last read (migration 0012); new ones (version 1)
    # come through (cube_id, created_at), so a create adds nothing to this index.
    Index("ix_memories_cube_id_changed", "cube_id", "updated_at", postgresql_where=text("version > 1")),
)

memory_heat = Table(
    "memory_heat",
    metadata,
    # The scheduler's heat per memory (migration 0008): narrow, so its writes do not rewrite memory rows.
    Column("memory_id", UUID(as_uuid=True), ForeignKey("memories.id", ondelete="CASCADE"), primary_key=True),
    Column("heat", Float, nullable=False),
    # When the value was true (migration 0009): a restart decays it by the time since.
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

HEAT = func.coalesce(
    select(memory_heat.c.heat).where(memory_heat.c.memory_id == memories.c.id).correlate(memories).scalar_subquery(),
    memories.c.heat,
).label("heat")
"""A memory's heat: its ``memory_heat`` row, else the ``memories.heat`` written before migration 0008."""

MEMORY_ROW = [*(c for c in memories.c if c.name != "heat"), HEAT]
"""Every column of a memory, its heat as ``HEAT``: what reads that answer with a memory select."""

HEAT_SQL = "coalesce((SELECT h.heat FROM memory_heat h WHERE h.memory_id = m.id), m.heat)"
"""``HEAT`` for written-out SQL over ``memories m``."""

memory_versions = Table(
    "memory_versions",
    metadata,
    Column("memory_id", UUID(as_uuid=True), ForeignKey("memories.id", ondelete="CASCADE"), nullable=False),
    Column("version", Integer, nullable=False),
    Column("op", Text, nullable=False),  # "create" | "update" | "restore" | "delete"
    Column("state", Text, nullable=False),
    Column("content", Text),
    Column("metadata", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("tags", ARRAY(Text), nullable=False, server_default=text("'{}'::text[]")),
    Column("provenance", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("content_sha256", Text),
    Column("expires_at", DateTime(timezone=True)),
    created_at(),
    Column("created_by", UUID(as_uuid=True), nullable=False),
    Column("embedding", Vector(EMBEDDING_DIMS)),
    Column("embedding_model", Text),
    Column("event_time", DateTime(timezone=True)),
    # The primary key is what makes a lost race impossible to record twice.
    PrimaryKeyConstraint("memory_id", "version"),
)

memory_links = Table(
    "memory_links",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("tenant_id", UUID(as_uuid=True), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("from_id", UUID(as_uuid=True), ForeignKey("memories.id", ondelete="CASCADE"), nullable=False),
    Column("to_id", UUID(as_uuid=True), ForeignKey("memories.id", ondelete="CASCADE"), nullable=False),
    Column("type", Text, nullable=False),
    Column("weight", Float, nullable=False, server_default=text("1")),
    # For provenance edges: the version of ``to_id`` the new memory was derived from.
    Column("to_version", Integer),
    created_at(),
    Column("created_by", UUID(as_uuid=True), nullable=False),
    UniqueConstraint("from_id", "to_id", "type"),
    Index(None, "to_id"),
    # A graph's catch-up finds the links a tenant wrote since it last read (migration 0012); knn links are written
    # only with their memory, which the catch-up finds, so they stay out of this index.
    Index(
        "ix_memory_links_tenant_id_created_at_not_knn",
        "tenant_id",
        "created_at",
        postgresql_where=text("type <> 'knn'"),
    ),
)

# -- the semantic cache (migration 0003): what the cache adds to its ``response`` memories ----------------

cache_configs = Table(
    "cache_configs",
    metadata,
    # A cube's category configuration as the owner wrote it; the defaults fill in the rest.
    Column("cube_id", UUID(as_uuid=True), ForeignKey("cubes.id", ondelete="CASCADE"), primary_key=True),
    Column("config", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_by", UUID(as_uuid=True), nullable=False),
)

cache_policy_revisions = Table(
    "cache_policy_revisions",
    metadata,
    # Bumped by every change to the cube's cache policy (configuration, feedback, a reset), under this row's lock,
    # so the numbers follow the commits: how a process knows its copy of the policy is old (migration 0011).
    Column("cube_id", UUID(as_uuid=True), ForeignKey("cubes.id", ondelete="CASCADE"), primary_key=True),
    Column("revision", BigInteger, nullable=False),
)

cache_categories = Table(
    "cache_categories",
    metadata,
    Column("cube_id", UUID(as_uuid=True), ForeignKey("cubes.id", ondelete="CASCADE"), nullable=False),
    Column("category", Text, nullable=False),
    # Where feedback moved the threshold (NULL: the configured one), and the highest reported false hit.
    Column("threshold", Float),
    Column("false_hit_floor", Float, nullable=False, server_default=text("0")),
    Column("hits", BigInteger, nullable=False, server_default=text("0")),
    Column("misses", BigInteger, nullable=False, server_default=text("0")),
    Column("false_hits", BigInteger, nullable=False, server_default=text("0")),
    Column("correct_hits", BigInteger, nullable=False, server_default=text("0")),
    Column("evicted", BigInteger, nullable=False, server_default=text("0")),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("cube_id", "category"),
)

cache_entries = Table(
    "cache_entries",
    metadata,
    Column("memory_id", UUID(as_uuid=True), ForeignKey("memories.id", ondelete="CASCADE"), primary_key=True),
    Column("cube_id", UUID(as_uuid=True), ForeignKey("cubes.id", ondelete="CASCADE"), nullable=False),
    # The context's embedding counts only while the memory's context text still hashes to context_sha256.
    Column("context_sha256", Text),
    Column("context_embedding", Vector(EMBEDDING_DIMS)),
    Column("threshold", Float),
    Column("hits", BigInteger, nullable=False, server_default=text("0")),
    Column("false_hits", BigInteger, nullable=False, server_default=text("0")),
    Column("last_hit_at", DateTime(timezone=True)),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index(None, "cube_id"),
)

# -- KV activations (migration 0004) ----------------------------------------------------------------------

activations = Table(
    "activations",
    metadata,
    # The id of the memory of kind ``activation`` that represents this KV cache.
    Column("id", UUID(as_uuid=True), ForeignKey("memories.id", ondelete="CASCADE"), primary_key=True),
    Column("tenant_id", UUID(as_uuid=True), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("cube_id", UUID(as_uuid=True), ForeignKey("cubes.id", ondelete="CASCADE"), nullable=False),
    # The source memory and the version whose text was prefilled.
    Column("memory_id", UUID(as_uuid=True), ForeignKey("memories.id", ondelete="CASCADE"), nullable=False),
    Column("source_version", Integer, nullable=False),
    Column("model", Text, nullable=False),
    Column("fingerprint", Text, nullable=False),
    # sha256 of the int64 token ids: with the fingerprint it names identical KV, whoever built it.
    Column("token_ids_sha256", Text, nullable=False),
    Column("tokens", Integer, nullable=False),
    Column("dtype", Text, nullable=False),
    Column("bytes", BigInteger, nullable=False),
    # sha256 of the whole memos-kv/1 file: its key in the blob store.
    Column("sha256", Text, nullable=False),
    Column("tier", Text, nullable=False, server_default="store"),
    Column("stale", Boolean, nullable=False, server_default=text("false")),
    # When the blob last failed its checksum; NULL while it is sound.
    Column("corrupt_at", DateTime(timezone=True)),
    Column("hits", BigInteger, nullable=False, server_default=text("0")),
    created_at(),
    Column("last_used_at", DateTime(timezone=True)),
    Column("created_by", UUID(as_uuid=True), nullable=False),
    Index(None, "memory_id", "model", "source_version"),
    Index(None, "tenant_id", "fingerprint", "token_ids_sha256"),
    Index(None, "sha256"),
    # The scheduler's read of the pinned activations, every pass (migration 0007).
    Index("ix_activations_model_pinned", "model", postgresql_where=text("tier IN ('device', 'host')")),
)

# Activations whose file holds uploaded bytes (POST /v1/activations/import, migration 0010, decisions 86). An
# import checks an upload's format, checksum, shapes, fingerprint and token ids, never its K/V values (only a
# prefill could), so uploaded bytes are reused only in the cube they were uploaded into; a server-built file
# is reused tenant-wide. A repair, which rebuilds the file from the text, lifts the mark.
activation_imports = Table(
    "activation_imports",
    metadata,
    # Deleted with its activation (a purge erases activation memories, and their rows with them).
    Column("activation_id", UUID(as_uuid=True), ForeignKey("activations.id", ondelete="CASCADE"), primary_key=True),
    # The cube the bytes were uploaded into: the only cube whose builds and imports may reuse them.
    Column("cube_id", UUID(as_uuid=True), ForeignKey("cubes.id", ondelete="CASCADE"), nullable=False),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("tenant_id", UUID(as_uuid=True)),
    Column("actor", Text, nullable=False),  # agent id, or "operator"
    Column("action", Text, nullable=False),
    Column("target_type", Text, nullable=False),
    Column("target_id", Text, nullable=False),
    Column("detail", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index(None, "tenant_id", "at"),
)
