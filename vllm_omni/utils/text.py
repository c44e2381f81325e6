"""Client text on its way into our logs."""

from __future__ import annotations


def log_safe(text: object, limit: int = 200) -> str:
    """``text`` with control characters escaped (a newline in a field cannot forge a log line)
    and cut to ``limit`` characters."""
    s = str(text)
    cut = len(s) > limit
    s = s[:limit]
    s = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in s)
    return s + ("…" if cut else "")
