"""What a built wheel of memos holds: everything the service reads from disk at run time.

A plain ``pip install`` (not editable) once shipped no Alembic migrations, so an installed memos could not
start (it upgrades its embedded database at every start) nor run ``memos admin migrate``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from memos.store.migrations import MIGRATIONS_DIR, head_revision

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the source (the build writes build/ and egg-info where it runs)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "memos", src / "memos", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    # The build backend (setuptools) is installed in the venv: nothing is downloaded.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("memos-*.whl")
    return built


def test_the_wheel_ships_every_migration(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {
        f"memos/migrations/{path.relative_to(MIGRATIONS_DIR).as_posix()}"
        for path in MIGRATIONS_DIR.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert {"memos/migrations/env.py", "memos/migrations/script.py.mako"} <= wanted
    assert wanted <= names, sorted(wanted - names)


def test_an_installed_wheel_finds_its_migrations(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = "import memos.store.migrations as m\nprint(m.__file__)\nprint(m.head_revision())\n"
    # PYTHONPATH comes before the editable install's finder, and the working directory (first on the path of
    # ``python -c``) holds no memos: the unpacked wheel is what gets imported.
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run(
        [sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True, check=True
    )
    module_file, head = run.stdout.split()
    assert Path(module_file).is_relative_to(site)
    assert head == head_revision()
