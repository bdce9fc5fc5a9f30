"""The configured causal LMs, loaded lazily, and the one thread that runs every KV computation.

torch is imported only when a model is first needed (inside the worker thread), so the API starts
without it. Prefill, compose and generation all block for a long time: they run one at a time in a
single worker thread (torch already uses every core inside one call) behind a bounded queue, so the
event loop stays free and an overloaded service answers 503 instead of piling up work.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from memos.errors import Conflict, FieldError, Invalid, Unavailable
from memos.kv.spec import ModelSpec

if TYPE_CHECKING:
    from memos.kv.runtime import LoadedModel

log = logging.getLogger(__name__)

T = TypeVar("T")

EXAMPLE_MODELS = json.dumps({"my-model": {"path": "/models/qwen2.5-0.5b", "dtype": "float32", "device": "auto"}})
HOW_TO_CONFIGURE = (
    "no causal LM is configured for KV activations: set MEMOS_MODELS to a JSON object naming local Hugging Face "
    f"model directories, e.g. MEMOS_MODELS='{EXAMPLE_MODELS}', and restart memos "
    "(`memos dev make-model DIR` writes a small random model to try it with)"
)


LOAD_FAILED = "its directory did not load on this server (the server's log names the error)"
"""Why a model is unavailable, as callers read it."""


class NoModelConfigured(Conflict):
    slug = "no-model"
    title = "No model configured"


class KVBusy(Unavailable):
    slug = "kv-busy"
    title = "KV worker busy"


class ModelUnavailable(Unavailable):
    """A configured model whose directory does not load: 503 for the requests that need it (and only those)."""


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[[], None]) -> None:
    """Run ``fn`` on ``loop`` from any thread; nothing if the loop has closed (the service is stopping)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn)


class KVWorker:
    """One thread for all KV compute, with at most ``max_pending`` calls queued or running."""

    def __init__(self, max_pending: int = 32) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="memos-kv")
        self._max_pending = max_pending
        self._pending = 0

    def check_room(self) -> None:
        """503 ``kv-busy`` now if a job would be refused: before a request reads anything for its job."""
        if self._pending >= self._max_pending:
            raise KVBusy("the KV worker has too much queued work; retry shortly", headers={"Retry-After": "2"})

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        self.check_room()
        loop = asyncio.get_running_loop()
        job = self._executor.submit(fn, *args, **kwargs)
        self._pending += 1
        # Counted until the job itself ends, not its caller: a caller that goes away (a client that
        # disconnects) cancels a queued job, but one already running runs on, and freeing its place at
        # once let one more job in than the bound for each such caller (found in review).
        job.add_done_callback(lambda _: _call_soon(loop, self._job_done))
        return await asyncio.wrap_future(job)

    def _job_done(self) -> None:
        self._pending -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


RETRY_FAILED_LOAD_S = 30.0
"""How long a model that failed to load answers 503 before a request loads it again (its ``Retry-After``)."""


class ModelRegistry:
    """The models of ``MEMOS_MODELS`` by name; each is loaded once, on first use, in the KV worker.

    A load that fails is remembered for ``retry_failed_after`` seconds: every request in that time gets the same
    503 at once. Without it, each listing or build loaded the broken directory again (reading its files, an ERROR
    with a traceback each time) in the worker other tenants' generations wait on."""

    def __init__(
        self,
        specs: dict[str, ModelSpec],
        worker: KVWorker,
        before_load: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.specs = dict(specs)
        self.worker = worker
        # transformers patches class attributes while ``from_pretrained`` runs (weight tying among them), so two
        # loads in two threads at once can leave a tied model's lm_head unloaded. The app passes a wait for the
        # embedder's own load here, so a causal LM never loads at the same time.
        self.before_load = before_load
        self._loaded: dict[str, LoadedModel] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._failed: dict[str, tuple[float, str]] = {}
        """Name -> (the ``clock`` when it failed, why)."""
        self.retry_failed_after = RETRY_FAILED_LOAD_S
        self.clock: Callable[[], float] = time.monotonic
        """What the failures are timed by (a test moves it on instead of sleeping)."""

    def require_configured(self) -> None:
        if not self.specs:
            raise NoModelConfigured(HOW_TO_CONFIGURE)

    def spec(self, name: str, field: str = "model") -> ModelSpec:
        """The spec named ``name``: 409 when none is configured at all, 422 on ``field`` for an unknown name."""
        self.require_configured()
        spec = self.specs.get(name)
        if spec is None:
            known = ", ".join(sorted(self.specs))
            message = f"no model named {name!r} is configured (configured: {known})"
            raise Invalid(f"{field}: {message}", errors=[FieldError(field, message)])
        return spec

    def loaded(self, name: str) -> LoadedModel | None:
        return self._loaded.get(name)

    async def get(self, name: str, field: str = "model") -> LoadedModel:
        spec = self.spec(name, field)
        if (lm := self._loaded.get(name)) is not None:
            return lm
        self._raise_if_failed(name)
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            if (lm := self._loaded.get(name)) is not None:
                return lm
            self._raise_if_failed(name)  # a load that failed while this request waited for the lock
            if self.before_load is not None:
                await self.before_load()
            try:
                lm = await self.worker.run(_load, spec)
            except KVBusy:
                raise
            except Exception as exc:  # whatever a model directory does wrong, it is the server's configuration
                log.error("model failed to load", extra={"model": name, "error": str(exc)}, exc_info=exc)
                # Every tenant reads the reason (GET /v1/models, the 503s): the error, which names the server's
                # directories, stays in the log (a security review found the paths in both).
                self._failed[name] = (self.clock(), f"model {name!r} could not be loaded: {LOAD_FAILED}")
                raise self._unavailable(name) from None
            self._failed.pop(name, None)
            self._loaded[name] = lm
            log.info("model loaded", extra={"model": name, "fingerprint": lm.fingerprint, "device": str(lm.device)})
            return lm

    def _raise_if_failed(self, name: str) -> None:
        failed = self._failed.get(name)
        if failed is not None and failed[0] + self.retry_failed_after > self.clock():
            raise self._unavailable(name)

    def _unavailable(self, name: str) -> ModelUnavailable:
        """The 503 of a remembered failure, its ``Retry-After`` the seconds left until a request loads it again."""
        failed_at, why = self._failed[name]
        left = failed_at + self.retry_failed_after - self.clock()
        return ModelUnavailable(why, headers={"Retry-After": str(max(1, math.ceil(left)))})


def _load(spec: ModelSpec) -> LoadedModel:
    from memos.kv.runtime import load_model

    return load_model(spec)
