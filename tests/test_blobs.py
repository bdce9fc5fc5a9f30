"""The local blob store: content addressing, atomic writes, checksum on read, a full disk leaves nothing."""

from __future__ import annotations

import errno
import hashlib
from pathlib import Path
from typing import BinaryIO

import pytest

from memos.store.blobs import BlobCorrupt, BlobNotFound, BlobStoreFull, LocalBlobStore, check_key, is_key


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_put_is_content_addressed_and_idempotent(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    data = b"kv bytes " * 1000
    key = store.put(data)
    assert key == hashlib.sha256(data).hexdigest()
    assert store.put(data) == key
    assert store.exists(key) and store.size(key) == len(data)
    assert store.read(key) == data
    # Fan-out directories keep any one directory small.
    (path,) = files_under(tmp_path)
    assert path.relative_to(tmp_path).parts == (key[:2], key[2:4], key)


def test_read_detects_corruption(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    key = store.put(b"a" * 4096)
    (path,) = files_under(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(BlobCorrupt) as caught:
        store.read(key)
    assert caught.value.key == key and caught.value.actual != key
    assert store.read(key, verify=False) == bytes(raw)


def test_missing_blob_and_delete(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    key = store.put(b"x")
    assert store.delete(key) is True
    assert store.delete(key) is False
    assert not store.exists(key)
    with pytest.raises(BlobNotFound):
        store.read(key)
    with pytest.raises(BlobNotFound):
        store.size(key)


def test_keys_that_are_not_sha256_are_refused(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    for bad in ("../../etc/passwd", "A" * 64, "abc", "0" * 63 + "/"):
        with pytest.raises(ValueError):
            store.read(bad)


class FullDisk(LocalBlobStore):
    """Fails like a full filesystem after the first slice of a write has reached the temp file."""

    def _write(self, fh: BinaryIO, data: bytes) -> None:
        fh.write(data[: len(data) // 2])
        fh.flush()
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_leaves_no_partial_blob(tmp_path: Path) -> None:
    store = FullDisk(tmp_path)
    data = b"y" * (3 << 20)
    with pytest.raises(BlobStoreFull, match="no space"):
        store.put(data)
    key = hashlib.sha256(data).hexdigest()
    assert not store.exists(key)
    assert files_under(tmp_path) == []
    # The same bytes go in once there is room again.
    assert LocalBlobStore(tmp_path).put(data) == key


def test_other_write_errors_also_clean_up(tmp_path: Path) -> None:
    class Broken(LocalBlobStore):
        def _write(self, fh: BinaryIO, data: bytes) -> None:
            fh.write(b"partial")
            raise OSError(errno.EIO, "I/O error")

    with pytest.raises(OSError, match="I/O error"):
        Broken(tmp_path).put(b"z" * 100)
    assert files_under(tmp_path) == []


def test_put_replaces_a_damaged_copy(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    data = b"q" * 5000
    key = store.put(data)
    (path,) = files_under(tmp_path)
    path.write_bytes(b"q" * 4999 + b"Q")
    with pytest.raises(BlobCorrupt):
        store.read(key)
    assert store.put(data) == key
    assert store.read(key) == data


def test_blobs_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    """A blob is a model's KV of a memory's text: it was 0644 (in 0755 directories) under the usual umask."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        store = LocalBlobStore(tmp_path / "blobs")
        key = store.put(b"the kv of a private memory")
    finally:
        os.umask(old)
    path = tmp_path / "blobs" / key[:2] / key[2:4] / key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for level in (path.parent, path.parent.parent, tmp_path / "blobs", tmp_path / "blobs" / "tmp"):
        assert stat.S_IMODE(level.stat().st_mode) == 0o700, level


def test_a_key_ending_in_a_newline_is_not_a_key() -> None:
    """The key check's ``$`` matched before a trailing newline: "<64 hex>\\n" passed as a blob key."""
    key = "a" * 64
    assert is_key(key) and not is_key(key + "\n")
    with pytest.raises(ValueError, match="not a sha256 blob key"):
        check_key(key + "\n")
