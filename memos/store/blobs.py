"""Content-addressed blob storage for KV activation files.

A blob's key is the sha256 of its bytes, so identical files are stored once and
any copy can be checked against its name. ``BlobStore`` speaks keys and bytes
only (no paths), so an object store can stand in for ``LocalBlobStore``.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import hashlib
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


class BlobError(Exception):
    """A blob store operation failed (base class)."""


class BlobNotFound(BlobError):
    """No blob has this key."""


class BlobCorrupt(BlobError):
    """The stored bytes no longer hash to their key: the blob must not be used."""

    def __init__(self, key: str, actual: str) -> None:
        super().__init__(f"blob {key} is corrupt: its bytes hash to {actual}")
        self.key = key
        self.actual = actual


class BlobStoreFull(BlobError):
    """The store has no room for a new blob (nothing was written)."""


def is_key(key: str) -> bool:
    """A lowercase hex sha256: what a blob key is."""
    return _SHA256.fullmatch(key) is not None  # match: `$` let a key ending in a newline through


def check_key(key: str) -> str:
    """A key is a lowercase hex sha256; anything else could escape the store's directory."""
    if not is_key(key):
        raise ValueError(f"not a sha256 blob key: {key!r}")
    return key


@dataclass(frozen=True, slots=True)
class StoredBlob:
    """A blob as listed by ``BlobStore.blobs``: its key, length and seconds since it was last put."""

    key: str
    nbytes: int
    age_s: float


class BlobStore(abc.ABC):
    """Immutable blobs named by the sha256 of their bytes."""

    @abc.abstractmethod
    def put(self, data: bytes) -> str:
        """Store ``data`` and return its sha256. A no-op when a sound copy is there already; never leaves a
        partial blob."""

    @abc.abstractmethod
    def read(self, key: str, *, verify: bool = True) -> bytes:
        """The blob's bytes; ``BlobNotFound``, or ``BlobCorrupt`` when ``verify`` and they do not hash to ``key``."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def size(self, key: str) -> int:
        """The blob's length in bytes (``BlobNotFound`` if absent)."""

    @abc.abstractmethod
    def delete(self, key: str) -> bool:
        """Remove the blob; False if there was none."""

    @abc.abstractmethod
    def age(self, key: str) -> float:
        """Seconds since the blob was last put (``BlobNotFound`` if absent)."""

    @abc.abstractmethod
    def blobs(self) -> Iterator[StoredBlob]:
        """Every stored blob (for ``memos admin gc`` and ``verify``; not on a request path)."""

    @abc.abstractmethod
    def sweep_partial(self, older_than_s: float, *, dry_run: bool = False) -> int:
        """Remove writes left unfinished (a crash between write and rename) older than ``older_than_s``;
        how many went (``dry_run``: how many would, removing none)."""


def _private_dirs(*paths: Path) -> None:
    """Make each directory (parents first) that is missing, 0700: ``mkdir(parents=True)`` gives the parents it
    makes the umask's mode, and the first levels of the tree name the blobs' hashes."""
    for path in paths:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)


class LocalBlobStore(BlobStore):
    """Blobs as files under ``root/ab/cd/<sha256>``, written atomically (temp file, fsync, rename)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._tmp = self.root / "tmp"

    def _path(self, key: str) -> Path:
        check_key(key)
        return self.root / key[:2] / key[2:4] / key

    def check_writable(self) -> None:
        """Make the store's directories that are missing (those above it too, all 0700) and create and remove a
        file where ``put`` writes first: ``OSError``, naming the path, when the store cannot be written.
        ``memos serve`` calls it at start, so an unusable directory is not found at the first KV write."""
        # The missing ones only, top down: mkdir(parents=True) would give those above the root the umask's mode,
        # and the default root is in the data directory, which memos makes 0700 (before the embedded server).
        _private_dirs(*reversed([p for p in self.root.parents if not p.exists()]), self.root, self._tmp)
        # A .part name: sweep_partial removes it if the process dies before the unlink.
        probe = self._tmp / f"writable.{secrets.token_hex(6)}.part"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()

    def put(self, data: bytes) -> str:
        key = hashlib.sha256(data).hexdigest()
        final = self._path(key)
        if final.exists() and self._sound(final, key):
            # A put is a claim on the blob: its age restarts, so `memos admin gc`, which frees unreferenced
            # blobs only past a grace period, does not take a file that a build is about to refer to.
            with contextlib.suppress(OSError):
                os.utime(final)
            return key
        # Absent, or present but damaged: (re)write it, atomically replacing a damaged copy.
        # Owner only: a file is a model's KV of a memory's text, as private as the text (0644 and 0755 let any
        # local user read it wherever the data directory was open; found in review).
        _private_dirs(self.root, self._tmp)
        tmp = self._tmp / f"{key}.{secrets.token_hex(6)}.part"
        try:
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as fh:
                self._write(fh, data)
                fh.flush()
                os.fsync(fh.fileno())
            _private_dirs(final.parent.parent, final.parent)  # the root: made with the tmp directory above
            # rename is atomic within one filesystem: readers see no file or the whole file.
            os.replace(tmp, final)
            fsync_dir(final.parent)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise BlobStoreFull(f"no space left in the blob store at {self.root}") from exc
            raise
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return key

    def _write(self, fh: BinaryIO, data: bytes) -> None:
        """Write in 1 MiB slices (a hook for tests that need a write to fail half way)."""
        view = memoryview(data)
        for start in range(0, len(view), _CHUNK):
            fh.write(view[start : start + _CHUNK])

    @staticmethod
    def _sound(path: Path, key: str) -> bool:
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as fh:
                while block := fh.read(_CHUNK):
                    digest.update(block)
        except OSError:
            return False
        return digest.hexdigest() == key

    def read(self, key: str, *, verify: bool = True) -> bytes:
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            raise BlobNotFound(f"no blob {key}") from None
        if verify:
            actual = hashlib.sha256(data).hexdigest()
            if actual != key:
                raise BlobCorrupt(key, actual)
        return data

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise BlobNotFound(f"no blob {key}") from None

    def delete(self, key: str) -> bool:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            return False
        return True

    def age(self, key: str) -> float:
        try:
            return max(0.0, time.time() - self._path(key).stat().st_mtime)
        except FileNotFoundError:
            raise BlobNotFound(f"no blob {key}") from None

    def blobs(self) -> Iterator[StoredBlob]:
        now = time.time()
        for first in sorted(self.root.glob("[0-9a-f][0-9a-f]")):
            for path in sorted(first.glob("[0-9a-f][0-9a-f]/*")):
                name = path.name
                # Only files where their name puts them: anything else is not this store's.
                if not (_SHA256.fullmatch(name) and name[:2] == first.name and name[2:4] == path.parent.name):
                    continue
                try:
                    stat = path.stat()
                except FileNotFoundError:  # deleted meanwhile
                    continue
                yield StoredBlob(key=name, nbytes=stat.st_size, age_s=max(0.0, now - stat.st_mtime))

    def sweep_partial(self, older_than_s: float, *, dry_run: bool = False) -> int:
        removed = 0
        now = time.time()
        for path in self._tmp.glob("*.part") if self._tmp.is_dir() else ():
            with contextlib.suppress(FileNotFoundError):
                if now - path.stat().st_mtime >= older_than_s:
                    if not dry_run:
                        path.unlink()
                    removed += 1
        return removed


def fsync_dir(path: Path) -> None:
    """Make a rename or link in ``path`` durable (POSIX needs the directory fsynced too, not only the file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
