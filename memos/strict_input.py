"""Request input read as the JSON or the query string wrote it: no ``"5"`` for 5, ``1`` for true, 5 for a time.

Litestar converts a handler's arguments with msgspec's lax rules (``strict=False``), which query strings need
(every value there is text) but which also read a JSON body's ``"5"`` as 5, ``1`` or ``"true"`` as true and
``5`` as a Unix time. So a JSON body is decoded here, strictly, straight into the handler's type (Litestar then
takes the Struct as it is: one decode, no lax conversion), and a query parameter of an integer or a time must be
written as one. A refusal is Litestar's own :class:`ValidationException`, so the app's one mapping of those
turns it into a 422 naming the field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import datetime
from functools import partial
from typing import Any

import msgspec
from litestar import Litestar, Request
from litestar.exceptions import SerializationException, ValidationException
from litestar.handlers import HTTPRouteHandler
from litestar.routes import HTTPRoute
from litestar.serialization import default_deserializer
from litestar.types import TypeDecodersSequence
from litestar.typing import FieldDefinition

from memos.validation import BLANK_MESSAGE, LINK_TYPE, NON_BLANK, VISIBLE

_AT = re.compile(r" - at `\$\.?(.*)`$")
_WANTS_INT_GOT_FLOAT = re.compile(r"Expected `([^`]*)`, got `float`")


def decode_body(body: bytes, target: Any, type_decoders: TypeDecodersSequence) -> Any:
    """``body`` (JSON) as a ``target``, by msgspec's strict rules but for one thing: a whole float is an integer.

    JSON Schema counts 5.0 as an integer, and so the published schema does (the fuzzer sends such numbers), so
    5.0 stays a valid ``k`` or ``ttl_seconds``, as it was; 5.5, "5" or true are not. Malformed JSON raises
    :class:`SerializationException` (a 400, as Litestar answers it), a body that breaks the schema raises
    :class:`ValidationException` (a 422).
    """
    body = body or b"null"  # no body is null, as Litestar reads it
    dec_hook = partial(default_deserializer, type_decoders=type_decoders)
    try:
        # The common case, and the whole cost: one strict decode (cheaper than Litestar's decode and convert).
        return msgspec.json.decode(body, type=target, strict=True, dec_hook=dec_hook)
    except msgspec.ValidationError as exc:
        error = exc
    except msgspec.DecodeError as exc:
        raise _malformed(body, exc) from exc
    # Refused. Malformed JSON is a 400 even where a schema error came first in the text.
    try:
        tree = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise _malformed(body, exc) from exc
    wanted = _WANTS_INT_GOT_FLOAT.match(str(error))
    if wanted is None or "int" not in wanted.group(1).split(" | "):
        raise _invalid(error) from None
    # A whole float where an integer goes: check the body with every whole float as an integer (a float field
    # takes an integer, strict or not), then decode it leniently, which reads 5.0 as 5 only where an integer
    # goes and keeps free-form values (metadata) as they were sent. Lenient is safe here: the strict check saw
    # the same strings, booleans and nulls.
    try:
        msgspec.convert(_whole_floats_as_ints(tree), target, strict=True, dec_hook=dec_hook, str_keys=True)
    except msgspec.ValidationError as exc:
        raise _invalid(exc) from None
    return msgspec.json.decode(body, type=target, strict=False, dec_hook=dec_hook)


def _whole_floats_as_ints(tree: Any) -> Any:
    """``tree`` (decoded JSON, changed in place) with each float that is a whole number as an int. No recursion:
    free-form metadata may nest as deep as the parser allows."""
    root: list[Any] = [tree]
    stack: list[tuple[Any, Any]] = [(root, 0)]
    while stack:
        holder, key = stack.pop()
        item = holder[key]
        if isinstance(item, float) and item.is_integer():
            holder[key] = int(item)
        elif isinstance(item, dict):
            stack.extend((item, k) for k in item)
        elif isinstance(item, list):
            stack.extend((item, i) for i in range(len(item)))
    return root[0]


_PATTERNS = {
    f"Expected `str` matching regex {NON_BLANK!r}": "must contain a character that is not a space",
    f"Expected `str` matching regex {VISIBLE!r}": BLANK_MESSAGE,
    f"Expected `str` matching regex {LINK_TYPE!r}": "must be a letter, then letters, digits or _ . : -",
}
"""msgspec's words for a text its pattern refuses showed the user our regex; these say what it wants."""


