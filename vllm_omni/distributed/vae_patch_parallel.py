"""VAE patch parallelism: each rank decodes a horizontal band of the image.

The decoder's global parts (its input conv and the mid-block, which has spatial self-attention)
run on the whole latent on every rank; they work at latent resolution and are cheap. From the
first up-block on, everything is convolutions, norms and nearest upsampling, so a band of latent
rows plus a halo as deep as those layers' receptive field decodes to exactly the band's pixels.
Each rank crops its band and the bands are all-gathered.

Per-pixel norms (Qwen-Image's RMS norm) need nothing more. GroupNorm (diffusers' AutoencoderKL:
FLUX, SD3, Z-Image) normalises with statistics over the whole image: each rank sums its own rows
(never the halo, which another rank owns), the sums are all-reduced, and every rank normalises
its band with the whole image's mean and variance.
"""

from __future__ import annotations

import math

import torch
from diffusers.hooks import HookRegistry, ModelHook

from vllm_omni.distributed.attention import balanced_sizes, offsets
from vllm_omni.distributed.comm import GroupComm
from vllm_omni.features import ParallelFeature

NORM_HOOK = "vllm_omni_vae_band_group_norm"


def receptive_halo(modules: list[torch.nn.Module]) -> int:
    """Latent rows of context that ``modules`` (run in order) need beyond a band's edge."""
    scale, rows = 1.0, 0.0
    for m in modules:
        for sub in m.modules():
            if isinstance(sub, torch.nn.Upsample):
                scale *= float(sub.scale_factor[-1] if isinstance(sub.scale_factor, tuple)
                               else sub.scale_factor)
            elif type(sub).__name__ == "Upsample2D":  # diffusers: nearest x2, then its conv
                scale *= 2.0
            elif isinstance(sub, (torch.nn.Conv2d, torch.nn.Conv3d)):
                k, d = sub.kernel_size[-2], sub.dilation[-2]
                rows += (k - 1) // 2 * d / scale
    return math.ceil(rows) + 1


class VaePatchParallel:
    """For decoders laid out as conv_in, mid_block, up_blocks, a norm, conv_out: Wan/Qwen-Image
    (``norm_out``) and diffusers' ``AutoencoderKL`` (``conv_norm_out``)."""

    def __init__(self, vae: torch.nn.Module, comm: GroupComm):
        dec = vae.decoder
        local = [*dec.up_blocks, getattr(dec, "norm_out", None) or dec.conv_norm_out, dec.conv_out]
        self.comm = comm
        self.halo = receptive_halo(local)
        self._band: tuple[int, int, int] | None = None  # (rows kept from the band, skip, in_rows)
        self._sizes: list[int] = []
        self._handles = [dec.up_blocks[0].register_forward_pre_hook(self._split),
                         dec.register_forward_hook(self._gather)]
        self._norms = [sub for m in local for sub in m.modules()
                       if isinstance(sub, torch.nn.GroupNorm)]
        for norm in self._norms:
            HookRegistry.check_if_exists_or_initialize(norm).register_hook(
                _BandGroupNorm(self), NORM_HOOK)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for norm in self._norms:
            HookRegistry.check_if_exists_or_initialize(norm).remove_hook(NORM_HOOK)
        self._handles, self._norms = [], []

    def _group_norm(self, norm: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        keep, skip, in_rows = self._band
        up = x.shape[-2] // in_rows
        own = x[..., skip * up:(skip + keep) * up, :]
        g = own.reshape(own.shape[0], norm.num_groups, -1).double()
        stats = torch.stack([g.sum(-1), (g * g).sum(-1),
                             torch.full_like(g[..., 0], g.shape[-1])])
        self.comm.all_reduce(stats)
        mean = stats[0] / stats[2]
        var = (stats[1] / stats[2] - mean * mean).clamp_min(0)
        shape = (x.shape[0], norm.num_groups) + (1,) * (x.dim() - 1)  # broadcasts over xg
        xg = x.reshape(x.shape[0], norm.num_groups, -1, *x.shape[2:])
        mean = mean.to(x.dtype).view(shape)
        inv = torch.rsqrt(var + norm.eps).to(x.dtype).view(shape)
        out = ((xg - mean) * inv).reshape(x.shape)
        if norm.affine:
            affine = (1, -1) + (1,) * (x.dim() - 2)
            out = out * norm.weight.view(affine) + norm.bias.view(affine)
        return out

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


class _BandGroupNorm(ModelHook):
    """A GroupNorm of a band normalised with the whole image's statistics."""

    def __init__(self, pp: VaePatchParallel):
        super().__init__()
        self.pp = pp

    def new_forward(self, module, x):
        if self.pp._band is None:  # not inside a band decode (e.g. an encoder call)
            return self.fn_ref.original_forward(x)
        return self.pp._group_norm(module, x)


class VaePatchParallelFeature(ParallelFeature):
    name = "vae_patch_parallel"

    def apply(self, pipe, groups) -> None:
        self.groups, self.pp = groups, VaePatchParallel(pipe.vae, groups.vae)

    def remove(self) -> None:
        self.pp.remove()
