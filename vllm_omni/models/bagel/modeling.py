"""BAGEL's networks: a Qwen2 language model with a second ("generation") expert per layer, a SigLIP
encoder for input images and the small adapters between them and the latent space.

Written for this project from BAGEL's paper and the ByteDance-Seed/Bagel reference, with
transformers' Qwen2 and SigLIP building blocks; module and parameter names follow the published
``ema.safetensors`` so that it loads as it is.

Mixture of Transformers: every token goes through the same attention, but its projections,
norms and MLP come from one of two experts: text and ViT tokens use the understanding expert
(``q_proj``, ``mlp``...), latent tokens the generation expert (``q_proj_moe_gen``...).

Sequences are packed: a forward takes the query tokens of several sequences end to end, each
with its own cached prompt (``Context``) and RoPE positions, and attends within each sequence
only. A prompt's keys and values are computed once (``Bagel.extend``) and every denoising step
attends to them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right
from transformers.activations import ACT2FN
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2MLP,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
    apply_rotary_pos_emb,
)
from transformers.models.siglip.modeling_siglip import SiglipEncoder

from vllm_omni.models.bagel.layout import BagelConfig


@dataclass(frozen=True)
class Context:
    """A prompt prefix as the language model saw it: each layer's keys and values
    ([tokens, kv_heads, head_dim]) and the next RoPE position. Extending one makes a new one,
    so CFG's shorter prefixes stay usable as they are."""

    keys: tuple[torch.Tensor, ...] = ()
    values: tuple[torch.Tensor, ...] = ()
    rope: int = 0


EMPTY = Context()


@dataclass
class Packed:
    """The query tokens of one forward: ``lens[i]`` tokens of sequence i, which attends to
    ``contexts[i]`` then to its own tokens (causally for text, fully otherwise). ``gen``/``und``:
    indices of the tokens each expert takes (None: no token)."""

    lens: list[int]
    contexts: list[Context]
    positions: torch.Tensor
    gen: torch.Tensor | None = None
    und: torch.Tensor | None = None
    causal: bool = False
    # Set when extending a context: each layer appends its (keys, values) of these tokens.
    kv_out: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    slices: list[slice] = field(init=False)

    def __post_init__(self):
        starts = [0, *accumulate(self.lens)]
        self.slices = [slice(a, b) for a, b in zip(starts, starts[1:])]


def route(x: torch.Tensor, p: Packed, und, gen) -> torch.Tensor:
    """``und`` on the understanding tokens and ``gen`` on the generation tokens of ``x``."""
    if p.gen is None:
        return und(x)
    if p.und is None:
        return gen(x)
    a, b = und(x[p.und]), gen(x[p.gen])
    out = a.new_empty((x.shape[0], *a.shape[1:]))
    out[p.und], out[p.gen] = a, b
    return out


