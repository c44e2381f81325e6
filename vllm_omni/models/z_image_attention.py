"""Z-Image's single-stream attention with the attention itself done sequence-parallel.

Z-Image refines the image and caption tokens separately, then runs its main stack on one
joined, padded sequence with a key mask. Sequence parallelism splits that joined sequence (with
its mask and RoPE table) at the main stack's first block. This processor replaces diffusers'
``ZSingleStreamAttnProcessor`` everywhere, but only attends across ranks once the split has
happened: the refiners, which run earlier in the same forward on whole sequences, attend
locally as before. Heads come from ``attn.heads`` (tensor parallelism divides it).
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor

from vllm_omni.distributed.sequence_parallel import SequenceParallel

STREAM, MASK = "x", "attn_mask"


class ZImageSPAttnProcessor:
    def __init__(self, sp: SequenceParallel):
        self.sp = sp
        self.local = ZSingleStreamAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 freqs_cis=None):
        if STREAM not in self.sp.totals:  # a refiner: its sequence is not split
            return self.local(attn, hidden_states, encoder_hidden_states, attention_mask,
                              freqs_cis)

        def heads(x):
            return x.unflatten(-1, (attn.heads, -1))

        q, k, v = (heads(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if freqs_cis is not None:
            q, k = _rope(q, freqs_cis), _rope(k, freqs_cis)
        sizes, masks = self.sp.joint_layout((STREAM,), {STREAM: MASK})
        out = self.sp.attention(q, k, v, sizes, masks).flatten(2, 3).to(q.dtype)
        out = attn.to_out[0](out)
        if len(attn.to_out) > 1:
            out = attn.to_out[1](out)
        return out


def _rope(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Z-Image's complex RoPE (as in ``ZSingleStreamAttnProcessor``)."""
    z = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(z * freqs_cis.unsqueeze(2)).flatten(3).type_as(x)


def z_image_cp_plan(transformer) -> dict:
    """Split the joined sequence, its key mask and RoPE table at the main stack; every main
    block gets the mask and table (the model passes the whole ones to each), only the first the
    tokens; gather after the last block."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    last = len(transformer.layers) - 1
    per_block = {
        MASK: ContextParallelInput(split_dim=1, expected_dims=2, split_output=False),
        "freqs_cis": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False),
    }
    return {
        "layers.*": per_block,
        "layers.0": {STREAM: ContextParallelInput(split_dim=1, expected_dims=3,
                                                  split_output=False)},
        f"layers.{last}": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }
