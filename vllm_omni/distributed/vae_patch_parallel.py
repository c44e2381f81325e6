"""VAE patch parallelism: each rank decodes a horizontal band of the image.

The decoder's global parts (its input conv and the mid-block, which has spatial self-attention)
run on the whole latent on every rank; they work at latent resolution and are cheap. From the
first up-block on, everything is convolutions, channel norms and nearest upsampling, so a band
of latent rows plus a halo as deep as those layers' receptive field decodes to exactly the
band's pixels. Each rank crops its band and the bands are all-gathered.
"""

from __future__ import annotations

import math

import torch

from vllm_omni.distributed.attention import balanced_sizes, offsets
from vllm_omni.distributed.comm import GroupComm


def receptive_halo(modules: list[torch.nn.Module]) -> int:
    """Latent rows of context that ``modules`` (run in order) need beyond a band's edge."""
    scale, rows = 1.0, 0.0
    for m in modules:
        for sub in m.modules():
            if isinstance(sub, torch.nn.Upsample):
                scale *= float(sub.scale_factor[-1] if isinstance(sub.scale_factor, tuple)
                               else sub.scale_factor)
            elif isinstance(sub, (torch.nn.Conv2d, torch.nn.Conv3d)):
                k, d = sub.kernel_size[-2], sub.dilation[-2]
                rows += (k - 1) // 2 * d / scale
    return math.ceil(rows) + 1


class VaePatchParallel:
    def __init__(self, comm: GroupComm, decoder: torch.nn.Module, first_local: torch.nn.Module,
                 local_modules: list[torch.nn.Module]):
        self.comm = comm
        self.halo = receptive_halo(local_modules)
        self._band: tuple[int, int, int] | None = None  # (rows kept from the band, skip, in_rows)
        self._sizes: list[int] = []
        first_local.register_forward_pre_hook(self._split)
        decoder.register_forward_hook(self._gather)

    def _split(self, module, args):
        x = args[0]
        rows = x.shape[-2]
        self._sizes = balanced_sizes(rows, self.comm.world_size)
        lo = offsets(self._sizes)[self.comm.rank]
        hi = lo + self._sizes[self.comm.rank]
        lo_h, hi_h = max(0, lo - self.halo), min(rows, hi + self.halo)
        self._band = (hi - lo, lo - lo_h, hi_h - lo_h)
        return (x[..., lo_h:hi_h, :], *args[1:])

    def _gather(self, module, args, out):
        keep, skip, in_rows = self._band
        up = out.shape[-2] // in_rows
        band = out[..., skip * up:(skip + keep) * up, :]
        self._band = None
        return self.comm.all_gather(band, dim=-2, sizes=[n * up for n in self._sizes])


def apply_vae_patch_parallel(vae: torch.nn.Module, comm: GroupComm) -> VaePatchParallel | None:
    """For decoders laid out as conv_in, mid_block, up_blocks, norm_out, conv_out (Wan/Qwen-Image)."""
    if comm.world_size == 1:
        return None
    dec = vae.decoder
    local = [*dec.up_blocks, dec.norm_out, dec.conv_out]
    return VaePatchParallel(comm, dec, dec.up_blocks[0], local)