class MoTAttention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        d, q, kv = config.hidden_size, self.heads * self.head_dim, self.kv_heads * self.head_dim
        for suffix in ("", "_moe_gen"):
            setattr(self, f"q_proj{suffix}", nn.Linear(d, q, bias=True))
            setattr(self, f"k_proj{suffix}", nn.Linear(d, kv, bias=True))
            setattr(self, f"v_proj{suffix}", nn.Linear(d, kv, bias=True))
            setattr(self, f"o_proj{suffix}", nn.Linear(q, d, bias=False))
            setattr(self, f"q_norm{suffix}", Qwen2RMSNorm(self.head_dim, eps=config.rms_norm_eps))
            setattr(self, f"k_norm{suffix}", Qwen2RMSNorm(self.head_dim, eps=config.rms_norm_eps))

    def _project(self, x, p: Packed, name: str, heads: int) -> torch.Tensor:
        """Each token's ``name`` ("q", "k" or "v") heads from its expert; queries and keys are
        RMS-normalised per head (BAGEL's qk-norm), values are not."""
        def expert(suffix):
            proj = getattr(self, f"{name}_proj{suffix}")
            norm = getattr(self, f"{name}_norm{suffix}", None)

            def heads_of(t):
                t = proj(t).view(-1, heads, self.head_dim)
                return t if norm is None else norm(t)
            return heads_of
        return route(x, p, expert(""), expert("_moe_gen"))

    def forward(self, x, p: Packed, cos, sin):
        q = self._project(x, p, "q", self.heads)
        k = self._project(x, p, "k", self.kv_heads)
        v = self._project(x, p, "v", self.kv_heads)
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
        out = torch.empty_like(q)
        for s, ctx in zip(p.slices, p.contexts):
            ks, vs = k[s], v[s]
            if ctx.keys:
                ks = torch.cat([ctx.keys[self.layer_idx], ks])
                vs = torch.cat([ctx.values[self.layer_idx], vs])
            n, total = s.stop - s.start, ks.shape[0]
            mask = causal_lower_right(n, total) if p.causal and n > 1 else None
            o = F.scaled_dot_product_attention(q[s].transpose(0, 1)[None],
                                               ks.transpose(0, 1)[None], vs.transpose(0, 1)[None],
                                               attn_mask=mask, enable_gqa=True)
            out[s] = o[0].transpose(0, 1)
        if p.kv_out is not None:
            p.kv_out.append((k, v))
        out = out.reshape(x.shape[0], -1)
        return route(out, p, self.o_proj, self.o_proj_moe_gen)


class MoTDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.self_attn = MoTAttention(config, layer_idx)
        self.mlp, self.mlp_moe_gen = Qwen2MLP(config), Qwen2MLP(config)
        eps, d = config.rms_norm_eps, config.hidden_size
        self.input_layernorm = Qwen2RMSNorm(d, eps=eps)
        self.input_layernorm_moe_gen = Qwen2RMSNorm(d, eps=eps)
        self.post_attention_layernorm = Qwen2RMSNorm(d, eps=eps)
        self.post_attention_layernorm_moe_gen = Qwen2RMSNorm(d, eps=eps)

    def forward(self, hidden_states, p: Packed, cos, sin):
        # One stream in, one out (cache-dit's Pattern_3 and TeaCache's block IO name it so).
        x = hidden_states
        x = x + self.self_attn(route(x, p, self.input_layernorm, self.input_layernorm_moe_gen),
                               p, cos, sin)
        return x + route(x, p, lambda t: self.mlp(self.post_attention_layernorm(t)),
                         lambda t: self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(t)))


class MoTModel(nn.Module):
    """``language_model.model``: embeddings, the decoder layers and the final norms."""

    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MoTDecoderLayer(config, i)
                                    for i in range(config.num_hidden_layers))
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.norm_moe_gen = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config=config)

    def forward(self, x: torch.Tensor, p: Packed) -> torch.Tensor:
        """A denoising step's final hidden states (what step caches wrap)."""
        return self.run(x, p)

    def run(self, x: torch.Tensor, p: Packed) -> torch.Tensor:
        """The final hidden states of the packed tokens; called directly to extend a prompt's
        context, which is not a denoising step."""
        cos, sin = self.rotary_emb(x[None], p.positions[None])
        cos, sin = cos[0], sin[0]
        for layer in self.layers:
            x = layer(x, p, cos, sin)
        return route(x, p, self.norm, self.norm_moe_gen)


class LanguageModel(nn.Module):
    """``language_model``: the published checkpoint's ``Qwen2ForCausalLM``, without its
    ``lm_head`` (text output is not served: the image path never reads it)."""

    def __init__(self, config):
        super().__init__()
        self.model = MoTModel(config)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t (cosines first) through a two-layer MLP."""

    def __init__(self, hidden_size: int, frequencies: int = 256):
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequencies // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32,
                                                          device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class PositionEmbedding(nn.Module):
    """A fixed (2-D sin-cos, stored in the checkpoint) table over a side x side patch grid,
    indexed by row * side + column."""

    def __init__(self, side: int, hidden_size: int):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(side * side, hidden_size), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[ids]


def sincos_2d(side: int, dim: int) -> torch.Tensor:
    """The table ``PositionEmbedding`` is trained with: half the channels encode the row, half
    the column, each as sines then cosines."""
    def one_axis(pos, d):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        out = pos.reshape(-1, 1).double() * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.cat([one_axis(rows, dim // 2), one_axis(cols, dim // 2)], dim=1).float()


def grid_ids(h: int, w: int, side: int) -> torch.Tensor:
    """Flat ``PositionEmbedding`` ids of an h x w patch grid placed at the table's corner."""
    return (torch.arange(h)[:, None] * side + torch.arange(w)).flatten()


