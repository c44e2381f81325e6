"""Qwen-Image's joint text+image attention with the attention itself done sequence-parallel.

Same projections, QK norms and RoPE as diffusers' ``QwenDoubleStreamAttnProcessor2_0``; the
difference is the attention call, which covers every SP rank's text and image shards, with the
text padding mask carried along. Reshaping by head_dim (not head count) keeps it correct on
tensor-parallel shards, which hold ``heads / tp`` heads.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

from vllm_omni.distributed.sequence_parallel import SequenceParallel

TEXT, IMAGE, TEXT_MASK = "encoder_hidden_states", "hidden_states", "encoder_hidden_states_mask"


class QwenImageSPAttnProcessor:
    def __init__(self, sp: SequenceParallel):
        self.sp = sp

    def __call__(self, attn, hidden_states, encoder_hidden_states=None,
                 encoder_hidden_states_mask=None, attention_mask=None, image_rotary_emb=None):
        if encoder_hidden_states is None or attention_mask is not None:
            raise ValueError("Qwen-Image joint attention takes the text stream and no external mask")
        head_dim = attn.inner_dim // attn.heads
        seq_txt = encoder_hidden_states.shape[1]

        def heads(x):
            return x.unflatten(-1, (-1, head_dim))

        img_q, img_k, img_v = (heads(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        txt_q, txt_k, txt_v = (heads(f(encoder_hidden_states))
                               for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_q is not None:
            img_q = attn.norm_q(img_q)
        if attn.norm_k is not None:
            img_k = attn.norm_k(img_k)
        if attn.norm_added_q is not None:
            txt_q = attn.norm_added_q(txt_q)
        if attn.norm_added_k is not None:
            txt_k = attn.norm_added_k(txt_k)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            img_q = apply_rotary_emb_qwen(img_q, img_freqs, use_real=False)
            img_k = apply_rotary_emb_qwen(img_k, img_freqs, use_real=False)
            txt_q = apply_rotary_emb_qwen(txt_q, txt_freqs, use_real=False)
            txt_k = apply_rotary_emb_qwen(txt_k, txt_freqs, use_real=False)

        q = torch.cat([txt_q, img_q], dim=1)
        k = torch.cat([txt_k, img_k], dim=1)
        v = torch.cat([txt_v, img_v], dim=1)
        sizes, masks = self.sp.joint_layout((TEXT, IMAGE), {TEXT: TEXT_MASK})
        out = self.sp.attention(q, k, v, sizes, masks).flatten(2, 3).to(q.dtype)

        txt_out, img_out = out[:, :seq_txt], out[:, seq_txt:]
        img_out = attn.to_out[0](img_out.contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)
        txt_out = attn.to_add_out(txt_out.contiguous())
        return img_out, txt_out
