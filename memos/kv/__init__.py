"""KV activations as a library: model specs, the memos-kv/1 codec, fingerprints, RoPE re-encoding, compose, generate.

Pure tensors and models, no HTTP and no database. Importing this package is cheap: ``spec`` and
``errors`` need no torch; ``codec``, ``rope``, ``fingerprint``, ``maker`` and ``runtime`` import it
(or transformers) and are imported only by the code that uses them.
"""

from memos.kv.errors import (
    FingerprintMismatch,
    KVChecksumError,
    KVError,
    KVFormatError,
    KVInputError,
    ModelLoadError,
    NotShiftable,
)
from memos.kv.spec import ModelSpec, parse_models

__all__ = [
    "FingerprintMismatch",
    "KVChecksumError",
    "KVError",
    "KVFormatError",
    "KVInputError",
    "ModelLoadError",
    "ModelSpec",
    "NotShiftable",
    "parse_models",
]
