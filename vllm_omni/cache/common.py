"""What the step-cache backends share: their per-request counts and the preset lookup."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass
class CacheStats:
    """Denoiser calls of the last request: run in full, and served from the cache."""

    computed: int = 0
    skipped: int = 0


def preset_settings(presets: dict[str, T], name: str, backend: str, model: str) -> T:
    """A model's named preset for ``backend``, or a ValueError listing the ones it has."""
    if name not in presets:
        names = ", ".join(sorted(presets)) or "none"
        raise ValueError(f"unknown {backend} preset {name!r} for {model} (available: {names})")
    return presets[name]
