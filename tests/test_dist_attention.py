"""Ulysses, ring and hybrid attention on gloo ranks equal single-device attention."""

import pytest
import torch

from vllm_omni.distributed.attention import (
    attention_with_lse,
    balanced_sizes,
    merge_partials,
    offsets,
    reference_attention,
    sequence_parallel_attention,
)
from vllm_omni.distributed.layout import RankLayout
from vllm_omni.testing.dist import run_ranks


def _inputs(seq=(5, 19), heads=4, dim=8, batch=2):
    g = torch.Generator().manual_seed(0)
    txt, img = seq
    n = txt + img
    q, k, v = (torch.randn(batch, n, heads, dim, generator=g) for _ in range(3))
    mask = torch.ones(batch, n, dtype=torch.bool)
    mask[0, 3:txt] = False  # padded text tokens of the first prompt
    return q, k, v, mask, txt, img


def _sp_rank(rank, world, ulysses, ring):
    from vllm_omni.distributed.groups import torch_groups

    groups = torch_groups(RankLayout(ulysses=ulysses, ring=ring))
    q, k, v, mask, txt, img = _inputs()
    p = ulysses * ring
    sp = groups.ring.rank * ulysses + groups.ulysses.rank
    ts, is_ = balanced_sizes(txt, p), balanced_sizes(img, p)
    to, io = offsets(ts), offsets(is_)

    def local(x, s):  # this SP rank's [text shard, image shard] tokens
        return torch.cat([x[:, to[s]:to[s] + ts[s]], x[:, txt + io[s]:txt + io[s] + is_[s]]], dim=1)

    sizes = [ts[s] + is_[s] for s in range(p)]
    masks = [local(mask, s) for s in range(p)]
    out = sequence_parallel_attention(local(q, sp), local(k, sp), local(v, sp), groups.ulysses,
                                      groups.ring, sizes, masks)
    expected = local(reference_attention(q, k, v, mask), sp)
    return (out - expected).abs().max().item(), groups.bytes_sent()


@pytest.mark.parametrize("ulysses,ring", [(2, 1), (1, 2), (2, 2), (4, 1), (1, 4)])
def test_sequence_parallel_attention_matches_reference(ulysses, ring):
    results = run_ranks(_sp_rank, ulysses * ring, ulysses, ring)
    for err, sent in results:
        assert err < 1e-5
        if ulysses > 1:
            assert sent["ulysses"] > 0
        if ring > 1:
            assert sent["ring"] > 0


def test_lse_merge_is_exact_and_handles_empty_blocks():
    q, k, v, mask, _, _ = _inputs()
    full = reference_attention(q, k, v, mask)
    cut = 7
    a = attention_with_lse(q, k[:, :cut], v[:, :cut], mask[:, :cut])
    b = attention_with_lse(q, k[:, cut:], v[:, cut:], mask[:, cut:])
    out, _ = merge_partials(*a, *b)
    assert (out - full).abs().max() < 1e-5
    empty = torch.zeros_like(mask[:, :cut])
    e = attention_with_lse(q, k[:, :cut], v[:, :cut], empty)
    assert torch.isinf(e[1]).all() and (e[0] == 0).all()
    out, _ = merge_partials(*e, *attention_with_lse(q, k, v, mask))
    assert (out - full).abs().max() < 1e-5
