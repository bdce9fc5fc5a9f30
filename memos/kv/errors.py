"""The KV library's error tree. No torch here: the service imports these to map failures to problems."""

from __future__ import annotations


class KVError(Exception):
    """Base of every error the KV library raises on purpose."""


class KVFormatError(KVError):
    """Not a well-formed ``memos-kv/1`` file: wrong format, bad header, truncated, bad shapes or dtypes."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        """The ``__metadata__`` key at fault, when the problem is one value of the header (the service names it)."""


class KVChecksumError(KVError):
    """The tensor bytes do not hash to the ``payload_sha256`` the header promises: the file was altered or damaged."""


class FingerprintMismatch(KVError):
    """KV built for one model was offered to another (or to the same model with other weights, tokenizer or dtype)."""

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f"KV was built for model fingerprint {actual}, not {expected}")
        self.expected = expected
        self.actual = actual


class NotShiftable(KVError):
    """The model's rotary position embedding cannot be moved to new positions exactly, so chunks cannot be composed."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"RoPE cannot be re-encoded exactly for this model: {reason}")
        self.reason = reason


class KVInputError(KVError):
    """Input the library cannot work on: no tokens, a chunk that does not fit the model, too many positions."""


class ModelLoadError(KVError):
    """A configured model directory could not be loaded (missing, not a causal LM, no safetensors weights)."""
