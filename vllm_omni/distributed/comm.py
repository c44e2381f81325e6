"""The collectives our parallel features use, over one torch process group, with byte counters.

Features take a ``GroupComm`` rather than a vLLM ``GroupCoordinator`` so they need only torch: the
worker builds the groups with vLLM and hands their ``device_group`` here, tests build them with
plain ``torch.distributed``. ``bytes_sent`` counts the payload this rank puts on the wire (an
all-gather sends the local tensor to every other rank, a ring all-reduce 2(P-1)/P of the tensor),
which is what the parallelism benchmark reports per denoising step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


class GroupComm:
    def __init__(self, name: str, ranks: Sequence[int], group: dist.ProcessGroup | None = None):
        self.name = name
        self.ranks = list(ranks)
        self.group = group
        self.world_size = len(self.ranks)
        self.rank = self.ranks.index(dist.get_rank()) if self.world_size > 1 else 0
        if self.world_size > 1 and group is None:
            raise ValueError(f"group {name} spans ranks {self.ranks} but has no process group")
        self.bytes_sent = 0

    @classmethod
    def single(cls, name: str) -> "GroupComm":
        return cls(name, [0])

    def __repr__(self) -> str:
        return f"GroupComm({self.name}, rank {self.rank}/{self.world_size}, ranks={self.ranks})"

    def reset_counters(self) -> None:
        self.bytes_sent = 0

    def all_reduce(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (or "min", "max") over the group, in place."""
        if self.world_size == 1:
            return x
        self.bytes_sent += int(2 * (self.world_size - 1) / self.world_size * x.nbytes)
        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        dist.all_reduce(x, op=ops[op], group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = 0,
                   sizes: Sequence[int] | None = None) -> torch.Tensor:
        """Concatenates every rank's ``x`` along ``dim`` in rank order.

        ``sizes`` gives each rank's extent along ``dim`` when they differ; the pieces are padded to
        the largest for the collective and trimmed after.
        """
        if self.world_size == 1:
            return x
        dim = dim % x.dim()
        x = x.contiguous()
        longest = max(sizes) if sizes is not None else x.shape[dim]
        if x.shape[dim] < longest:
            pad = list(x.shape)
            pad[dim] = longest - x.shape[dim]
            x = torch.cat([x, x.new_zeros(pad)], dim=dim)
        self.bytes_sent += (self.world_size - 1) * x.nbytes
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x, group=self.group)
        if sizes is not None:
            parts = [p.narrow(dim, 0, n) for p, n in zip(parts, sizes)]
        return torch.cat(parts, dim=dim)

    def all_to_all(self, x: torch.Tensor, in_splits: Sequence[int],
                   out_splits: Sequence[int]) -> torch.Tensor:
        """Rank r sends ``x[in_offsets[j]:...+in_splits[j]]`` (dim 0) to rank j and receives
        ``out_splits[j]`` rows from rank j, concatenated in rank order."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        row = x.nbytes // max(x.shape[0], 1)
        self.bytes_sent += row * (x.shape[0] - in_splits[self.rank])
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x, output_split_sizes=list(out_splits),
                               input_split_sizes=list(in_splits), group=self.group)
        return out

    def ring_exchange(self, x: torch.Tensor, recv_shape: Sequence[int]) -> "RingTransfer":
        """Starts sending ``x`` to the next rank and receiving ``recv_shape`` from the previous one."""
        nxt = self.ranks[(self.rank + 1) % self.world_size]
        prev = self.ranks[(self.rank - 1) % self.world_size]
        x = x.contiguous()
        buf = x.new_empty(tuple(recv_shape))
        self.bytes_sent += x.nbytes
        ops = [dist.P2POp(dist.isend, x, nxt, self.group), dist.P2POp(dist.irecv, buf, prev, self.group)]
        return RingTransfer(dist.batch_isend_irecv(ops), buf, x)


class RingTransfer:
    def __init__(self, works, buf: torch.Tensor, sent: torch.Tensor):
        self._works = works
        self._buf = buf
        self._sent = sent  # kept alive until the send completes

    def wait(self) -> torch.Tensor:
        for w in self._works:
            w.wait()
        return self._buf
