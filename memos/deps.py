"""What handlers can ask for by name, and where it comes from.

Services are built once in the app's lifespan and kept on ``app.state``; the
caller's ``Principal`` is what the auth middleware resolved.
"""

from __future__ import annotations

from typing import Any

from litestar import Request
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide

from memos.activations.service import ActivationService
from memos.cubes.service import CubeService
from memos.identity.auth import current_principal
from memos.identity.principal import Principal
from memos.identity.service import IdentityService
from memos.memories.service import MemoryService
from memos.scheduler.service import Scheduler
from memos.search.service import SearchService
from memos.semcache.service import SemCacheService

CurrentPrincipal = NamedDependency[Principal]
Identity = NamedDependency[IdentityService]
Cubes = NamedDependency[CubeService]
Memories = NamedDependency[MemoryService]
Search = NamedDependency[SearchService]
SemCache = NamedDependency[SemCacheService]
Activations = NamedDependency[ActivationService]
SchedulerDep = NamedDependency[Scheduler]


def _principal(request: Request[Any, Any, Any]) -> Principal:
    return current_principal(request)


def _identity(state: State) -> IdentityService:
    service: IdentityService = state.identity
    return service


def _cubes(state: State) -> CubeService:
    service: CubeService = state.cubes
    return service


def _memories(state: State) -> MemoryService:
    service: MemoryService = state.memories
    return service


def _search(state: State) -> SearchService:
    service: SearchService = state.search
    return service


def _semcache(state: State) -> SemCacheService:
    service: SemCacheService = state.semcache
    return service


def _activations(state: State) -> ActivationService:
    service: ActivationService = state.activations
    return service


def _scheduler(state: State) -> Scheduler:
    service: Scheduler = state.scheduler
    return service


def dependencies() -> dict[str, Provide]:
    return {
        "principal": Provide(_principal, sync_to_thread=False),
        "identity": Provide(_identity, sync_to_thread=False),
        "cubes": Provide(_cubes, sync_to_thread=False),
        "memories": Provide(_memories, sync_to_thread=False),
        # Not "search": GenerateIn has a body field of that name, and Litestar takes a validation error whose key
        # is a dependency's name for a failed dependency (a bare 500) instead of the 422 on ``search`` it is.
        "search_service": Provide(_search, sync_to_thread=False),
        "semcache": Provide(_semcache, sync_to_thread=False),
        "activations": Provide(_activations, sync_to_thread=False),
        "scheduler": Provide(_scheduler, sync_to_thread=False),
    }
