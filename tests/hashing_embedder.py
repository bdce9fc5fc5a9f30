"""A model-free test double for the embed worker's mechanics (queueing, batching, failures).

Never used by the service. It needs no torch and starts instantly; its similarities are lexical.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import numpy as np

from memos.embed.base import Vectors, check_texts, empty, l2_normalize

_WORD = re.compile(r"\w+", re.UNICODE)


class HashingEmbedder:
    """Deterministic bag of hashed words and character trigrams, signed and L2-normalized."""

    def __init__(self, dims: int = 384) -> None:
        if dims < 8:
            raise ValueError("dims must be at least 8")
        self._dims = dims

    @property
    def name(self) -> str:
        return f"hash-{self._dims}"

    @property
    def dims(self) -> int:
        return self._dims

    def __repr__(self) -> str:
        return f"HashingEmbedder(dims={self._dims})"

    def embed(self, texts: Sequence[str]) -> Vectors:
        items = check_texts(texts)
        if not items:
            return empty(self._dims)
        out = np.zeros((len(items), self._dims), dtype=np.float32)
        for row, text in enumerate(items):
            for feature in self._features(text):
                digest = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "little")
                sign = 1.0 if digest & 1 else -1.0
                out[row, (digest >> 1) % self._dims] += sign
        return l2_normalize(out)

    @staticmethod
    def _features(text: str) -> list[str]:
        words = _WORD.findall(text.lower())
        grams = [f"#{w[i : i + 3]}" for w in words if len(w) > 3 for i in range(len(w) - 2)]
        return words + grams
