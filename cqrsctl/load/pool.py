"""Each worker's pool of its own orders, so commands go to orders in a state that accepts them.

An order taken for a command is out of the pool's state sets until its reply arrives, so two concurrent commands
never race on one order (which would turn into business-rule errors that say nothing about the service). The
pool is capped: a new order beyond the cap evicts the oldest, so a long run does not grow without bound.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Final, Generic, TypeVar

T = TypeVar("T")

MAX_LINES: Final = 20  # well below the service's 100, so `add` keeps succeeding on a long-lived draft
AGED_SECONDS: Final = 1.0  # `get` prefers orders this old: younger ones may not be in the read model yet


class Status(Enum):
    DRAFT = "DRAFT"
    PLACED = "PLACED"
    CANCELLED = "CANCELLED"


@dataclass
class PooledOrder:
    order_id: str
    customer_id: str
    created_at: float
    version: int
    token: str = ""  # consistency token of the last acknowledged command on this order
    status: Status = Status.DRAFT
    skus: list[str] = field(default_factory=list)
    sku_seq: int = 0
    busy: bool = False

    def next_sku(self) -> str:
        self.sku_seq += 1
        return f"SKU-{self.sku_seq}"


class IndexedSet(Generic[T]):
    """A set with O(1) add, discard and uniformly random choice."""

    def __init__(self) -> None:
        self._items: list[T] = []
        self._index: dict[T, int] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, item: object) -> bool:
        return item in self._index

    def add(self, item: T) -> None:
        if item not in self._index:
            self._index[item] = len(self._items)
            self._items.append(item)

    def discard(self, item: T) -> None:
        i = self._index.pop(item, None)
        if i is None:
            return
        last = self._items.pop()
        if i < len(self._items):
            self._items[i] = last
            self._index[last] = i

    def at(self, i: int) -> T:
        return self._items[i]

    def choice(self, rng: random.Random) -> T:
        return self._items[rng.randrange(len(self._items))]


class OrderPool:
    """Orders by what they can take next: add (draft, room for a line), change/place (draft with lines), cancel."""

    def __init__(self, capacity: int, rng: random.Random) -> None:
        self.capacity = capacity
        self._rng = rng
        self._orders: dict[str, PooledOrder] = {}
        self._all: IndexedSet[str] = IndexedSet()
        self._fifo: deque[str] = deque()  # creation order, for eviction; may hold ids already dropped
        self._draft_empty: IndexedSet[str] = IndexedSet()
        self._draft_open: IndexedSet[str] = IndexedSet()  # 1 .. MAX_LINES-1 lines
        self._draft_full: IndexedSet[str] = IndexedSet()  # MAX_LINES lines
        self._placed: IndexedSet[str] = IndexedSet()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._orders)

    def _sets_for(self, operation: str) -> tuple[IndexedSet[str], ...]:
        if operation == "add":
            return (self._draft_empty, self._draft_open)
        if operation in ("change", "place"):
            return (self._draft_open, self._draft_full)
        if operation == "cancel":
            return (self._draft_empty, self._draft_open, self._draft_full, self._placed)
        raise ValueError(f"no pooled order is needed for {operation!r}")

    def _home(self, order: PooledOrder) -> IndexedSet[str] | None:
        if order.status is Status.PLACED:
            return self._placed
        if order.status is Status.CANCELLED:
            return None
        if not order.skus:
            return self._draft_empty
        return self._draft_full if len(order.skus) >= MAX_LINES else self._draft_open

    def add_new(self, order_id: str, customer_id: str, version: int, now: float, token: str = "") -> None:
        """A freshly created draft (`token`: its CreateOrder's consistency token); evicts the oldest order when the
        pool is full."""
        while len(self._orders) >= self.capacity and self._fifo:
            oldest = self._fifo.popleft()
            if oldest in self._orders:
                self._remove(oldest)
                self.evicted += 1
        order = PooledOrder(order_id, customer_id, created_at=now, version=version, token=token)
        self._orders[order_id] = order
        self._all.add(order_id)
        self._fifo.append(order_id)
        self._draft_empty.add(order_id)
        if len(self._fifo) > 2 * self.capacity:  # dropped ids pile up in the fifo: compact it
            self._fifo = deque(oid for oid in self._fifo if oid in self._orders)

    def take(self, operation: str) -> PooledOrder | None:
        """An idle order that accepts `operation`, marked busy; None when none fits (the caller creates one)."""
        sets = self._sets_for(operation)
        total = sum(len(s) for s in sets)
        if total == 0:
            return None
        i = self._rng.randrange(total)
        for s in sets:
            if i < len(s):
                order = self._orders[s.at(i)]
                s.discard(order.order_id)
                order.busy = True
                return order
            i -= len(s)
        raise AssertionError("unreachable")

    def release(self, order: PooledOrder, *, keep: bool = True) -> None:
        """Back from a command: re-files the order by its (updated) state, or drops it when `keep` is False."""
        order.busy = False
        if self._orders.get(order.order_id) is not order:
            return  # evicted while its command was in flight
        if not keep:
            self._remove(order.order_id)
            return
        home = self._home(order)
        if home is not None:
            home.add(order.order_id)

    def get(self, order_id: str) -> PooledOrder | None:
        """The pooled order with this id (busy or not), None when it is not (or no longer) in the pool."""
        return self._orders.get(order_id)

    def pick_for_read(self, now: float) -> str | None:
        """A random pooled order old enough to be in the read model already, else the oldest one."""
        if not self._all:
            return None
        for _ in range(3):
            candidate = self._all.choice(self._rng)
            if now - self._orders[candidate].created_at >= AGED_SECONDS:
                return candidate
        while self._fifo[0] not in self._orders:  # ids dropped from the pool linger at the front
            self._fifo.popleft()
        return self._fifo[0]

    def _remove(self, order_id: str) -> None:
        order = self._orders.pop(order_id)
        self._all.discard(order_id)
        for s in (self._draft_empty, self._draft_open, self._draft_full, self._placed):
            s.discard(order.order_id)
