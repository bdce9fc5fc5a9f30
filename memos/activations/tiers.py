"""The host tier: decoded KV chunks kept in memory under a byte budget, least recently used out first.

Keys are blob keys (the sha256 of the memos-kv/1 file), so activations that share bytes share one
entry. A chunk lives on its model's device: "device" when that is a GPU, "host" otherwise. Entries are
never mutated (generation composes copies), so handing the same chunk to two requests is safe.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Literal

ResidentTier = Literal["device", "host"]


class HostTier:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self._items: OrderedDict[str, tuple[Any, int, ResidentTier]] = OrderedDict()
        # Touched from the event loop and from worker threads.
        self._lock = threading.Lock()

    def get(self, key: str) -> Any | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: str, chunk: Any, nbytes: int, tier: ResidentTier) -> bool:
        """Keep ``chunk``; False (and nothing kept) when it alone is larger than the budget."""
        if nbytes > self.budget_bytes:
            return False
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return True
            self._items[key] = (chunk, nbytes, tier)
            self.used_bytes += nbytes
            while self.used_bytes > self.budget_bytes:
                _, (_, size, _) = self._items.popitem(last=False)
                self.used_bytes -= size
            return True

    def tier_of(self, key: str) -> ResidentTier | None:
        with self._lock:
            item = self._items.get(key)
            return None if item is None else item[2]

    def discard(self, key: str) -> None:
        with self._lock:
            item = self._items.pop(key, None)
            if item is not None:
                self.used_bytes -= item[1]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.used_bytes = 0

    def __len__(self) -> int:
        return len(self._items)
