"""Lists that follow ``next_cursor`` lazily: nothing is fetched until you iterate."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Generic, TypeVar

from memos_client._errors import InvalidResponse
from memos_client._models import Page

T = TypeVar("T")


def _next(page: Page[T], cursor: str | None) -> str | None:
    if page.next_cursor is not None and page.next_cursor == cursor:
        # A server handing back the cursor it was given would make iteration endless.
        raise InvalidResponse(f"the server returned the same cursor twice ({cursor!r})")
    return page.next_cursor


class Pager(Generic[T]):
    """An iterable over every item of a paginated list, one page request at a time.

    ``for item in pager`` yields items across pages; ``pager.pages()`` yields whole ``Page`` objects
    (keep ``page.next_cursor`` to resume later with ``cursor=``). Each iteration starts again from
    the first page (or from the ``cursor`` the list was created with). Errors (a 404 cube, say) are
    raised when iteration fetches the page, not when the list is created.
    """

    def __init__(self, fetch: Callable[[str | None], Page[T]], cursor: str | None = None) -> None:
        self._fetch = fetch
        self._cursor = cursor

    def pages(self) -> Iterator[Page[T]]:
        cursor = self._cursor
        while True:
            page = self._fetch(cursor)
            yield page
            cursor = _next(page, cursor)
            if cursor is None:
                return

    def __iter__(self) -> Iterator[T]:
        for page in self.pages():
            yield from page.items


class AsyncPager(Generic[T]):
    """The async twin of ``Pager``: ``async for item in pager``, or ``async for page in pager.pages()``."""

    def __init__(self, fetch: Callable[[str | None], Awaitable[Page[T]]], cursor: str | None = None) -> None:
        self._fetch = fetch
        self._cursor = cursor

    async def pages(self) -> AsyncIterator[Page[T]]:
        cursor = self._cursor
        while True:
            page = await self._fetch(cursor)
            yield page
            cursor = _next(page, cursor)
            if cursor is None:
                return

    async def __aiter__(self) -> AsyncIterator[T]:
        async for page in self.pages():
            for item in page.items:
                yield item
