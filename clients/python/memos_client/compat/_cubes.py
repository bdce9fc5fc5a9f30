"""What the adapters share about the cubes they create for themselves."""

from __future__ import annotations

from memos_client._errors import Conflict


def unseen_cube(name: str, option: str, exc: Conflict) -> Conflict:
    """Cube names are unique per tenant: another agent's cube of this name blocks the create, unseen."""
    return Conflict(
        f"a cube named {name!r} exists in this tenant, but this key cannot read it (another agent's); "
        f"ask its owner for a grant, or pass {option} name to use a cube of your own",
        status=exc.status,
        problem=exc.problem,
        request_id=exc.request_id,
    )
