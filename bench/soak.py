"""Soak: many concurrent clients of mixed traffic against a real ``memos serve``, then every acknowledged write checked.

Starts the service as a user would (a subprocess on an embedded PostgreSQL in a temporary data
directory), seeds a few tenants, and runs ``--clients`` concurrent clients for ``--seconds``. Each
client loops over a weighted mix: create, batch create, read-then-PATCH of a memory every client of
its tenant fights over (If-Match races: 412 is an expected answer), PATCH and soft delete of its own
memories, GET, list, search in every mode, and, when the served OpenAPI document has them, semantic
cache lookups and stores. Every answer is timed; every acknowledged write (its id, version and
content) goes to a ledger. After the load, every ledger entry is read back
(``/versions/{n}``) and compared.

Prints throughput, p50/p95/p99 per operation, answers by status, unexpected answers and
acknowledged writes lost, against the targets (0 unexpected, 0 lost, p99 <= 200 ms), and writes
``bench/results/soak.json``. Exits 1 when a write was lost or an answer was unexpected; a latency
miss is reported, not enforced.

    python -m bench.soak                          # 50 clients, 60 s (make soak)
    python -m bench.soak --clients 20 --seconds 15
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil  # type: ignore[import-untyped]

from bench.api_latency import RESULTS_DIR, WORDS, Server, machine_info, percentile, source_info

P99_TARGET_MS = 200.0
SEARCH_MODES = ("vector", "text", "hybrid", "graph")

# (operation, weight): what one client iteration does.
MIX: list[tuple[str, int]] = [
    ("create", 20),
    ("batch", 4),
    ("race_patch", 12),
    ("own_patch", 6),
    ("delete", 4),
    ("get", 12),
    ("list", 4),
    ("search", 24),
    ("cache_lookup", 10),
    ("cache_store", 4),
]

# Answers that are part of the protocol under contention, not errors.
EXPECTED: dict[str, set[int]] = {
    "create": {201},
    "batch": {201},
    "race_get": {200},
    "race_patch": {200, 412},  # another client patched the same memory first
    "own_patch": {200},
    "delete": {204},
    "get": {200},
    "list": {200},
    "search": {200},
    "cache_lookup": {200},
    "cache_store": {201},
}


@dataclass
class Ack:
    memory_id: str
    version: int
    content: str
    state: str = "active"


@dataclass
class Stats:
    ms: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    statuses: dict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    transport_errors: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    acks: list[Ack] = field(default_factory=list)


@dataclass
class Tenant:
    key: str
    cube_id: str
    hot: list[str]  # memories every client of the tenant PATCHes (the If-Match races)


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


class Client:
    def __init__(
        self, http: httpx.AsyncClient, tenant: Tenant, stats: Stats, seed: int, cache: bool, rate: float
    ) -> None:
        self.http, self.tenant, self.stats, self.rate = http, tenant, stats, rate
        self.rng = random.Random(seed)  # reproducible traffic; not for security
        self.auth = {"Authorization": f"Bearer {tenant.key}"}
        self.own: dict[str, tuple[int, str]] = {}  # memory id -> (version, content) this client last wrote
        self.n = 0
        mix = [(op, w) for op, w in MIX if cache or not op.startswith("cache")]
        self.ops = [op for op, _ in mix]
        self.weights = [w for _, w in mix]

    async def call(
        self, op: str, method: str, url: str, *, json_body: Any = None, headers: dict[str, str] | None = None
    ) -> httpx.Response | None:
        started = time.perf_counter()
        try:
            r = await self.http.request(method, url, json=json_body, headers={**self.auth, **(headers or {})})
        except httpx.HTTPError as exc:
            self.stats.transport_errors[f"{op}: {type(exc).__name__}"] += 1
            self.stats.unexpected.append(f"{op} {method} {url}: {type(exc).__name__}")
            return None
        self.stats.ms[op].append((time.perf_counter() - started) * 1000)
        self.stats.statuses[op][r.status_code] += 1
        if r.status_code not in EXPECTED[op]:
            self.stats.unexpected.append(f"{op} {method} {url}: {r.status_code} {r.text[:200]}")
        return r

    async def run(self, deadline: float) -> None:
        handlers: dict[str, Callable[[], Awaitable[None]]] = {
            "create": self.create,
            "batch": self.batch,
            "race_patch": self.race_patch,
            "own_patch": self.own_patch,
            "delete": self.delete,
            "get": self.get,
            "list": self.list,
            "search": self.search,
            "cache_lookup": self.cache_lookup,
            "cache_store": self.cache_store,
        }
        started = time.monotonic()
        while time.monotonic() < deadline:
            if self.rate > 0:
                # Paced: iteration n starts no earlier than n / rate seconds in (an agent that thinks).
                await asyncio.sleep(max(0.0, started + self.n / self.rate - time.monotonic()))
            self.n += 1
            op = self.rng.choices(self.ops, self.weights)[0]
            if op in ("own_patch", "delete", "get") and not self.own:
                op = "create"
            await handlers[op]()

    async def create(self) -> None:
        content = f"{words(self.rng, 12)} #{secrets.token_hex(4)}"
        body = {"kind": "plaintext", "content": content, "tags": [f"t{self.n % 5}"]}
        r = await self.call("create", "POST", f"/v1/cubes/{self.tenant.cube_id}/memories", json_body=body)
        if r is not None and r.status_code == 201:
            m = r.json()
            self.stats.acks.append(Ack(m["id"], m["version"], m["content"]))
            self.own[m["id"]] = (m["version"], m["content"])

    async def batch(self) -> None:
        items = [{"kind": "plaintext", "content": f"{words(self.rng, 10)} #{secrets.token_hex(4)}"} for _ in range(5)]
        r = await self.call(
            "batch", "POST", f"/v1/cubes/{self.tenant.cube_id}/memories/batch", json_body={"items": items}
        )
        if r is not None and r.status_code == 201:
            self.stats.acks += [Ack(m["id"], m["version"], m["content"]) for m in r.json()["items"]]

    async def race_patch(self) -> None:
        memory_id = self.rng.choice(self.tenant.hot)
        r = await self.call("race_get", "GET", f"/v1/memories/{memory_id}")
        if r is None or r.status_code != 200:
            return
        etag = r.headers["ETag"]
        content = f"hot {words(self.rng, 6)} #{secrets.token_hex(4)}"
        r = await self.call(
            "race_patch",
            "PATCH",
            f"/v1/memories/{memory_id}",
            json_body={"content": content},
            headers={"If-Match": etag},
        )
        if r is not None and r.status_code == 200:
            m = r.json()
            self.stats.acks.append(Ack(m["id"], m["version"], m["content"]))

    async def own_patch(self) -> None:
        memory_id = self.rng.choice(list(self.own))
        version, _ = self.own[memory_id]
        content = f"revised {words(self.rng, 8)} #{secrets.token_hex(4)}"
        r = await self.call(
            "own_patch",
            "PATCH",
            f"/v1/memories/{memory_id}",
            json_body={"content": content},
            headers={"If-Match": f'"{version}"'},
        )
        if r is not None and r.status_code == 200:
            m = r.json()
            self.stats.acks.append(Ack(m["id"], m["version"], m["content"]))
            self.own[memory_id] = (m["version"], m["content"])

    async def delete(self) -> None:
        memory_id = self.rng.choice(list(self.own))
        version, content = self.own.pop(memory_id)
        r = await self.call("delete", "DELETE", f"/v1/memories/{memory_id}", headers={"If-Match": f'"{version}"'})
        if r is not None and r.status_code == 204:
            self.stats.acks.append(Ack(memory_id, version + 1, content, state="deleted"))

    async def get(self) -> None:
        await self.call("get", "GET", f"/v1/memories/{self.rng.choice(list(self.own))}")

    async def list(self) -> None:
        await self.call("list", "GET", f"/v1/cubes/{self.tenant.cube_id}/memories?limit=20&tag=t{self.n % 5}")

    async def search(self) -> None:
        mode = SEARCH_MODES[self.n % len(SEARCH_MODES)]
        body = {"query": words(self.rng, 4), "mode": mode, "k": 10}
        await self.call("search", "POST", "/v1/search", json_body=body)

    async def cache_lookup(self) -> None:
        body = {"cube_id": self.tenant.cube_id, "query": f"what about {words(self.rng, 3)}?"}
        await self.call("cache_lookup", "POST", "/v1/cache/lookup", json_body=body)

    async def cache_store(self) -> None:
        body = {
            "cube_id": self.tenant.cube_id,
            "query": f"what about {words(self.rng, 3)}?",
            "response": f"it is {words(self.rng, 5)}",
        }
        r = await self.call("cache_store", "POST", "/v1/cache", json_body=body)
        if r is not None and r.status_code == 201:
            m = r.json()
            self.stats.acks.append(Ack(m["id"], m["version"], m["content"]))


# --------------------------------------------------------------------------- setup and verification


def setup(server: Server, tenants: int, seed_per_tenant: int, hot: int) -> list[Tenant]:
    rng = random.Random(7)
    out = []
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        for t in range(tenants):
            r = http.post(
                "/v1/tenants",
                json={"name": f"soak-{t}-{secrets.token_hex(3)}"},
                headers={"Authorization": f"Bearer {server.operator_key}"},
            )
            r.raise_for_status()
            key = r.json()["admin_key"]
            auth = {"Authorization": f"Bearer {key}"}
            cube = http.post("/v1/cubes", json={"name": "soak"}, headers=auth)
            cube.raise_for_status()
            cube_id = cube.json()["id"]
            hot_ids = []
            for start in range(0, seed_per_tenant + hot, 100):
                size = min(100, seed_per_tenant + hot - start)
                items = [{"kind": "plaintext", "content": f"{words(rng, 12)} seed {start + i}"} for i in range(size)]
                r = http.post(f"/v1/cubes/{cube_id}/memories/batch", json={"items": items}, headers=auth)
                r.raise_for_status()
                hot_ids += [m["id"] for m in r.json()["items"]]
            out.append(Tenant(key, cube_id, hot_ids[:hot]))
    return out


async def verify(base_url: str, tenants: list[Tenant], acks: list[Ack], concurrency: int = 8) -> list[str]:
    """Read every acknowledged write back; the ones that are not there as acknowledged."""
    key_of: dict[str, str] = {}
    lost: list[str] = []
    latest: dict[str, int] = {}
    for ack in acks:
        latest[ack.memory_id] = max(latest.get(ack.memory_id, 0), ack.version)
    queue: asyncio.Queue[Ack] = asyncio.Queue()
    for ack in acks:
        queue.put_nowait(ack)
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
        # Which tenant's key reads a memory: try each (404 across tenants), remember the one that worked.
        async def read(path: str, memory_id: str) -> httpx.Response:
            keys = [key_of[memory_id]] if memory_id in key_of else [t.key for t in tenants]
            r = None
            for key in keys:
                r = await http.get(path, headers={"Authorization": f"Bearer {key}"})
                if r.status_code != 404:
                    key_of[memory_id] = key
                    return r
            assert r is not None
            return r

        async def worker() -> None:
            while not queue.empty():
                ack = queue.get_nowait()
                r = await read(f"/v1/memories/{ack.memory_id}/versions/{ack.version}", ack.memory_id)
                if r.status_code != 200:
                    lost.append(f"{ack}: {r.status_code}")
                    continue
                v = r.json()
                if (v["content"], v["state"]) != (ack.content, ack.state):
                    lost.append(f"{ack}: found {v['content']!r} ({v['state']})")
                if ack.version == latest[ack.memory_id]:
                    current = await read(f"/v1/memories/{ack.memory_id}", ack.memory_id)
                    if current.status_code != 200 or current.json()["version"] < ack.version:
                        lost.append(f"{ack}: current {current.status_code} {current.text[:100]}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return lost


# --------------------------------------------------------------------------- run and report


async def run_load(
    server: Server, tenants: list[Tenant], clients: int, seconds: float, cache: bool, rate: float
) -> Stats:
    stats = Stats()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30, limits=limits) as http:
        deadline = time.monotonic() + seconds
        workers = [
            Client(http, tenants[i % len(tenants)], stats, seed=i, cache=cache, rate=rate) for i in range(clients)
        ]
        await asyncio.gather(*(w.run(deadline) for w in workers))
    return stats


def has_cache(server: Server) -> bool:
    spec = httpx.get(server.base_url + "/schema/openapi.json", timeout=30).json()
    return "/v1/cache/lookup" in spec.get("paths", {}) and "/v1/cache" in spec.get("paths", {})


def summarize(stats: Stats, wall_s: float) -> dict[str, Any]:
    ops: dict[str, Any] = {}
    for op, samples in sorted(stats.ms.items()):
        ordered = sorted(samples)
        ops[op] = {
            "n": len(ordered),
            "per_s": round(len(ordered) / wall_s, 1),
            "p50_ms": round(percentile(ordered, 50), 2),
            "p95_ms": round(percentile(ordered, 95), 2),
            "p99_ms": round(percentile(ordered, 99), 2),
            "max_ms": round(ordered[-1], 2),
            "statuses": {str(k): v for k, v in sorted(stats.statuses[op].items())},
        }
    everything = sorted(x for samples in stats.ms.values() for x in samples)
    ops["all"] = {
        "n": len(everything),
        "per_s": round(len(everything) / wall_s, 1),
        "p50_ms": round(percentile(everything, 50), 2),
        "p95_ms": round(percentile(everything, 95), 2),
        "p99_ms": round(percentile(everything, 99), 2),
        "max_ms": round(everything[-1], 2),
    }
    return ops


def print_report(report: dict[str, Any]) -> None:
    m, cfg, ops = report["machine"], report["config"], report["operations"]
    print()
    print(
        f"memos soak: {cfg['clients']} concurrent clients, {cfg['seconds']:g} s of mixed traffic, "
        f"{cfg['tenants']} tenants, "
        + (f"paced at {cfg['rate']:g} iterations/s per client" if cfg["rate"] else "no pacing (closed loop)")
        + f"; cache traffic: {'yes' if cfg['cache'] else 'no (no /v1/cache in the API)'}"
    )
    print(
        f"machine: {m['cpu_model']}, {m['cpu_cores']} cores, {m['ram_gib']} GiB RAM; {m['postgres']}; "
        f"load at start {m['loadavg_at_start'][0]:.2f}; {m['date_utc']}"
    )
    print()
    header = f"{'operation':<14}{'n':>7}{'req/s':>8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}  answers"
    print(header)
    print("-" * (len(header) + 20))
    for op, s in ops.items():
        answers = " ".join(f"{k}:{v}" for k, v in s.get("statuses", {}).items())
        print(
            f"{op:<14}{s['n']:>7}{s['per_s']:>8.1f}{s['p50_ms']:>9.1f}{s['p95_ms']:>9.1f}{s['p99_ms']:>9.1f}"
            f"{s['max_ms']:>9.1f}  {answers}"
        )
    r = report["result"]
    print()
    print(f"acknowledged writes: {r['acknowledged_writes']}, verified in {r['verify_s']:.1f} s; lost: {r['lost']}")
    print(f"unexpected answers: {r['unexpected']}; transport errors: {r['transport_errors'] or 0}")
    for line in r["unexpected_samples"]:
        print(f"  unexpected: {line}")
    for line in r["lost_samples"]:
        print(f"  LOST: {line}")
    cpu, n = r["cpu_s"], ops["all"]["n"]
    print(
        f"CPU during the load: service {cpu['service']:.1f} s, Postgres {cpu['postgres']:.1f} s, clients "
        f"{cpu['clients']:.1f} s over {r['wall_s']:.0f} s wall ({(cpu['service'] + cpu['postgres']) * 1000 / n:.1f} ms "
        f"of server CPU per request; the rest of the machine's 2 cores went to the clients and other work)"
    )
    p99 = ops["all"]["p99_ms"]
    print()
    for label, ok, measured in (
        ("0 unexpected answers", r["unexpected"] == 0, str(r["unexpected"])),
        ("0 acknowledged writes lost", r["lost"] == 0, str(r["lost"])),
        (f"p99 <= {P99_TARGET_MS:g} ms (all operations)", p99 <= P99_TARGET_MS, f"{p99:.1f} ms"),
    ):
        print(f"  target {label:<36} measured {measured:<10} {'met' if ok else 'MISSED'}")
    for w in report["warnings"]:
        print(f"  warning: {w}")
    print()


def cpu_seconds(server: Server) -> dict[str, float]:
    """CPU time so far of the service process and of its embedded Postgres (postmaster and backends)."""

    def total(proc: psutil.Process) -> float:
        t = proc.cpu_times()
        return float(t.user + t.system)

    out = {"service": 0.0, "postgres": 0.0}
    assert server.proc is not None
    out["service"] = total(psutil.Process(server.proc.pid))
    pid_file = server.data_dir / "pg" / "postmaster.pid"
    try:
        postmaster = psutil.Process(int(pid_file.read_text().split()[0]))
        # Backends come and go: a finished one's time moves into the postmaster's children_* once reaped,
        # so live backends plus the postmaster's own and reaped children's time never goes backwards.
        reaped = postmaster.cpu_times()
        out["postgres"] = (
            total(postmaster)
            + float(reaped.children_user + reaped.children_system)
            + sum(total(c) for c in postmaster.children(recursive=True))
        )
    except (OSError, ValueError, IndexError, psutil.Error):
        pass
    return out


class SoakServer(Server):
    """``memos serve`` on embedded Postgres, with the pool size the soak asks for."""

    def __init__(self, workdir: Path, operator_key: str, pool_size: int) -> None:
        super().__init__(workdir, operator_key)
        self.pool_size = pool_size

    def _env(self) -> dict[str, str]:
        env = super()._env()
        env["MEMOS_DB_POOL_SIZE"] = str(self.pool_size)
        return env


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=50, help="concurrent clients (default 50)")
    p.add_argument("--seconds", type=float, default=60.0, help="how long the load runs (default 60)")
    p.add_argument("--tenants", type=int, default=5, help="tenants the clients are spread over (default 5)")
    p.add_argument("--seed-memories", type=int, default=200, help="memories per tenant before the load (default 200)")
    p.add_argument("--hot", type=int, default=10, help="memories per tenant all its clients PATCH (default 10)")
    p.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="iterations per second per client (0: none, each client sends as fast as it is answered)",
    )
    p.add_argument("--pool-size", type=int, default=10, help="MEMOS_DB_POOL_SIZE of the service (default 10)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "soak.json", help="where the JSON goes")
    args = p.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0 or args.tenants < 1 or args.hot < 1:
        p.error("--clients, --tenants and --hot must be >= 1 and --seconds > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    machine = machine_info()
    warnings: list[str] = []
    with tempfile.TemporaryDirectory(prefix="memos-soak-") as tmp:
        server = SoakServer(Path(tmp), "op-" + secrets.token_hex(24), args.pool_size)
        try:
            server.data_dir.mkdir(parents=True)
            server.start()
            cache = has_cache(server)
            tenants = setup(server, args.tenants, args.seed_memories, args.hot)
            print(f"seeded {args.tenants} tenants; {args.clients} clients for {args.seconds:g} s ...", flush=True)
            cpu_before, client_cpu_before = cpu_seconds(server), time.process_time()
            started = time.monotonic()
            stats = asyncio.run(run_load(server, tenants, args.clients, args.seconds, cache, args.rate))
            wall_s = time.monotonic() - started
            cpu_after, client_cpu = cpu_seconds(server), time.process_time() - client_cpu_before
            cpu = {k: round(cpu_after[k] - cpu_before[k], 1) for k in cpu_before} | {"clients": round(client_cpu, 1)}
            verify_started = time.monotonic()
            lost = asyncio.run(verify(server.base_url, tenants, stats.acks))
            verify_s = time.monotonic() - verify_started
            code = {**source_info(None), "schema": server.ready_body.get("schema")}
        finally:
            server.stop()
            warnings += server.warnings
    report = {
        "machine": machine,
        "code": code,
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "cache": cache},
        "operations": summarize(stats, wall_s),
        "result": {
            "wall_s": round(wall_s, 1),
            "acknowledged_writes": len(stats.acks),
            "lost": len(lost),
            "lost_samples": lost[:10],
            "unexpected": len(stats.unexpected),
            "unexpected_samples": stats.unexpected[:10],
            "transport_errors": dict(stats.transport_errors),
            "verify_s": round(verify_s, 1),
            "cpu_s": cpu,
        },
        "targets": {"unexpected": 0, "lost": 0, "p99_ms": P99_TARGET_MS},
        "warnings": warnings,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_report(report)
    print(f"results: {args.out}")
    return 1 if lost or stats.unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
