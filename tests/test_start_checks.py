"""`memos serve` checks what it can before it starts the database: that it can listen on its host and port, and
that the KV blob store can be written. Each failed after the embedded server had started, in uvicorn's words
(a traceback, exit 3), or at the first KV write; now one line, `memos serve: …`, naming the flag or variable,
exit 1, with no database started."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import OPERATOR_KEY, free_port

from memos.cli.main import _cannot_listen, _cannot_store_kv
from memos.kv.spec import ModelSpec
from memos.settings import Settings
from memos.store.blobs import LocalBlobStore


def serve(tmp_path: Path, *args: str, **variables: str) -> subprocess.CompletedProcess[str]:
    """``memos serve ARGS`` with ``MEMOS_DATA_DIR`` in ``tmp_path`` and ``variables`` set; it is expected to
    stop at a check (the timeout is for a start that goes on to the database)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMOS_")}
    env.update(MEMOS_DATA_DIR=str(tmp_path / "data"), MEMOS_OPERATOR_KEY=OPERATOR_KEY, MEMOS_LOG_LEVEL="WARNING")
    env.update(variables)
    return subprocess.run(
        [str(Path(sys.executable).parent / "memos"), "serve", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def one_line(result: subprocess.CompletedProcess[str], tmp_path: Path) -> str:
    """The one line it printed, after checking it stopped with exit 1 before starting the embedded database."""
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1, result.stderr[-3000:]
    assert not (tmp_path / "data" / "pg").exists(), "the embedded database was started"
    return result.stderr.strip()


@pytest.mark.parametrize("given", ["flag", "variable"])
def test_a_port_in_use_is_one_line_before_the_database_starts(tmp_path: Path, given: str) -> None:
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        if given == "flag":
            result, name = serve(tmp_path, "--port", str(port)), "--port"
        else:
            result, name = serve(tmp_path, MEMOS_PORT=str(port)), "MEMOS_PORT"
    line = one_line(result, tmp_path)
    assert line == f"memos serve: cannot listen on {name} ({port}) at 127.0.0.1: Address already in use"


@pytest.mark.parametrize("given", ["flag", "variable"])
def test_a_host_that_does_not_resolve_is_one_line_before_the_database_starts(tmp_path: Path, given: str) -> None:
    host = "no-such-host.invalid"
    if given == "flag":
        result, name = serve(tmp_path, "--host", host, "--port", str(free_port())), "--host"
    else:
        result, name = serve(tmp_path, "--port", str(free_port()), MEMOS_HOST=host), "MEMOS_HOST"
    assert one_line(result, tmp_path).startswith(f"memos serve: cannot resolve {name} ({host}): ")


def test_a_host_that_is_not_this_machines_is_one_line(tmp_path: Path) -> None:
    """It resolves, but no interface here has it (a typo'd address): the bind says so, naming the host."""
    port = free_port()
    with socket.socket() as probe:
        try:
            probe.bind(("192.0.2.1", port))
        except OSError:
            pass
        else:
            pytest.skip("this host binds addresses it does not have (net.ipv4.ip_nonlocal_bind)")
    line = one_line(serve(tmp_path, "--host", "192.0.2.1", "--port", str(port)), tmp_path)
    assert line == "memos serve: cannot listen on --host (192.0.2.1) at 192.0.2.1: Cannot assign requested address"


def test_a_port_in_time_wait_is_not_refused() -> None:
    """The probe sets SO_REUSEADDR as uvicorn does: the port of a server that just stopped (its connections
    in TIME_WAIT) is free to uvicorn, and must be to the probe too."""
    port = free_port()
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen()
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        accepted.close()  # the server's end closes first: it is the one left in TIME_WAIT
        client.close()
    # Without SO_REUSEADDR the port is refused: the TIME_WAIT is there.
    with socket.socket() as plain, pytest.raises(OSError, match="Address already in use"):
        plain.bind(("127.0.0.1", port))
    settings = Settings(host="127.0.0.1", port=port, operator_key=OPERATOR_KEY)
    assert _cannot_listen(settings, host_given=True, port_given=True) is None


def test_a_blob_dir_that_cannot_be_made_is_one_line_naming_memos_blob_dir(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    blobs = tmp_path / "afile" / "blobs"
    line = one_line(serve(tmp_path, "--port", str(free_port()), MEMOS_BLOB_DIR=str(blobs)), tmp_path)
    assert line == f"memos serve: cannot use MEMOS_BLOB_DIR ({blobs}): Not a directory"


def test_the_default_blob_dir_is_checked_when_kv_can_be_written(tmp_path: Path) -> None:
    """MEMOS_MODELS set: KV files are written to data_dir/blobs. Something else in its place is one line,
    naming the path in MEMOS_DATA_DIR."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "blobs").write_text("not a directory")
    (tmp_path / "model").mkdir()  # a directory is all the start asks of a model (it loads on first use)
    models = json.dumps({"tiny": {"path": str(tmp_path / "model")}})
    result = serve(tmp_path, "--port", str(free_port()), MEMOS_MODELS=models)
    line = one_line(result, tmp_path)
    assert line == f"memos serve: cannot use {data / 'blobs'} in MEMOS_DATA_DIR ({data}): File exists"


def test_without_kv_models_nor_a_blob_dir_the_store_is_not_checked(tmp_path: Path) -> None:
    """Nothing writes a KV file then: a data directory memos cannot write (an external database, a read-only
    file system) must not stop the start."""
    (tmp_path / "afile").write_text("")
    unusable = Settings(data_dir=tmp_path / "afile", operator_key=OPERATOR_KEY)
    assert _cannot_store_kv(unusable) is None
    with_kv = Settings(
        data_dir=tmp_path / "afile", operator_key=OPERATOR_KEY, models={"m": ModelSpec(name="m", path=tmp_path)}
    )
    assert _cannot_store_kv(with_kv) == (
        f"cannot use {tmp_path / 'afile' / 'blobs'} in MEMOS_DATA_DIR ({tmp_path / 'afile'}): Not a directory"
    )


def test_the_check_makes_the_store_private_and_leaves_nothing_behind(tmp_path: Path) -> None:
    root = tmp_path / "new" / "deeper" / "blobs"
    LocalBlobStore(root).check_writable()
    for made in (tmp_path / "new", tmp_path / "new" / "deeper", root, root / "tmp"):
        assert stat.S_IMODE(made.stat().st_mode) == 0o700, made
    assert list(root.rglob("*")) == [root / "tmp"]
    LocalBlobStore(root).check_writable()  # a second start: all there already
