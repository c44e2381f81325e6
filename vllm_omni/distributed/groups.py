"""The process groups of one rank, built once per worker from a ``RankLayout``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.distributed as dist

from vllm_omni.distributed.comm import GroupComm
from vllm_omni.distributed.layout import RankLayout

KINDS = ("tp", "ulysses", "ring", "sp", "cfg", "branch", "vae", "world")


@dataclass
class ParallelGroups:
    tp: GroupComm
    ulysses: GroupComm
    ring: GroupComm
    sp: GroupComm  # ulysses x ring, ordered by SP rank
    cfg: GroupComm
    branch: GroupComm  # every rank working on one CFG branch (sp x tp): cache decisions
    vae: GroupComm
    world: GroupComm

    @classmethod
    def single(cls) -> "ParallelGroups":
        return cls(*(GroupComm.single(k) for k in KINDS))

    def bytes_sent(self) -> dict[str, int]:
        return {k: getattr(self, k).bytes_sent for k in KINDS}

    def reset_counters(self) -> None:
        for k in KINDS:
            getattr(self, k).reset_counters()


MakeGroup = Callable[[str, list[list[int]]], "dist.ProcessGroup | None"]


def build_groups(layout: RankLayout, rank: int, make_group: MakeGroup) -> ParallelGroups:
    """``make_group(kind, all_group_ranks)`` is called on every rank for every kind that has a
    group larger than one rank (collective creation needs everyone), and returns this rank's group."""
    all_groups = layout.groups()
    comms = {}
    for kind in KINDS:
        mine = next(g for g in all_groups[kind] if rank in g)
        if max(len(g) for g in all_groups[kind]) == 1:
            comms[kind] = GroupComm.single(kind)
            continue
        group = make_group(kind, all_groups[kind])
        comms[kind] = GroupComm(kind, mine, group if len(mine) > 1 else None)
    return ParallelGroups(**comms)


def torch_groups(layout: RankLayout) -> ParallelGroups:
    """Groups from plain ``torch.distributed`` (tests, and machines without vLLM)."""
    rank = dist.get_rank()

    def make(kind: str, all_ranks: list[list[int]]):
        mine = None
        for ranks in all_ranks:
            g = dist.new_group(ranks)
            if rank in ranks:
                mine = g
        return mine

    return build_groups(layout, rank, make)


def vllm_groups(layout: RankLayout, local_rank: int, backend: str) -> ParallelGroups:
    """Groups as vLLM group coordinators; our collectives run on their ``device_group``.

    vLLM's device communicators (pynccl, custom all-reduce) need a full vLLM config and have no
    all-to-all, so the coordinators are built without them and the features call
    ``torch.distributed`` on the coordinator's group.
    """
    from vllm.distributed import parallel_state

    def make(kind: str, all_ranks: list[list[int]]):
        return parallel_state.init_model_parallel_group(
            all_ranks, local_rank, backend, group_name=f"omni_{kind}",
            use_device_communicator=False).device_group

    return build_groups(layout, dist.get_rank(), make)
