"""The raw embedder for the benchmarks' throughput ratios, in a process of its own.

The ratio compares the service's batch create with the same encoder embedding the same texts and nothing
else. Run in the benchmark's own process, the raw embedder's passes would start an OpenMP team in a
second thread beside the service's embed lane, and libgomp then puts both teams to sleep at every
barrier (decisions 75): both sides ran 1.5-2x slower than either does alone. So the raw embedder runs
here, timed in this process around ``embed`` alone, and the benchmark takes turns with it (one waits
while the other runs). Vectors come back through a ``.npy`` file.

Protocol: one JSON object a line on stdin, one answer a line on stdout.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from memos.embed.registry import load_embedder


class RawEmbedder:
    """The bundled encoder in a child process: ``seconds`` to embed, ``vectors`` to rank with."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "bench.rawembed"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        self._dir = tempfile.TemporaryDirectory(prefix="memos-raw-")
        self.threads = int(self._ask({"op": "threads"})["threads"])

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self._proc.stdin is not None
        assert self._proc.stdout is not None
        try:
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        except OSError as exc:
            raise RuntimeError(f"the raw embedder process ended (exit code {self._proc.poll()})") from exc
        if not line:
            raise RuntimeError(f"the raw embedder process ended (exit code {self._proc.poll()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def same_passes_as(self, pass_cost: int) -> None:
        """Group texts into forward passes as an encoder with this ``pass_cost`` does (each warm-up measures its
        own, and two measurements may differ by a power of two: the ratio compares the same passes)."""
        self._ask({"op": "pass_cost", "pass_cost": pass_cost})

    def seconds(self, texts: list[str]) -> float:
        """Seconds for one ``embed`` call on ``texts`` with all the encoder's threads."""
        return float(self._ask({"op": "time", "texts": texts})["seconds"])

    def side_by_side(self, batches: list[list[str]], lanes: int) -> float:
        """Seconds to embed ``batches`` in ``lanes`` threads at once, each call on its share of the threads."""
        return float(self._ask({"op": "side", "batches": batches, "lanes": lanes})["seconds"])

    def vectors(self, texts: list[str], each: bool = False) -> np.ndarray:
        """The vectors of ``texts``: one call, or one call per text (``each``, as a query is embedded)."""
        out = Path(self._dir.name) / "vectors.npy"
        self._ask({"op": "vectors", "texts": texts, "each": each, "out": str(out)})
        vectors: np.ndarray = np.load(out, allow_pickle=False)
        return vectors

    def close(self) -> None:
        try:
            if self._proc.stdin is not None:
                self._proc.stdin.close()
            self._proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self._proc.kill()
            self._proc.wait()
        finally:
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            self._dir.cleanup()

    def __enter__(self) -> RawEmbedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _serve() -> None:
    embedder: Any = load_embedder(None)
    embedder.warm_up()  # traced, as the service's embed worker makes it before it serves
    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        answer: dict[str, Any]
        if op == "threads":
            answer = {"threads": embedder.threads}
        elif op == "pass_cost":
            embedder.pass_cost = int(request["pass_cost"])
            answer = {"pass_cost": embedder.pass_cost}
        elif op == "time":
            started = time.perf_counter()
            embedder.embed(request["texts"])
            answer = {"seconds": time.perf_counter() - started}
        elif op == "side":
            lanes = int(request["lanes"])
            share = max(1, int(embedder.threads) // lanes)
            parts = [request["batches"][i::lanes] for i in range(lanes)]

            def run(part: list[list[str]], share: int = share) -> None:
                for texts in part:
                    embedder.embed(texts, threads=share)

            with ThreadPoolExecutor(lanes) as pool:
                started = time.perf_counter()
                list(pool.map(run, parts))
                answer = {"seconds": time.perf_counter() - started}
        elif op == "vectors":
            texts = request["texts"]
            if request["each"] and texts:
                vectors = np.concatenate([embedder.embed([t]) for t in texts])
            else:
                vectors = embedder.embed(texts)
            np.save(request["out"], vectors, allow_pickle=False)
            answer = {"rows": len(vectors)}
        else:
            answer = {"error": f"unknown op {op!r}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve()
