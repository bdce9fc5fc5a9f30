"""The served OpenAPI document, made to tell the truth about errors and request bodies.

Litestar documents each handler's success response and a generic ``400`` whose body is
not what memos sends. memos answers every error with ``application/problem+json``
(``memos.errors.Problem``) and refuses unknown body fields, so after Litestar has built
the document, :func:`complete` rewrites it by rules that hold for every operation,
including ones added later:

- every ``/v1`` operation (it declares ``security``) may answer 401, 403, 429 and 503;
- an operation with a request body may answer 413 (too large) and 422, and with a JSON one 400 (not JSON);
- an operation with query or header parameters may answer 422; one with path parameters, 404;
- every response with a status of 400 or more carries a ``Problem`` body; 429 and 503 carry
  ``Retry-After``;
- parameters are strings on the wire, so the ``null`` alternative Litestar gives optional
  parameters is dropped (an absent parameter is how "none" is said).

Codes only some operations answer (409, 412, 428) are declared on the handler with
:func:`errors`. Request structs declared ``forbid_unknown_fields`` are documented with
``additionalProperties: false`` by :class:`StrictStructSchemaPlugin`.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import msgspec
from litestar._openapi.schema_generation.plugins.struct import StructSchemaPlugin
from litestar.datastructures import ResponseHeader
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import (
    OpenAPI,
    OpenAPIHeader,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    Reference,
    Schema,
)
from litestar.typing import FieldDefinition

PROBLEM_JSON = "application/problem+json"
PROBLEM_REF = "#/components/schemas/Problem"

_DESCRIPTIONS = {
    400: "The body is not valid JSON",
    401: "No valid API key",
    403: "The caller's role or grant does not allow this (a read-only grant used to write)",
    404: "No such resource, or one the caller may not see (never confirms that it exists)",
    408: "The request body stopped arriving",
    409: "The change conflicts with existing data",
    412: "If-Match names a version that is not the current one (nothing changed)",
    413: "The request body is larger than the server accepts",
    422: "The request breaks the schema or a rule; `errors` names each field",
    428: "If-Match is required",
    429: "Too many requests for this API key; retry after `Retry-After` seconds",
    503: "The database (or the embedding model) is not available yet; retry after `Retry-After` seconds",
}

ETAG = ResponseHeader(
    name="ETag",
    documentation_only=True,
    description='The memory\'s version as an entity tag ("3"): send it back in If-Match',
)
"""The header every response that carries a memory sets (documented on those handlers)."""

LOCATION = ResponseHeader(
    name="Location",
    documentation_only=True,
    description="On 201: the path to read what was created (RFC 9110)",
)
"""The header a 201 that made one readable resource sets (documented on those handlers)."""


def errors(*codes: int) -> dict[int, ResponseSpec]:
    """Problem responses a handler declares beyond the ones :func:`complete` adds by rule."""
    return {
        code: ResponseSpec(data_container=None, description=_DESCRIPTIONS.get(code, HTTPStatus(code).phrase))
        for code in codes
    }


class StrictStructSchemaPlugin(StructSchemaPlugin):
    """Litestar's msgspec plugin, made to state every rule msgspec enforces on a struct.

    Litestar leaves out two: ``forbid_unknown_fields`` (documented here as ``additionalProperties:
    false``) and the constraints on the items of a list (``list[Annotated[str, Meta(min_length=1)]]``
    came out as a list of any strings). Without them the document invites input the server refuses.
    """

    def to_openapi_schema(self, field_definition: FieldDefinition, schema_creator: Any) -> Schema:
        schema = super().to_openapi_schema(field_definition, schema_creator)
        struct = field_definition.type_
        config = getattr(struct, "__struct_config__", None)
        if isinstance(config, msgspec.structs.StructConfig) and config.forbid_unknown_fields:
            schema.additional_properties = False
        info = msgspec.inspect.type_info(struct)
        if isinstance(info, msgspec.inspect.StructType):
            for field in info.fields:
                prop = (schema.properties or {}).get(field.encode_name)
                _constrain_scalar(prop, field.type)
                _constrain_items(prop, field.type)
        return schema


_SEQUENCES = (msgspec.inspect.ListType, msgspec.inspect.SetType, msgspec.inspect.FrozenSetType)
_CONSTRAINTS = {
    msgspec.inspect.StrType: ("min_length", "max_length", "pattern"),
    msgspec.inspect.IntType: ("ge", "le", "gt", "lt"),
    msgspec.inspect.FloatType: ("ge", "le", "gt", "lt"),
}
_SCHEMA_KEYWORD = {
    "min_length": "min_length",
    "max_length": "max_length",
    "pattern": "pattern",
    "ge": "minimum",
    "le": "maximum",
    "gt": "exclusive_minimum",
    "lt": "exclusive_maximum",
}


def _constrain_scalar(prop: Schema | Reference | None, field_type: msgspec.inspect.Type) -> None:
    """Write a scalar field's constraints onto its schema; Litestar drops a bound of 0 (``ge=0``) as unset."""
    if isinstance(field_type, msgspec.inspect.UnionType):
        scalars = [t for t in field_type.types if not isinstance(t, msgspec.inspect.NoneType)]
        if len(scalars) != 1:
            return
        field_type = scalars[0]
    if not isinstance(prop, Schema):
        return
    for name in _CONSTRAINTS.get(type(field_type), ()):
        value = getattr(field_type, name)
        if value is not None:
            setattr(prop, _SCHEMA_KEYWORD[name], value)