class MLPConnector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, act: str):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(in_dim, out_dim), nn.Linear(out_dim, out_dim)
        self.act = ACT2FN[act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VisionEmbeddings(nn.Module):
    """SigLIP's patch embedding as a Linear over flattened (row, column, channel) patches, plus a
    learned embedding per position of the largest grid."""

    def __init__(self, config):
        super().__init__()
        p, d = config.patch_size, config.hidden_size
        self.patch_embedding = nn.Linear(config.num_channels * p * p, d)
        self.position_embedding = nn.Embedding((config.image_size // p) ** 2, d)

    def forward(self, patches, ids):
        return self.patch_embedding(patches) + self.position_embedding(ids)


class VisionTransformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embeddings = VisionEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, patches, ids):
        h = self.embeddings(patches, ids)[None]
        return self.post_layernorm(self.encoder(inputs_embeds=h).last_hidden_state[0])


class VisionModel(nn.Module):
    """``vit_model``: SigLIP on one image's patches at its own size (no resize to a square)."""

    def __init__(self, config):
        super().__init__()
        self.vision_model = VisionTransformer(config)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[C, H, W] -> [(H/p)(W/p), p*p*C], patches in row order, each flattened (row, col, chan)."""
    c, h, w = x.shape
    x = x.reshape(c, h // p, p, w // p, p)
    return torch.einsum("chpwq->hwpqc", x).reshape(-1, p * p * c)


def unpatchify(x: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    c = x.shape[-1] // (p * p)
    x = x.reshape(h, w, p, p, c)
    return torch.einsum("hwpqc->chpwq", x).reshape(c, h * p, w * p)


class Bagel(nn.Module):
    """The whole network around the language model. Its ``forward`` is one denoising step:
    velocities of the latent tokens of several sequences (CFG branches, images) at once."""

    def __init__(self, llm_config, vit_config, config: BagelConfig,
                 start_of_image: int, end_of_image: int):
        super().__init__()
        self.config = config
        self.start_of_image, self.end_of_image = start_of_image, end_of_image
        d = llm_config.hidden_size
        self.language_model = LanguageModel(llm_config)
        self.time_embedder = TimestepEmbedder(d)
        dim = config.latent_patch_size ** 2 * config.latent_channels
        self.vae2llm, self.llm2vae = nn.Linear(dim, d), nn.Linear(d, dim)
        self.latent_pos_embed = PositionEmbedding(config.max_latent_size, d)
        self.vit_model = VisionModel(vit_config)
        self.vit_patch_size = vit_config.patch_size
        self.connector = MLPConnector(vit_config.hidden_size, d, config.connector_act)
        self.vit_pos_embed = PositionEmbedding(config.vit_max_num_patch_per_side, d)

    # What diffusers' pipeline machinery reads off a component (ModelMixin has both).
    @property
    def device(self) -> torch.device:
        return self.llm2vae.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm2vae.weight.dtype

    @property
    def _lm(self) -> MoTModel:
        return self.language_model.model

    def _markers(self, device) -> torch.Tensor:
        ids = torch.tensor([self.start_of_image, self.end_of_image], device=device)
        return self._lm.embed_tokens(ids)

    def _latent_tokens(self, x, t: float, ids):
        """Noisy latent patches [n, dim] at time t as language-model inputs."""
        times = torch.full((1,), t, device=x.device)
        return self.vae2llm(x) + self.time_embedder(times) + self.latent_pos_embed(ids)

    def extend(self, ctx: Context, embeds: torch.Tensor, gen: torch.Tensor | None,
               causal: bool) -> Context:
        """``ctx`` followed by ``embeds``: text advances the RoPE position per token (causal);
        an image's tokens all share one position, and the image advances it by one."""
        n = embeds.shape[0]
        if causal:
            positions = torch.arange(ctx.rope, ctx.rope + n, device=embeds.device)
        else:
            positions = torch.full((n,), ctx.rope, device=embeds.device)
        und = None
        if gen is not None:
            mask = torch.ones(n, dtype=torch.bool, device=embeds.device)
            mask[gen] = False
            und = mask.nonzero()[:, 0]
        p = Packed([n], [ctx], positions, gen=gen, und=und, causal=causal, kv_out=[])
        self._lm.run(embeds, p)
        keys, values = [k for k, _ in p.kv_out], [v for _, v in p.kv_out]
        if ctx.keys:
            keys = [torch.cat([a, b]) for a, b in zip(ctx.keys, keys)]
            values = [torch.cat([a, b]) for a, b in zip(ctx.values, values)]
        return Context(tuple(keys), tuple(values), ctx.rope + (n if causal else 1))

    def add_text(self, ctx: Context, ids: list[int]) -> Context:
        embeds = self._lm.embed_tokens(torch.tensor(ids, device=self.device))
        return self.extend(ctx, embeds, None, causal=True)

    def add_vit_image(self, ctx: Context, pixels: torch.Tensor) -> Context:
        """An image as the understanding expert sees it: SigLIP features of its patches."""
        p, side = self.vit_patch_size, self.config.vit_max_num_patch_per_side
        h, w = pixels.shape[1] // p, pixels.shape[2] // p
        ids = grid_ids(h, w, side).to(pixels.device)
        feats = self.vit_model.vision_model(patchify(pixels, p), ids)
        feats = self.connector(feats) + self.vit_pos_embed(ids)
        start, end = self._markers(pixels.device)
        return self.extend(ctx, torch.cat([start[None], feats, end[None]]), None, causal=False)

    def add_vae_image(self, ctx: Context, latent: torch.Tensor) -> Context:
        """An image as the generation expert sees it: its clean latents (t = 0)."""
        cfg = self.config
        h, w = latent.shape[1] // cfg.latent_patch_size, latent.shape[2] // cfg.latent_patch_size
        ids = grid_ids(h, w, cfg.max_latent_size).to(latent.device)
        tokens = self._latent_tokens(patchify(latent, cfg.latent_patch_size), 0.0, ids)
        start, end = self._markers(latent.device)
        gen = torch.arange(1, h * w + 1, device=latent.device)
        return self.extend(ctx, torch.cat([start[None], tokens, end[None]]), gen, causal=False)

    def forward(self, latents: torch.Tensor, t: float, contexts: list[Context],
                image_of: list[int], h: int, w: int) -> torch.Tensor:
        """``latents``: [images, h*w, dim] noisy latent tokens at time t. Sequence i generates
        image ``image_of[i]`` after ``contexts[i]``; returns [sequences, h*w, dim] velocities."""
        n, device = h * w, latents.device
        ids = grid_ids(h, w, self.config.max_latent_size).to(device)
        tokens = self._latent_tokens(latents, t, ids)  # [images, n, d]
        start, end = self._markers(device)
        embeds = torch.cat([torch.cat([start[None], tokens[i], end[None]]) for i in image_of])
        seq = n + 2
        offsets = torch.arange(len(contexts), device=device)[:, None] * seq
        gen = (offsets + torch.arange(1, n + 1, device=device)).flatten()
        und = (offsets + torch.tensor([0, n + 1], device=device)).flatten()
        positions = torch.tensor([c.rope for c in contexts], device=device).repeat_interleave(seq)
        p = Packed([seq] * len(contexts), contexts, positions, gen=gen, und=und)
        hidden = self._lm(embeds, p)
        return self.llm2vae(hidden[gen]).view(len(contexts), n, -1)
