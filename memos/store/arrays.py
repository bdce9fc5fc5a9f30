"""Vectors to and from Postgres in binary: many as one ``float4[]`` parameter, one back from ``vector_send``.

pgvector's own adapters write each vector as decimal text (384 ``str(float)`` a row) or need a
per-connection type lookup for the binary form. A ``real[]`` has a fixed type oid, so its binary
form can be written with numpy alone; SQL then slices row ``i`` out and casts it with ``::vector``
(pgvector casts ``real[]`` to ``vector``).
"""

from __future__ import annotations

import struct

import numpy as np
import numpy.typing as npt
import psycopg
from psycopg.adapt import Dumper
from psycopg.pq import Format

FLOAT4_OID = 700
FLOAT4_ARRAY_OID = 1021
"""Built-in type oids (``real`` and ``real[]``): the same in every PostgreSQL database."""


def decode_vector(raw: bytes | None) -> npt.NDArray[np.float32] | None:
    """pgvector's binary form (``vector_send``): int16 dimensions, int16 unused, then big-endian float32s."""
    if raw is None:
        return None
    return np.frombuffer(raw, dtype=">f4", offset=4).astype(np.float32)


def decode_id_vectors(packed: bytes) -> tuple[list[bytes], npt.NDArray[np.float32]]:
    """Rows of an id's 16 bytes (``uuid_send``) and a vector's binary form (``vector_send``), end to end, all
    vectors of one width: the ids' bytes and the vectors as a ``[rows, dims]`` matrix."""
    dims = int.from_bytes(packed[16:18], "big")
    layout = np.dtype([("id", "V16"), ("dims", ">i2"), ("unused", ">i2"), ("values", ">f4", (dims,))])
    records = np.frombuffer(packed, dtype=layout)
    return records["id"].tolist(), records["values"].astype(np.float32)


def vector_at(slot: str) -> str:
    """SQL for row ``slot`` (a 1-based SQL expression) of a :class:`Float4Array` sent as ``%(vectors)s`` with
    ``%(dims)s`` values a row, as a pgvector ``vector``: many rows' vectors travel as one parameter."""
    return f"(%(vectors)s::float4[])[({slot} - 1) * %(dims)s + 1 : {slot} * %(dims)s]::vector"


class Float4Array:
    """A float32 matrix sent as one flat ``real[]`` of ``rows x dims`` values, row after row."""

    __slots__ = ("values",)

    def __init__(self, matrix: npt.ArrayLike) -> None:
        self.values: npt.NDArray[np.float32] = np.ascontiguousarray(matrix, dtype=np.float32).ravel()


class _Float4ArrayDumper(Dumper):
    """PostgreSQL's binary array format: ndim, has-nulls, element oid, (size, lower bound), then
    each element as its length (4) and a big-endian float4."""

    format = Format.BINARY
    oid = FLOAT4_ARRAY_OID

    def dump(self, obj: Float4Array) -> bytes:
        values = obj.values
        if values.size == 0:
            return struct.pack(">iiI", 0, 0, FLOAT4_OID)
        body = np.empty(values.size, dtype=[("length", ">i4"), ("value", ">f4")])
        body["length"] = 4
        body["value"] = values
        return struct.pack(">iiIii", 1, 0, FLOAT4_OID, values.size, 1) + body.tobytes()


# Connections copy the global adapters when they open: memos opens none before this module is imported
# (memos.memories.versioning imports it).
psycopg.adapters.register_dumper(Float4Array, _Float4ArrayDumper)