def _constrain_items(prop: Schema | Reference | None, field_type: msgspec.inspect.Type) -> None:
    """Copy msgspec's constraints on a sequence's items into the property's ``items`` schema."""
    if isinstance(field_type, msgspec.inspect.UnionType):
        sequences = [t for t in field_type.types if isinstance(t, _SEQUENCES)]
        if len(sequences) != 1:
            return
        field_type = sequences[0]
    if not isinstance(field_type, _SEQUENCES) or not isinstance(prop, Schema):
        return
    item = field_type.item_type
    names = _CONSTRAINTS.get(type(item), ())
    arrays = [prop] if prop.type == OpenAPIType.ARRAY else [s for s in prop.one_of or [] if isinstance(s, Schema)]
    for array in arrays:
        if array.type == OpenAPIType.ARRAY and isinstance(array.items, Schema):
            for name in names:
                value = getattr(item, name)
                if value is not None:
                    setattr(array.items, _SCHEMA_KEYWORD[name], value)


def _problem_schema() -> Schema:
    string = Schema(type=OpenAPIType.STRING)
    field_error = Schema(
        type=OpenAPIType.OBJECT,
        required=["field", "message"],
        properties={"field": string, "message": string},
        additional_properties=False,
    )
    return Schema(
        title="Problem",
        description="An RFC 9457 problem document; `errors` lists invalid fields (dotted paths into the request).",
        type=OpenAPIType.OBJECT,
        required=["detail", "status", "title", "type"],
        properties={
            "type": string,
            "title": string,
            "status": Schema(type=OpenAPIType.INTEGER),
            "detail": string,
            "errors": Schema(type=OpenAPIType.ARRAY, items=field_error),
            "extra": Schema(type=OpenAPIType.OBJECT, additional_properties=True),
        },
        additional_properties=False,
    )


def _problem_response(code: int, description: str | None) -> OpenAPIResponse:
    headers: dict[str, OpenAPIHeader | Reference] | None = None
    if code in (429, 503):
        headers = {
            "Retry-After": OpenAPIHeader(
                schema=Schema(type=OpenAPIType.STRING, pattern=r"^[0-9]+$"),
                description="Seconds to wait before retrying",
                required=True,
            )
        }
    return OpenAPIResponse(
        description=description or _DESCRIPTIONS.get(code, HTTPStatus(code).phrase),
        content={PROBLEM_JSON: OpenAPIMediaType(schema=Reference(ref=PROBLEM_REF))},
        headers=headers,
    )


def _codes_by_rule(operation: Operation) -> set[int]:
    codes: set[int] = set()
    if operation.security:
        codes |= {401, 403, 429, 503}
    body = operation.request_body
    if body is not None:
        codes |= {413, 422}
        if isinstance(body, Reference) or "application/json" in body.content:
            codes.add(400)  # not JSON: only a body meant to be JSON is refused for that
    locations = {p.param_in for p in operation.parameters or [] if not isinstance(p, Reference)}
    if locations & {"query", "header"}:
        codes.add(422)
    if "path" in locations:
        codes.add(404)
    return codes


def _drop_null(schema: Schema | Reference | None) -> Schema | Reference | None:
    """``string | null`` → ``string``: a parameter is absent, never null."""
    if not isinstance(schema, Schema) or not schema.one_of:
        return schema
    kept = [s for s in schema.one_of if not (isinstance(s, Schema) and s.type == OpenAPIType.NULL)]
    if len(kept) == 1 and isinstance(kept[0], Schema):
        single = kept[0]
        single.description = single.description or schema.description
        # Litestar puts an optional parameter's bounds next to the oneOf: they belong to the one type left.
        for keyword in _SCHEMA_KEYWORD.values():
            if getattr(single, keyword) is None and getattr(schema, keyword) is not None:
                setattr(single, keyword, getattr(schema, keyword))
        return single
    schema.one_of = kept
    return schema


def complete(openapi: OpenAPI) -> None:
    """Rewrite the document Litestar built in place (see the module docstring for the rules)."""
    assert openapi.components is not None
    schemas = openapi.components.schemas
    schemas["Problem"] = _problem_schema()
    for item in (openapi.paths or {}).values():
        for method in ("get", "put", "post", "delete", "patch"):
            operation: Operation | None = getattr(item, method)
            if operation is None:
                continue
            for parameter in operation.parameters or []:
                if not isinstance(parameter, Reference):
                    parameter.schema = _drop_null(parameter.schema)
            responses = operation.responses if operation.responses is not None else {}
            declared = {int(code): r for code, r in responses.items() if int(code) >= 400}
            by_rule = _codes_by_rule(operation)
            for code in sorted(set(declared) | by_rule):
                existing = declared.get(code)
                # Litestar's own 400 describes a body memos never sends; handler-declared ones keep their text.
                handler_declared = isinstance(existing, OpenAPIResponse) and existing.content is None
                if not handler_declared and code not in by_rule:
                    responses.pop(str(code), None)  # Litestar's 400 where no JSON body could be malformed
                    continue
                text = existing.description if handler_declared and existing is not None else None
                responses[str(code)] = _problem_response(code, text)
            operation.responses = dict(sorted(responses.items()))
