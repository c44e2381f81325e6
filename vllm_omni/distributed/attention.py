"""Attention over a sequence split across ranks: Ulysses, ring, and the two combined.

Tensors use diffusers' attention layout, ``[batch, seq, heads, head_dim]``. Key masks are
``[batch, keys]`` booleans (True = attend) or None for "all keys valid"; the joint text+image
attention of MMDiT models needs them for the padded text tokens.

- Ulysses: an all-to-all turns "my tokens, all heads" into "all tokens, my heads", attention runs
  locally, a second all-to-all turns it back. Needs heads divisible by the Ulysses degree.
- Ring: each rank keeps its queries and passes its keys/values around the ring; the partial
  results are merged with their log-sum-exp, which makes the result exact.
- Hybrid: Ulysses inside each ring member, ring across them.

Sequence shards may differ in length by one token (``balanced_sizes``), so no height/width/text
length has to be divisible by the parallel degree.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vllm_omni.distributed.comm import GroupComm


def balanced_sizes(n: int, parts: int) -> list[int]:
    """Splits n items into ``parts`` runs whose lengths differ by at most one, longest first."""
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def offsets(sizes: Sequence[int]) -> list[int]:
    return list(itertools.accumulate(sizes, initial=0))[:-1]


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       key_mask: torch.Tensor | None, scale: float | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``q`` over ``k``/``v`` ([B, L, H, D]).

    Returns the output ([B, Lq, H, D], fp32) and the log-sum-exp of the scores ([B, H, Lq], fp32);
    a batch row whose keys are all masked gets lse = -inf and output 0.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
    bias = None
    if key_mask is not None:
        bias = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device)
        bias = bias.masked_fill(~key_mask, float("-inf"))[:, None, None, :]
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qh, kh, vh, 0.0, False, attn_mask=bias, scale=scale)
    else:
        if bias is not None:
            bias = bias.expand(q.shape[0], q.shape[2], q.shape[1], k.shape[1])
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            qh, kh, vh, bias, True, 0.0, False, scale=scale)[:2]
        lse = lse[..., : q.shape[1]]  # older kernels pad the lse to a multiple of 32
    out, lse = out.transpose(1, 2).float(), lse.float()
    if key_mask is not None:
        empty = ~key_mask.any(dim=1)  # the kernels return lse 0 for an all-masked row
        if bool(empty.any()):
            lse = lse.masked_fill(empty[:, None, None], float("-inf"))
            out = out.masked_fill(empty[:, None, None, None], 0.0)
    return out, lse


def reference_attention(q, k, v, key_mask=None, scale=None) -> torch.Tensor:
    """Plain single-device attention, the ground truth for tests."""
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


def merge_partials(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor,
                   lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combines two softmax-attention partials over disjoint key sets."""
    new = torch.logaddexp(lse, lse_b)
    safe = torch.where(torch.isinf(new), torch.zeros_like(new), new)  # both empty: keep zeros
    wa = torch.exp(lse - safe).transpose(1, 2)[..., None]  # [B, Lq, H, 1]
    wb = torch.exp(lse_b - safe).transpose(1, 2)[..., None]
    return out * wa + out_b * wb, new


def seq_to_heads(x: torch.Tensor, comm: GroupComm, seq_sizes: Sequence[int]) -> torch.Tensor:
    """[B, L_mine, H, D] -> [B, sum(seq_sizes), H / P, D]."""
    p = comm.world_size
    b, n, h, d = x.shape
    x = x.reshape(b, n, p, h // p, d).permute(2, 1, 0, 3, 4).reshape(p * n, b, h // p, d)
    out = comm.all_to_all(x, [n] * p, seq_sizes)
    return out.permute(1, 0, 2, 3)


def heads_to_seq(x: torch.Tensor, comm: GroupComm, seq_sizes: Sequence[int]) -> torch.Tensor:
    """[B, sum(seq_sizes), H / P, D] -> [B, L_mine, H, D]; inverse of ``seq_to_heads``."""
    p = comm.world_size
    b, _, h, d = x.shape
    n = seq_sizes[comm.rank]
    out = comm.all_to_all(x.permute(1, 0, 2, 3), seq_sizes, [n] * p)
    return out.reshape(p, n, b, h, d).permute(2, 1, 0, 3, 4).reshape(b, n, p * h, d)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, comm: GroupComm,
                   block_sizes: Sequence[int], block_masks: Sequence[torch.Tensor | None],
                   scale: float | None = None) -> torch.Tensor:
    """Attention of the local queries over the keys/values of every ring member.

    ``block_sizes[j]``/``block_masks[j]`` describe member j's keys. K and V travel together in one
    buffer; the next block's transfer overlaps the current block's attention.
    """
    p, me = comm.world_size, comm.rank
    kv = torch.stack([k, v])
    out = lse = None
    for step in range(p):
        owner = (me - step) % p
        transfer = None
        if step + 1 < p:
            nxt_owner = (me - step - 1) % p
            shape = (2, kv.shape[1], block_sizes[nxt_owner], *kv.shape[3:])
            transfer = comm.ring_exchange(kv, shape)
        o, s = attention_with_lse(q, kv[0], kv[1], block_masks[owner], scale)
        out, lse = (o, s) if out is None else merge_partials(out, lse, o, s)
        if transfer is not None:
            kv = transfer.wait()
    return out.to(q.dtype)


def sequence_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                ulysses: GroupComm, ring: GroupComm, seq_sizes: Sequence[int],
                                key_masks: Sequence[torch.Tensor | None] | None = None,
                                scale: float | None = None) -> torch.Tensor:
    """Exact attention over the concatenation of every SP rank's local sequence.

    ``seq_sizes[s]``/``key_masks[s]`` describe SP rank s's local tokens, with
    ``s = ring.rank * ulysses.world_size + ulysses.rank``. Returns this rank's queries' output.
    """
    u = ulysses.world_size
    nblocks = ring.world_size
    block_sizes = [sum(seq_sizes[j * u:(j + 1) * u]) for j in range(nblocks)]
    if key_masks is None or all(m is None for m in key_masks):
        block_masks: list[torch.Tensor | None] = [None] * nblocks
    else:
        block_masks = []
        for j in range(nblocks):
            parts = [key_masks[s] if key_masks[s] is not None
                     else torch.ones(q.shape[0], seq_sizes[s], dtype=torch.bool, device=q.device)
                     for s in range(j * u, (j + 1) * u)]
            block_masks.append(torch.cat(parts, dim=1))
    mine = seq_sizes[ring.rank * u:(ring.rank + 1) * u]
    if u > 1:
        q, k, v = seq_to_heads(torch.cat([q, k, v]), ulysses, mine).chunk(3)
    if nblocks > 1:
        out = ring_attention(q, k, v, ring, block_sizes, block_masks, scale)
    else:
        out = reference_attention(q, k, v, block_masks[0], scale)
    if u > 1:
        out = heads_to_seq(out, ulysses, mine)
    return out
