"""HTTP endpoints for models, KV activations (build, list, export, import) and generation."""

from __future__ import annotations

import asyncio
import dataclasses
import io
from typing import Annotated, Any

from litestar import Controller, Request, Response, get, post
from litestar.datastructures import ResponseHeader
from litestar.exceptions import ClientException, HTTPException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIFormat, OpenAPIMediaType, OpenAPIType, Operation, RequestBody, Schema
from litestar.params import FromPath, JSONBody, QueryParameter

from memos.activations import schemas
from memos.deps import Activations, CurrentPrincipal
from memos.http import Cursor, Limit, created, parse_id
from memos.openapi import LOCATION, errors
from memos.pagination import DEFAULT_LIMIT, Page

KV_MEDIA_TYPE = "application/octet-stream"
EXISTING = {
    200: ResponseSpec(
        data_container=schemas.Activation,
        description="A fresh activation of this memory version and model exists: it is returned, nothing is stored",
    )
}
"""The second success of a build and an import, beside their 201 (the OpenAPI document must name every status)."""

KV_HEADERS = [
    ResponseHeader(
        name="X-Memos-Fingerprint",
        documentation_only=True,
        required=True,
        description="The model's fingerprint",
    ),
    ResponseHeader(
        name="X-Memos-SHA256",
        documentation_only=True,
        required=True,
        description="SHA-256 of the file sent",
    ),
    ResponseHeader(
        name="X-Memos-Activation",
        documentation_only=True,
        required=True,
        description="The activation's id",
    ),
    ResponseHeader(name="ETag", documentation_only=True, required=True, description="The file's SHA-256, quoted"),
    ResponseHeader(
        name="X-Memos-Repaired",
        documentation_only=True,
        required=False,
        description="Present when the stored file was missing or failed its checksum and was rebuilt first",
    ),
]
"""What the KV download sends beside the file (``_kv_headers``), for the OpenAPI document."""


@dataclasses.dataclass
class _ImportOperation(Operation):
    """The import's operation: its body is the raw file, read by the handler, so Litestar declares none."""

    def __post_init__(self) -> None:
        binary = Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY)
        self.request_body = RequestBody(
            content={KV_MEDIA_TYPE: OpenAPIMediaType(schema=binary)},
            required=True,
            description="A memos-kv/1 file (safetensors), at most MEMOS_MAX_KV_BYTES",
        )


def _kv_headers(activation: schemas.Activation, sha256: str) -> dict[str, str]:
    return {
        "X-Memos-Fingerprint": activation.fingerprint,
        "X-Memos-SHA256": sha256,
        "X-Memos-Activation": str(activation.id),
        "ETag": f'"{sha256}"',
    }


BODY_IDLE_S = 30.0
"""How long an import waits for the next piece of its body. A client that stopped sending held its import place
(one of two in the process) for as long as it kept the connection open (found in review)."""


def _built(activation: schemas.Activation, is_new: bool) -> Response[schemas.Activation]:
    """201 with where to read it for a new activation; 200 for the fresh one that was there."""
    if is_new:
        return created(activation, f"/v1/activations/{activation.id}")
    return Response(activation, status_code=200)  # a POST handler's default would be 201


class _RequestUpload:
    """The import's body, read from the ASGI channel only when the service asks (``service.KVUpload``).

    Not ``request.body()``: that read the whole body before any check, and held it twice while joining its
    chunks. The chunks go into one ``BytesIO``, whose ``getvalue()`` hands over its own buffer without a copy.
    A body never read is discarded by the server (uvicorn reads and drops the rest, and the response is sent)."""

    def __init__(self, request: Request[Any, Any, Any], limit: int | None) -> None:
        self._request = request
        self._limit = limit
        self._first = b""
        """What ``empty`` received of a chunked body, for ``read``."""
        self._more = True

    async def _receive(self) -> bytes:
        try:
            async with asyncio.timeout(BODY_IDLE_S):
                message = await self._request.receive()
        except TimeoutError:
            raise HTTPException(
                status_code=408, detail=f"request timeout: no part of the body arrived for {BODY_IDLE_S:g} s"
            ) from None
        if message["type"] != "http.request":  # http.disconnect: the client went away mid-body
            raise ClientException("the client disconnected before the body was complete")
        self._more = message.get("more_body", False)
        return message.get("body", b"")

    async def empty(self) -> bool:
        length = self._request.content_length
        if length is not None:
            return length == 0
        # Chunked (no Content-Length): only the first bytes can tell. One ASGI message is at most the server's
        # read buffer (uvicorn pauses reading past 64 KiB), kept for read().
        while self._more and not self._first:
            self._first = await self._receive()
        return not self._first

    async def read(self) -> bytes:
        buffer = io.BytesIO()
        total = 0
        piece, self._first = self._first, b""
        while True:
            total += len(piece)
            if self._limit is not None and total > self._limit:  # as it arrives: a chunked body declares no length
                raise RequestEntityTooLarge
            buffer.write(piece)
            if not self._more:
                return buffer.getvalue()
            piece = await self._receive()


