"""Which rank does what: the rank grid and the groups cut from it (pure Python, no torch).

Ranks are numbered with tensor parallel innermost (its all-reduces are the most frequent), then
Ulysses, then ring, then CFG outermost (one all-gather per step):

    rank = ((cfg * ring + r) * ulysses + u) * tp + t

so a sequence-parallel rank, ``sp = r * ulysses + u``, owns shard ``sp`` of every token stream and
a Ulysses group gathers consecutive shards. VAE patch parallelism reuses ranks 0..N-1; when it is
the only parallel feature the denoiser runs replicated on those N ranks.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass


@dataclass(frozen=True)
class RankLayout:
    ulysses: int = 1
    ring: int = 1
    cfg: int = 1
    tp: int = 1
    vae: int = 1

    def __post_init__(self) -> None:
        if self.vae > self.dit_world_size and self.dit_world_size != 1:
            raise ValueError(
                f"vae_patch_parallel_size={self.vae} is larger than the {self.dit_world_size} ranks "
                f"the denoiser uses; use vae_patch_parallel_size <= {self.dit_world_size}"
            )

    @property
    def dit_world_size(self) -> int:
        return self.ulysses * self.ring * self.cfg * self.tp

    @property
    def world_size(self) -> int:
        return max(self.dit_world_size, self.vae)

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's index along each axis (``replica`` counts denoiser copies)."""
        local = rank % self.dit_world_size
        t = local % self.tp
        u = local // self.tp % self.ulysses
        r = local // (self.tp * self.ulysses) % self.ring
        c = local // (self.tp * self.ulysses * self.ring)
        return {"tp": t, "ulysses": u, "ring": r, "cfg": c, "sp": r * self.ulysses + u,
                "replica": rank // self.dit_world_size}

    def rank_of(self, *, cfg: int = 0, ring: int = 0, ulysses: int = 0, tp: int = 0,
                replica: int = 0) -> int:
        return (((cfg * self.ring + ring) * self.ulysses + ulysses) * self.tp + tp
                + replica * self.dit_world_size)

    def groups(self) -> dict[str, list[list[int]]]:
        """Every group of every kind, as vLLM's ``init_model_parallel_group`` wants them."""
        axes = {"tp": self.tp, "ulysses": self.ulysses, "ring": self.ring, "cfg": self.cfg}
        out: dict[str, list[list[int]]] = {
            k: [] for k in ("tp", "ulysses", "ring", "sp", "cfg", "branch")}
        for rank in range(self.world_size):
            c = self.coords(rank)
            for kind in out:
                varying = {"sp": ("ring", "ulysses"), "branch": ("ring", "ulysses", "tp")}.get(
                    kind, (kind,))
                fixed = {k: c[k] for k in axes if k not in varying}
                ranks = [self.rank_of(**fixed, **dict(zip(varying, at)), replica=c["replica"])
                         for at in itertools.product(*(range(axes[k]) for k in varying))]
                if ranks not in out[kind]:
                    out[kind].append(ranks)
        out["vae"] = [list(range(self.vae))] + [[r] for r in range(self.vae, self.world_size)]
        out["world"] = [list(range(self.world_size))]  # per-step agreement (cancellation)
        return out