def _invalid(error: msgspec.ValidationError) -> ValidationException:
    """msgspec's error about the body, keyed by its path under the body (``data``: the body itself)."""
    text = str(error)
    at = _AT.search(text)
    message = text[: at.start()] if at else text
    message = _PATTERNS.get(message, message)
    return _refused((at.group(1) if at else "") or "data", message, "body")


def _malformed(body: bytes, error: msgspec.DecodeError) -> SerializationException:
    """Malformed JSON (a 400). msgspec calls a string with half of a UTF-16 surrogate pair in it "truncated"."""
    if b"\\u" in body and _has_lone_surrogate(body):
        return SerializationException(
            "a \\uD800-\\uDFFF escape must be one half of a surrogate pair: alone it is not text"
        )
    return SerializationException(str(error))


def _has_lone_surrogate(body: bytes) -> bool:
    """Whether ``body`` is JSON but for half a surrogate pair in a string (Python's parser takes those, and
    reads escaped backslashes as they are: ``"C:\\\\uD800"`` is no surrogate). Only on a refused body."""
    try:
        # Python's encoder keeps a lone surrogate as it is, and UTF-8 cannot encode one.
        json.dumps(json.loads(body), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    except (ValueError, RecursionError):
        return False
    return False


def _refused(key: str, message: str, source: str) -> ValidationException:
    """A refusal in the shape Litestar gives its own, for the app's one mapping of them."""
    return ValidationException(
        detail="the request is invalid", extra=[{"key": key, "message": message, "source": source}]
    )


_INTEGER = re.compile(r"-?[0-9]+")
_NUMBER = re.compile(r"[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?")


def _integer_problem(value: str) -> str | None:
    # Lax conversion also reads "1e2" and "100.0" as 100.
    return None if _INTEGER.fullmatch(value) else f"Expected an integer (digits, optionally after -), got {value!r}"


def _time_problem(value: str) -> str | None:
    # Lax conversion reads a number as a Unix time.
    return "Expected an RFC 3339 date-time, got a number" if _NUMBER.fullmatch(value) else None


_QUERY_CHECKS: dict[Any, Callable[[str], str | None]] = {int: _integer_problem, datetime: _time_problem}


def _scalar(field: FieldDefinition) -> Any:
    """The type of each value of a query parameter: ``int`` for ``int | None`` and for ``list[int]``."""
    if field.is_optional:
        field = next(inner for inner in field.inner_types if not inner.is_none_type)
    if field.is_non_string_sequence and field.inner_types:
        field = field.inner_types[0]
    return field.annotation


class StrictQuery:
    """A ``before_request`` hook: the integer and date-time query parameters of a request, each value written as
    one, and a parameter that takes one value given once. Which parameters those are is worked out once per
    handler, by :meth:`learn`, from Litestar's own reading of the handler's signature.

    Litestar keeps the last of a repeated single-valued parameter: ``?state=active&state=deleted`` listed the
    deleted memories only, with no error (found by a new user)."""

    def __init__(self) -> None:
        self._checks: dict[HTTPRouteHandler, list[tuple[str, str, Callable[[str], str | None]]]] = {}
        self._single: dict[HTTPRouteHandler, list[str]] = {}

    def learn(self, app: Litestar) -> None:
        """Find the parameters to check in every route of ``app`` (the routes exist once the app is built)."""
        for route in app.routes:
            if not isinstance(route, HTTPRoute):
                continue
            for handler, kwargs_model in route.route_handler_map.values():
                fields = handler.parsed_fn_signature.parameters
                checks = [
                    (p.field_name, p.field_alias, check)
                    for p in kwargs_model.expected_query_params
                    if p.field_name in fields and (check := _QUERY_CHECKS.get(_scalar(fields[p.field_name])))
                ]
                if checks:
                    self._checks[handler] = checks
                sequences = set(kwargs_model.sequence_query_parameter_names)
                single = sorted(
                    p.field_alias for p in kwargs_model.expected_query_params if p.field_alias not in sequences
                )
                if single:
                    self._single[handler] = single

    async def __call__(self, request: Request[Any, Any, Any]) -> None:
        # async, though it awaits nothing: Litestar runs a sync before_request hook in a worker thread, and that
        # hop cost every request (every route, /healthz too) 0.15-0.3 ms on the 2-core box, more than the checks.
        query = request.query_params
        for alias in self._single.get(request.route_handler, ()):
            if len(query.getall(alias, [])) > 1:
                raise _refused(alias, "given more than once; it takes one value", "query")
        for name, alias, check in self._checks.get(request.route_handler, ()):
            for value in query.getall(alias, []):
                if (problem := check(value)) is not None:
                    raise _refused(name, problem, "query")
