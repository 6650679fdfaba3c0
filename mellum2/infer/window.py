"""Counts over a sliding time window (tokens per second), with a running total: adding and expiring are
O(1) each, so a gauge updated on every token or step never sums the whole window."""
from __future__ import annotations

from collections import deque


class Window:
    def __init__(self, seconds: float, max_items: int | None = None):
        self.seconds, self.max_items = seconds, max_items
        self.items: deque[tuple[float, int]] = deque()  # (time, count), oldest first
        self.total = 0  # sum of the counts held

    def add(self, now: float, n: int) -> None:
        self.items.append((now, n))
        self.total += n
        if self.max_items is not None and len(self.items) > self.max_items:
            self.total -= self.items.popleft()[1]

    def expire(self, now: float) -> None:
        """Drop the items older than `seconds` before `now`."""
        while self.items and self.items[0][0] < now - self.seconds:
            self.total -= self.items.popleft()[1]
