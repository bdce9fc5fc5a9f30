"""Who is calling: the operator, a tenant admin, or an agent."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Literal

from memos.errors import Forbidden

Role = Literal["operator", "admin", "agent"]


@dataclasses.dataclass(frozen=True, slots=True)
class Principal:
    role: Role
    agent_id: uuid.UUID | None = None
    tenant_id: uuid.UUID | None = None
    key_prefix: str | None = None

    @property
    def actor(self) -> str:
        """How the audit log names this caller."""
        return str(self.agent_id) if self.agent_id is not None else "operator"

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def tenant_member(self) -> tuple[uuid.UUID, uuid.UUID]:
        """(tenant_id, agent_id) of a tenant's agent or admin; the operator is refused."""
        if self.tenant_id is None or self.agent_id is None:
            raise Forbidden("the operator key manages tenants only; use a tenant admin or agent key")
        return self.tenant_id, self.agent_id

    def require_admin(self) -> tuple[uuid.UUID, uuid.UUID]:
        ids = self.tenant_member()
        if not self.is_admin:
            raise Forbidden("this operation needs a tenant admin key")
        return ids


OPERATOR = Principal(role="operator")
