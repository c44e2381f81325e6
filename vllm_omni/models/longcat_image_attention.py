"""LongCat-Image's joint attention with the attention itself done sequence-parallel.

Same projections, QK norms and RoPE as diffusers' ``LongCatImageAttnProcessor``; the attention
call covers every SP rank's text and image shards. Double-stream blocks pass the text stream
separately; single-stream blocks pass this rank's [text shard, image shard] already joined, which
is the same per-rank layout. Heads come from ``attn.heads``, which tensor parallelism divides.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb

from vllm_omni.distributed.sequence_parallel import SequenceParallel

TEXT, IMAGE = "encoder_hidden_states", "hidden_states"


class LongCatImageSPAttnProcessor:
    def __init__(self, sp: SequenceParallel):
        self.sp = sp

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        if attention_mask is not None:
            raise ValueError("LongCat-Image attention takes no external mask")

        def heads(x):
            return x.unflatten(-1, (attn.heads, -1))

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), \
            heads(attn.to_v(hidden_states))
        q, k = attn.norm_q(q), attn.norm_k(k)
        joint = encoder_hidden_states is not None
        if joint:
            eq = attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states)))
            ek = attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states)))
            ev = heads(attn.add_v_proj(encoder_hidden_states))
            q, k, v = (torch.cat([a, b], dim=1) for a, b in ((eq, q), (ek, k), (ev, v)))
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        sizes, masks = self.sp.joint_layout((TEXT, IMAGE))
        out = self.sp.attention(q, k, v, sizes, masks).flatten(2, 3).to(q.dtype)
        if not joint:
            return out
        seq_txt = encoder_hidden_states.shape[1]
        txt_out, img_out = out[:, :seq_txt], out[:, seq_txt:]
        img_out = attn.to_out[1](attn.to_out[0](img_out.contiguous()))
        return img_out, attn.to_add_out(txt_out.contiguous())
