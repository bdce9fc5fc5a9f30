"""Runs an Embedder off the event loop: worker threads (lanes), a bounded queue, and micro-batching.

Concurrent requests that wait in the queue together are embedded as one batch. A full queue fails
fast with ``EmbedderBusy`` and a request before the model has loaded with ``EmbedderLoading``, so the
service can answer 503 with ``Retry-After`` instead of letting latency pile up.

With more than one lane, passes run side by side. The first lane (the primary) takes every request
it can; the others (spares) take one only while the primary is running a pass, and run it on one CPU
thread, while the primary gets the threads they leave: it asks again before each forward pass of its call
(a call of many texts is several passes), so a spare that starts in the middle of a long call takes a
thread from the passes that follow. Without that, the primary's two-thread team and the spare's thread
shared two cores until the primary's call ended: with two LoCoMo batch creates in flight the API embedded
0.71-0.75 of the raw embedder's best throughput against 0.76-0.82 with it (2026-12-06, AMD box).

On the 2-core box two one-thread passes side by side embedded LoCoMo sessions 5-36 % faster than the
same passes one after another on two threads, with nothing else running (a team of two OpenMP threads
meets at a barrier after each of a pass's many small ops; beside Postgres the team also waits for
whichever thread shares its core). So concurrent writes gain throughput, and a lone request keeps the
latency of all threads.

Only the primary lane ever runs a pass on more than one thread: OpenMP (libgomp) keeps a team of helper
threads per thread that starts a parallel region, and once the process holds more of them than it has
CPUs, every team stops spinning at its barriers and sleeps instead, on every one of a pass's many ops.
On the 2-core AMD box a LoCoMo question took 10 ms on two threads in a worker thread beside a second
team (one made by loading the model in another thread, or by a second lane) against 5-6 ms with one
team (2026-12-06). Anything else in the process that runs torch on several threads (the KV runtime)
adds a team too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import inspect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from enum import StrEnum
from types import TracebackType
from typing import Any, cast

from memos.embed.base import Embedder, ThreadLimited, Threads, Vectors, check_texts, empty
from memos.embed.errors import EmbedderBusy, EmbedderClosed, EmbedderLoadError, EmbedderLoading

log = logging.getLogger(__name__)


class WorkerState(StrEnum):
    NEW = "new"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    CLOSED = "closed"


@dataclasses.dataclass(eq=False, slots=True)
class _Job:
    texts: list[str]
    future: asyncio.Future[Vectors]
    loop: asyncio.AbstractEventLoop
    threads: int | None = None


@dataclasses.dataclass(slots=True)
class WorkerStats:
    """Counters for metrics and tests; ``batches < requests`` means requests were coalesced."""

    requests: int = 0
    texts: int = 0
    batches: int = 0
    rejected: int = 0
    busy_seconds: float = 0.0
    beside: int = 0
    """Passes that started while another lane was running one."""


def _settle(future: asyncio.Future[Vectors], result: Vectors | None, error: BaseException | None) -> None:
    if future.done():  # the caller gave up (cancelled) while the batch ran
        return
    if error is not None:
        future.set_exception(error)
    else:
        assert result is not None
        future.set_result(result)


class EmbedWorker:
    """Owns one Embedder and the ``lanes`` threads that run its ``embed`` calls (the first one loads it).

    ``factory`` builds the embedder; it runs in the worker thread, so ``start()`` does not block the
    loop while torch loads. ``max_queue`` bounds waiting requests and ``max_pending_texts`` the texts
    they hold (a single request larger than that is still accepted when nothing else waits).
    Requests waiting together are merged into one ``embed`` call of at most ``max_coalesce`` texts;
    ``linger`` (seconds, default 0) lets the thread wait briefly for more requests to merge.
    ``lanes`` (default 1) passes may run at once; an embedder with a ``threads`` count and a ``threads``
    argument to ``embed`` gets its threads divided among the lanes running (see the module docstring).
    """

    def __init__(
        self,
        factory: Callable[[], Embedder],
        *,
        max_queue: int = 256,
        max_pending_texts: int = 8192,
        max_coalesce: int = 256,
        linger: float = 0.0,
        retry_after: float = 1.0,
        thread_name: str = "memos-embed",
        lanes: int = 1,
    ) -> None:
        if max_queue < 1 or max_pending_texts < 1 or max_coalesce < 1 or lanes < 1 or linger < 0:
            raise ValueError("max_queue, max_pending_texts, max_coalesce and lanes must be >= 1, linger >= 0")
        self._factory = factory
        self._max_queue = max_queue
        self._max_pending_texts = max_pending_texts
        self._max_coalesce = max_coalesce
        self._linger = linger
        self._retry_after = retry_after
        self._thread_name = thread_name
        self._lanes = lanes
        self._running = 0  # lanes inside a pass, guarded by _cond
        self._primary_busy = False  # the primary lane is inside a pass, guarded by _cond
        self._cond = threading.Condition()
        self._jobs: deque[_Job] = deque()
        self._pending_texts = 0
        self._closing = False
        self._state = WorkerState.NEW
        self._embedder: Embedder | None = None
        self._error: BaseException | None = None
        self._threads: list[threading.Thread] = []
        self._loaded: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.stats = WorkerStats()

    @classmethod
    def for_embedder(cls, embedder: Embedder, **options: Any) -> EmbedWorker:
        """A worker around an embedder that is already loaded (tests, the CLI)."""
        return cls(lambda: embedder, **options)

    # -- state -----------------------------------------------------------------------------

    @property
    def state(self) -> WorkerState:
        return self._state

    @property
    def ready(self) -> bool:
        """True once the model has loaded and until ``close()``."""
        return self._state is WorkerState.READY

    @property
    def error(self) -> BaseException | None:
        """Why loading failed, when ``state`` is ``failed``."""
        return self._error

    @property
    def embedder(self) -> Embedder:
        """The loaded embedder; only call its methods from the worker (use ``embed``)."""
        if self._embedder is None or not self.ready:
            raise EmbedderLoading("the embedding model is not loaded", retry_after=self._retry_after)
        return self._embedder

    @property
    def name(self) -> str:
        return self.embedder.name

    @property
    def dims(self) -> int:
        return self.embedder.dims

    @property
    def queued_texts(self) -> int:
        """Texts waiting for the worker (not counting the batch it is running)."""
        return self._pending_texts

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the thread (once) and wait until the model has loaded; raises ``EmbedderLoadError`` if it fails.

        To serve while loading, run it as a task (``asyncio.create_task(worker.start())``): until it
        finishes, ``embed`` raises ``EmbedderLoading``.
        """
        self._ensure_thread()
        await self.wait_ready()

    async def wait_ready(self) -> None:
        """Wait for the model to load (bound it with ``asyncio.timeout``); raises ``EmbedderLoadError`` if it fails."""
        if not self._threads:
            raise EmbedderLoading("the embedding worker was not started", retry_after=self._retry_after)
        # Shielded: a caller timing out must not cancel the load that other callers wait on.
        await asyncio.shield(asyncio.wrap_future(self._loaded))

    async def close(self, join_timeout: float | None = 30.0) -> None:
        """Fail waiting requests with ``EmbedderClosed``, let the running batch finish, stop the thread."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            dropped = list(self._jobs)
            self._jobs.clear()
            self._pending_texts = 0
            self._cond.notify_all()
        for job in dropped:
            _settle(job.future, None, EmbedderClosed("the embedding worker was closed"))
        for thread in list(self._threads):
            if thread.is_alive():
                await asyncio.to_thread(thread.join, join_timeout)
        self._state = WorkerState.CLOSED
        self._embedder = None

    async def __aenter__(self) -> EmbedWorker:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- requests --------------------------------------------------------------------------

    async def embed(self, texts: Sequence[str], threads: int | None = None) -> Vectors:
        """Embed ``texts`` in the worker thread: ``[len(texts), dims]`` float32, rows L2-normalized.

        ``threads``: at most this many CPU threads, for a caller that keeps another core busy meanwhile (an
        embedder that takes no ``threads`` argument ignores it; requests coalesced into one pass get the
        smallest count any of them asked for).

        Raises ``EmbedderLoading`` before the model is ready, ``EmbedderBusy`` when the queue is full,
        ``EmbedderLoadError`` if loading failed and ``EmbedderClosed`` after ``close()``.
        """
        items = check_texts(texts)
        self._check_usable()
        if not items:
            return empty(self.dims)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Vectors] = loop.create_future()
        with self._cond:
            if self._closing:
                raise EmbedderClosed("the embedding worker was closed")
            too_many_texts = self._pending_texts > 0 and self._pending_texts + len(items) > self._max_pending_texts
            if len(self._jobs) >= self._max_queue or too_many_texts:
                self.stats.rejected += 1
                raise EmbedderBusy(
                    f"the embedding queue is full ({len(self._jobs)} requests, {self._pending_texts} texts waiting)",
                    retry_after=self._retry_after,
                )
            self._jobs.append(_Job(items, future, loop, threads))
            self._pending_texts += len(items)
            self.stats.requests += 1
            # Every lane looks: a spare waiting for the primary to be busy must not take the wakeup it needs.
            self._cond.notify_all()
        return await future

    def _check_usable(self) -> None:
        if self._closing or self._state is WorkerState.CLOSED:
            raise EmbedderClosed("the embedding worker was closed")
        if self._state is WorkerState.FAILED:
            raise EmbedderLoadError(f"the embedding model failed to load: {self._error}") from self._error
        if self._state is not WorkerState.READY:
            raise EmbedderLoading("the embedding model is still loading", retry_after=self._retry_after)

    # -- the worker thread -----------------------------------------------------------------

    def _ensure_thread(self) -> None:
        with self._cond:
            if self._closing:
                raise EmbedderClosed("the embedding worker was closed")
            if self._threads:
                return
            self._state = WorkerState.LOADING
            self._start_thread(self._run, self._thread_name)

    def _start_thread(self, target: Callable[..., None], name: str, *args: Any) -> None:
        # Daemon: a process exiting without close() must not hang on this thread.
        thread = threading.Thread(target=target, name=name, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _run(self) -> None:
        try:
            embedder = self._factory()
        except BaseException as exc:
            self._error = exc
            self._state = WorkerState.FAILED
            error = exc if isinstance(exc, EmbedderLoadError) else EmbedderLoadError(f"cannot load the embedder: {exc}")
            if error is not exc:
                error.__cause__ = exc
            self._loaded.set_exception(error)
            return
        self._embedder = embedder
        if not self._closing:
            self._state = WorkerState.READY
        self._loaded.set_result(None)
        # Once: the embedder does not change.
        takes_threads = _takes_threads(embedder)
        count = getattr(embedder, "threads", None)
        share = count if takes_threads and isinstance(count, int) and count > 1 else None
        with self._cond:
            for lane in range(1, self._lanes):
                if not self._closing:
                    self._start_thread(
                        self._serve, f"{self._thread_name}-{lane}", embedder, takes_threads, share, False
                    )
        # Kernels for query lengths are prepared while the worker is idle, one length at a time: the service
        # is ready at once, and a request that arrives meanwhile waits for one step at most (about 20 ms).
        steps = getattr(embedder, "warm_up_steps", None)
        self._serve(embedder, takes_threads, share, True, iter(steps()) if callable(steps) else None)

    def _serve(
        self,
        embedder: Embedder,
        takes_threads: bool,
        share: int | None,
        primary: bool,
        warming: Iterator[object] | None = None,
    ) -> None:
        """One lane: take the next batch and embed it, until closing. ``share``: the embedder's threads;
        ``primary``: the lane that takes work first and the only one that runs passes on several threads."""
        while True:
            if warming is not None and not self._has_work():
                try:
                    next(warming)
                except StopIteration:
                    warming = None
                except Exception as exc:  # an optimisation only: serve without it
                    log.warning("embedder warm-up failed", extra={"error": repr(exc)})
                    warming = None
                continue
            batch = self._take_batch(primary, warming is not None)
            if batch is None:
                break
            if batch:
                self._run_batch(embedder, batch, takes_threads, share, primary)

    def _has_work(self) -> bool:
        with self._cond:
            return bool(self._jobs) or self._running > 0 or self._closing

    def _may_take(self, primary: bool) -> bool:
        """A request waits and this lane may take it (a spare only beside the primary); hold ``_cond``."""
        return bool(self._jobs) and (primary or self._primary_busy)

    def _take_batch(self, primary: bool, until_idle: bool = False) -> list[_Job] | None:
        """Block for the next request, then merge the ones queued behind it; ``None`` once closing.

        A spare lane (not ``primary``) takes a request only while the primary runs a pass.
        ``until_idle``: return ``[]`` instead once no request waits and no lane runs (time to warm up)."""
        with self._cond:
            while True:
                while not self._may_take(primary) and not self._closing:
                    if until_idle and self._running == 0:
                        return []
                    self._cond.wait()
                if self._closing:
                    return None
                if self._linger > 0 and self._pending_texts < self._max_coalesce:
                    deadline = time.monotonic() + self._linger
                    while not self._closing and self._pending_texts < self._max_coalesce:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                    if self._closing:
                        return None
                # While this lane lingered another may have taken the queue, or (a spare) the primary gone idle.
                if self._may_take(primary):
                    break
            batch = [self._jobs.popleft()]
            count = len(batch[0].texts)
            while self._jobs and count + len(self._jobs[0].texts) <= self._max_coalesce:
                job = self._jobs.popleft()
                batch.append(job)
                count += len(job.texts)
            self._pending_texts -= count
            return batch

    def _run_batch(
        self, embedder: Embedder, batch: list[_Job], takes_threads: bool, share: int | None, primary: bool
    ) -> None:
        jobs = [job for job in batch if not job.future.done()]
        if not jobs:
            return
        texts = [text for job in jobs for text in job.texts]
        asked = [job.threads for job in jobs if job.threads is not None]
        with self._cond:
            self._running += 1
            self.stats.beside += self._running > 1
            if primary:
                self._primary_busy = True
                if self._jobs:  # a spare may take what waits behind this pass
                    self._cond.notify_all()
        limit: Threads = min(asked) if asked else None
        if share is not None and not primary:
            limit = 1
        elif share is not None:
            ceiling = min(asked, default=share)

            def limit() -> int:
                # The spares beside the primary run one thread each, and they may start or finish while this
                # call runs: the encoder asks before each of its forward passes. (An unlocked read of an int.)
                return max(1, min(ceiling, share - (self._running - 1)))

        started = time.perf_counter()
        try:
            if limit is not None and takes_threads:
                vectors = cast(ThreadLimited, embedder).embed(texts, threads=limit)
            else:
                vectors = embedder.embed(texts)
        except Exception as exc:
            for job in jobs:
                self._deliver(job, None, exc)
            return
        finally:
            with self._cond:
                self._running -= 1
                if primary:
                    self._primary_busy = False
                self.stats.batches += 1
                self.stats.texts += len(texts)
                self.stats.busy_seconds += time.perf_counter() - started
                # A lane waiting for the worker to go idle (to warm up) looks again.
                self._cond.notify_all()
        offset = 0
        for job in jobs:
            # Copy so one caller's array does not keep the whole batch alive (or alias another's rows).
            self._deliver(job, vectors[offset : offset + len(job.texts)].copy(), None)
            offset += len(job.texts)

    @staticmethod
    def _deliver(job: _Job, result: Vectors | None, error: BaseException | None) -> None:
        # A closed loop raises RuntimeError: its caller is gone and nobody waits for the result.
        with contextlib.suppress(RuntimeError):
            job.loop.call_soon_threadsafe(_settle, job.future, result, error)


def _takes_threads(embedder: Embedder) -> bool:
    """Whether ``embedder.embed`` accepts a ``threads`` limit (optional: the protocol asks only for texts)."""
    try:
        return "threads" in inspect.signature(embedder.embed).parameters
    except (TypeError, ValueError):
        return False
