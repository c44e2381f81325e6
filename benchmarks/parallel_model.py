"""Scaling model for real Qwen-Image on 8 GPUs: predicted time per image for every layout.

A roofline-style model, not a measurement. Per transformer block and rank it counts matmul and
attention FLOPs and the bytes each parallel scheme moves (the same formulas the group wrappers'
byte counters follow, checked against bench_parallel.py on the bench model), then:

    block_time = flops / (rate * eff(tokens_per_rank)) + comm_bytes / link_bw + collectives * latency

with ring transfers overlapped with the attention of the previous block. Two numbers are fitted,
both from the published vLLM-Omni Qwen-Image 2048² Ulysses runs on H800 (1 GPU: 112.5 s, U2:
65.2 s): the sustained matmul rate and the serial seconds (text encoder, VAE, scheduler). U4 and
U8 are then predictions, printed next to the published 39.6 s and 30.8 s. ``eff(n) = n/(n+512)``
(small per-rank GEMMs run below peak) and the link figures are fixed a priori.

    python benchmarks/parallel_model.py            # table + JSON
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class Link:
    name: str
    a2a_GBps: float  # effective all-to-all bandwidth per GPU, one direction
    allreduce_GBps: float  # NCCL bus bandwidth
    p2p_GBps: float
    latency_s: float = 25e-6


H800 = Link("8 x H800 NVLink (400 GB/s bidir)", a2a_GBps=150, allreduce_GBps=160, p2p_GBps=160)
H100 = Link("8 x H100 SXM NVLink4 (900 GB/s bidir)", a2a_GBps=340, allreduce_GBps=360, p2p_GBps=360)


@dataclass(frozen=True)
class QwenImage:
    blocks: int = 60
    heads: int = 24
    head_dim: int = 128
    text_tokens: int = 256
    steps: int = 50
    cfg: bool = True  # true_cfg_scale > 1: two transformer calls per step
    bytes_per_el: int = 2  # bf16

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim

    def tokens(self, side: int) -> int:
        return (side // 16) ** 2 + self.text_tokens  # 8x VAE, 2x2 patches


@dataclass(frozen=True)
class Layout:
    u: int = 1
    r: int = 1
    c: int = 1
    t: int = 1

    @property
    def world(self) -> int:
        return self.u * self.r * self.c * self.t

    @property
    def name(self) -> str:
        parts = [f"{k}{v}" for k, v in (("U", self.u), ("R", self.r), ("CFG", self.c), ("TP", self.t))
                 if v > 1]
        return "x".join(parts) or "1 GPU"


def eff(n: float) -> float:
    return n / (n + 512)


def block_terms(m: QwenImage, lay: Layout, side: int, link: Link):
    """Per block and rank: (flops scaled by shard efficiency, seconds of exposed communication,
    bytes sent, ring terms or None). Ring terms are (seconds per K/V transfer, attention flops per
    ring step, transfers), for overlapping at the fitted rate."""
    n_all = m.tokens(side)
    d, b = m.dim, m.bytes_per_el
    n = n_all / (lay.u * lay.r)  # tokens this rank holds between attentions
    linear = 24 * d * d * n / lay.t  # q,k,v,o + 4x MLP, both streams
    attn = 4 * n_all * n * d / lay.t
    flops = (linear + attn) / eff(n)
    comm_s, sent, ring = 0.0, 0.0, None
    if lay.u > 1:  # q,k,v in and the output back, each leaving (u-1)/u of the local share
        x = 4 * n * d / lay.t * b * (lay.u - 1) / lay.u
        sent += x
        comm_s += x / (link.a2a_GBps * 1e9) + 2 * link.latency_s
    if lay.r > 1:  # K and V of every other ring member, overlapped with one block's attention
        kv = 2 * (n_all / lay.r) * d / (lay.u * lay.t) * b
        sent += kv * (lay.r - 1)
        comm_s += (lay.r - 1) * link.latency_s
        # The overlap needs the attention's seconds, which only the fitted rate gives.
        ring = (kv / (link.p2p_GBps * 1e9), attn / lay.r / eff(n), lay.r - 1)
    if lay.t > 1:  # four all-reduces of the activations (attention out, MLP out; two streams)
        x = 2 * n * d * b * 2 * (lay.t - 1) / lay.t
        sent += x
        comm_s += x / (link.allreduce_GBps * 1e9) + 4 * link.latency_s
    return flops, comm_s, sent, ring


VAE_SHARE = 0.9  # of the serial time, a priori: the VAE decoder dominates at these sizes
VAE_HALO_ROWS = 13  # latent rows of context per band edge (receptive_halo of the real decoder)


def serial_seconds(serial_2048: float, side: int, vae_pp: int) -> float:
    """Text encoder + scheduler (fixed) and VAE decode (area-proportional, split in bands)."""
    vae = serial_2048 * VAE_SHARE * (side / 2048) ** 2
    rows = side // 8
    band = min(rows, rows / vae_pp + 2 * VAE_HALO_ROWS) / rows if vae_pp > 1 else 1.0
    return serial_2048 * (1 - VAE_SHARE) + vae * band


def image_seconds(m: QwenImage, lay: Layout, side: int, link: Link, rate: float,
                  serial_s: float, vae_pp: int = 1) -> tuple[float, float]:
    """(seconds per image, bytes sent per rank per step); ``serial_s`` is the 2048² value."""
    flops, comm_s, sent, ring = block_terms(m, lay, side, link)
    t = flops / rate + comm_s
    if ring is not None:
        transfer_s, step_flops, steps = ring
        t += steps * max(0.0, transfer_s - step_flops / rate)
    calls = (2 if m.cfg else 1) / (lay.c if m.cfg else 1)
    step = m.blocks * t * calls
    if lay.c > 1:  # all-gather of the two predictions, once per step
        out = (m.tokens(side) - m.text_tokens) * 64 * m.bytes_per_el
        step += out / (link.a2a_GBps * 1e9) + link.latency_s
        sent += out / m.blocks
    return m.steps * step + serial_seconds(serial_s, side, vae_pp), sent * m.blocks * calls


def fit(m: QwenImage, link: Link, side: int, t1: float, t2: float, lay2: Layout) -> tuple[float, float]:
    """Solves image_seconds(1 GPU) = t1 and image_seconds(lay2) = t2 for (rate, serial_s)."""
    # image_seconds is a/rate + b + serial for ring-free layouts; two points fix both unknowns.
    def ab(lay):
        s_at = image_seconds(m, lay, side, link, 1e30, 0.0)[0]  # comm only
        s_1 = image_seconds(m, lay, side, link, 1.0, 0.0)[0] - s_at  # flops
        return s_1, s_at
    a1, b1 = ab(Layout())
    a2, b2 = ab(lay2)
    inv_rate = ((t1 - b1) - (t2 - b2)) / (a1 - a2)
    serial = t1 - b1 - a1 * inv_rate
    return 1.0 / inv_rate, serial


def layouts(world: int, heads: int):
    for u, r, c, t in itertools.product((1, 2, 4, 8), repeat=4):
        lay = Layout(u, r, c, t)
        if lay.world == world and heads % (u * t) == 0 and c <= 2:
            yield lay


def main() -> None:
    m = QwenImage()
    rate, serial = fit(m, H800, 2048, 112.5, 65.2, Layout(u=2))
    out = {"fitted": {"sustained_TFLOPs": rate / 1e12, "serial_s": serial}, "check": [], "h100": {}}
    print(f"fitted on H800 2048² (1 GPU, U2): sustained {rate / 1e12:.0f} TFLOP/s, "
          f"serial {serial:.1f} s")
    print("\nheld-out check, H800, 2048², 50 steps, CFG on:")
    for u, published in ((2, 65.2), (4, 39.6), (8, 30.8)):
        pred = image_seconds(m, Layout(u=u), 2048, H800, rate, serial)[0]
        base = image_seconds(m, Layout(), 2048, H800, rate, serial)[0]
        out["check"].append({"layout": f"U{u}", "predicted_s": pred, "published_s": published,
                             "predicted_speedup": base / pred, "published_speedup": 112.5 / published})
        print(f"  U{u}: predicted {pred:6.1f} s ({base / pred:.2f}x)   published {published:6.1f} s "
              f"({112.5 / published:.2f}x)")
    for side in (1024, 2048):
        base = image_seconds(m, Layout(), side, H100, rate, serial)[0]
        rows = []
        for world in (1, 2, 4, 8):
            for lay in layouts(world, m.heads):
                s, sent = image_seconds(m, lay, side, H100, rate, serial)
                s_pp = image_seconds(m, lay, side, H100, rate, serial, vae_pp=world)[0]
                rows.append({"layout": lay.name, "gpus": world, "seconds": s,
                             "speedup": base / s, "seconds_with_vae_pp": s_pp,
                             "speedup_with_vae_pp": base / s_pp,
                             "GB_sent_per_rank_per_step": sent / 1e9})
        rows.sort(key=lambda r: (r["gpus"], r["seconds"]))
        out["h100"][side] = rows
        print(f"\n8 x H100 NVLink, Qwen-Image {side}², 50 steps, CFG on (best first per GPU count):")
        print(f"  {'layout':<14}{'GPUs':>5}{'s/image':>9}{'speedup':>9}{'+VAE-PP':>9}"
              f"{'GB/step/rank':>14}")
        for world in (1, 2, 4, 8):
            for r in [r for r in rows if r["gpus"] == world][:4]:
                print(f"  {r['layout']:<14}{r['gpus']:>5}{r['seconds']:>9.1f}{r['speedup']:>9.2f}"
                      f"{r['speedup_with_vae_pp']:>9.2f}{r['GB_sent_per_rank_per_step']:>14.3f}")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