class ActivationController(Controller):
    path = "/v1"
    tags = ["activations"]

    @get(
        "/models",
        summary="Configured causal LMs for KV activations, by name (loads each once to learn its fingerprint)",
    )
    async def list_models(
        self,
        principal: CurrentPrincipal,
        activations: Activations,
        limit: Limit = DEFAULT_LIMIT,
        cursor: Cursor = None,
    ) -> Page[schemas.Model]:
        return await activations.list_models(principal, limit, cursor)

    @post(
        "/memories/{memory_id:str}/activations",
        summary="Build the memory's KV for a model now (201), or return the fresh one that exists (200)",
        responses={**EXISTING, **errors(409)},
        response_headers=[LOCATION],
    )
    async def build_activation(
        self,
        memory_id: FromPath[str],
        data: JSONBody[schemas.BuildIn],
        principal: CurrentPrincipal,
        activations: Activations,
    ) -> Response[schemas.Activation]:
        activation, is_new = await activations.build(principal, parse_id(memory_id, "memory"), data)
        return _built(activation, is_new)

    @get("/memories/{memory_id:str}/activations", summary="A memory's activations, oldest first")
    async def list_activations(
        self,
        memory_id: FromPath[str],
        principal: CurrentPrincipal,
        activations: Activations,
        limit: Limit = DEFAULT_LIMIT,
        cursor: Cursor = None,
    ) -> Page[schemas.Activation]:
        return await activations.list_for_memory(principal, parse_id(memory_id, "memory"), limit, cursor)

    @get("/activations/{activation_id:str}", summary="One activation")
    async def get_activation(
        self, activation_id: FromPath[str], principal: CurrentPrincipal, activations: Activations
    ) -> schemas.Activation:
        return await activations.get(principal, parse_id(activation_id, "activation"))

    @get(
        "/activations/{activation_id:str}/kv",
        summary="The activation's memos-kv/1 file (safetensors), checksum-verified before it is sent",
        media_type=KV_MEDIA_TYPE,
        responses=errors(409),
        response_headers=KV_HEADERS,
    )
    async def download_kv(
        self, activation_id: FromPath[str], principal: CurrentPrincipal, activations: Activations
    ) -> Response[bytes]:
        data, sha256, activation, repaired = await activations.kv_file(principal, parse_id(activation_id, "activation"))
        headers = _kv_headers(activation, sha256)
        if repaired is not None:
            headers["X-Memos-Repaired"] = f"rebuilt after the stored file {repaired}"
        return Response(data, media_type=KV_MEDIA_TYPE, headers=headers)

    @post(
        "/generate",
        status_code=200,
        summary="Generate on top of memories, reusing their stored KV",
        responses=errors(404, 409),
    )
    async def generate(
        self, data: JSONBody[schemas.GenerateIn], principal: CurrentPrincipal, activations: Activations
    ) -> schemas.Generation:
        return await activations.generate(principal, data)


class ActivationImportController(Controller):
    """Mounted on its own router: its body limit is ``MEMOS_MAX_KV_BYTES``, not the JSON one."""

    path = "/v1/activations/import"
    tags = ["activations"]

    @post(
        "/",
        summary="Import a memos-kv/1 file for a memory (format, checksum, fingerprint, shapes and tokens checked)",
        # The body is the raw file (_ImportOperation declares it): 413 and 422 come by memos.openapi's rule.
        responses={**EXISTING, **errors(404, 408, 409)},
        response_headers=[LOCATION],
        operation_class=_ImportOperation,
    )
    async def import_kv(
        self,
        request: Request[Any, Any, Any],
        principal: CurrentPrincipal,
        activations: Activations,
        memory_id: Annotated[str, QueryParameter(description="The memory the KV is of")],
        model: Annotated[str, QueryParameter(description="A configured model name")],
    ) -> Response[schemas.Activation]:
        # MEMOS_MAX_KV_BYTES, set on this controller's router (memos.app).
        limit = request.route_handler.resolve_request_max_body_size()
        if limit is not None and (request.content_length or 0) > limit:
            raise RequestEntityTooLarge  # as before: a declared length over the limit is refused first, unread
        upload = _RequestUpload(request, limit)
        activation, is_new = await activations.import_file(principal, parse_id(memory_id, "memory"), model, upload)
        return _built(activation, is_new)
