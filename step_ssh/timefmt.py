"""Durations as operators read them in messages and `status`: 2d3h, 4h5m, 6m7s, 8s."""
from __future__ import annotations


def span(seconds: float) -> str:
    s = int(abs(seconds))
    if s >= 86400:
        return f"{s // 86400}d{(s % 86400) // 3600}h"
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60}m"
    if s >= 60:
        return f"{s // 60}m{s % 60}s"
    return f"{s}s"
