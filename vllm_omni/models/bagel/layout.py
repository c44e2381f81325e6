"""BAGEL's published checkpoint layout and sizes, read without loading the networks (the API
server reads these; the worker loads the weights)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

LLM_CONFIG, VIT_CONFIG, WEIGHTS, AE_WEIGHTS = ("llm_config.json", "vit_config.json",
                                              "ema.safetensors", "ae.safetensors")
# In the published weights but not used to make images (the text head).
UNUSED_WEIGHTS = frozenset({"language_model.lm_head.weight"})
# FLUX's autoencoder latent normalisation, which BAGEL was trained with.
AE_SCALE, AE_SHIFT = 0.3611, 0.1159


@dataclass(frozen=True)
class BagelConfig:
    latent_patch_size: int = 2
    latent_channels: int = 16
    vae_downsample: int = 8
    max_latent_size: int = 64  # latent patches per side
    vit_max_num_patch_per_side: int = 70
    connector_act: str = "gelu_pytorch_tanh"

    @property
    def latent_downsample(self) -> int:
        """Pixels per latent token side."""
        return self.vae_downsample * self.latent_patch_size


def is_bagel_dir(model_dir: str) -> bool:
    return all(os.path.exists(os.path.join(model_dir, f))
               for f in (LLM_CONFIG, VIT_CONFIG, WEIGHTS, AE_WEIGHTS))


def weight_shapes(path: str) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def configs(model_dir: str):
    """(llm config, vit config, BagelConfig) of a checkpoint: the two JSON files, and the grid
    sizes the position tables in the weights were trained at."""
    from transformers import Qwen2Config, SiglipVisionConfig

    llm = Qwen2Config.from_json_file(os.path.join(model_dir, LLM_CONFIG))
    vit = SiglipVisionConfig.from_json_file(os.path.join(model_dir, VIT_CONFIG))
    vit.num_hidden_layers -= 1  # BAGEL takes the penultimate layer's features; the last isn't saved
    vit._attn_implementation = "sdpa"
    shapes = weight_shapes(os.path.join(model_dir, WEIGHTS))
    side = lambda name: math.isqrt(shapes[name][0])  # noqa: E731
    ae = weight_shapes(os.path.join(model_dir, AE_WEIGHTS))
    try:
        channels = ae["encoder.conv_out.weight"][0] // 2
        levels = len({k.split(".")[2] for k in ae if k.startswith("encoder.down.")})
        config = BagelConfig(latent_channels=channels, vae_downsample=2 ** (levels - 1),
                             latent_patch_size=math.isqrt(shapes["vae2llm.weight"][1] // channels),
                             max_latent_size=side("latent_pos_embed.pos_embed"),
                             vit_max_num_patch_per_side=side("vit_pos_embed.pos_embed"))
    except KeyError as e:
        raise ValueError(f"{model_dir} is not in BAGEL's published layout: {e.args[0]} is "
                         f"missing from {WEIGHTS} or {AE_WEIGHTS}") from None
    return llm, vit, config


def fit_size(w: int, h: int, max_size: int, min_size: int, stride: int,
             max_pixels: int = 14 * 14 * 9 * 1024) -> tuple[int, int]:
    """BAGEL's input sizing: long side at most ``max_size``, short side at least ``min_size``,
    both multiples of ``stride``, at most ``max_pixels``."""
    def scaled(w, h, s):
        return tuple(max(stride, int(round(round(v * s) / stride) * stride)) for v in (w, h))

    scale = max(min(max_size / max(w, h), 1.0), min_size / min(w, h))
    w, h = scaled(w, h, scale)
    if w * h > max_pixels:
        w, h = scaled(w, h, max_pixels / (w * h))
    if max(w, h) > max_size:
        w, h = scaled(w, h, max_size / max(w, h))
    return w, h


def vae_input_size(config: BagelConfig, w: int, h: int) -> tuple[int, int]:
    """The size an edit input is encoded at, which is also the edit's default output size."""
    side = config.max_latent_size * config.latent_downsample  # 1024 for BAGEL-7B-MoT
    return fit_size(w, h, side, side // 2, config.latent_downsample)


def ae_config(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """diffusers ``AutoencoderKL`` arguments for an original-layout FLUX-style autoencoder."""
    ch = shapes["encoder.conv_in.weight"][0]
    levels = sorted({int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down.")})
    blocks = len({k.split(".")[4] for k in shapes if k.startswith("encoder.down.0.block.")})
    return dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * len(levels),
                up_block_types=["UpDecoderBlock2D"] * len(levels),
                block_out_channels=[shapes[f"encoder.down.{i}.block.0.conv1.weight"][0]
                                    for i in levels],
                layers_per_block=blocks, latent_channels=shapes["encoder.conv_out.weight"][0] // 2,
                norm_num_groups=32, scaling_factor=AE_SCALE, shift_factor=AE_SHIFT,
                # The tile size diffusers' tiled decode would use: FLUX's 1024 at ch 128.
                use_quant_conv=False, use_post_quant_conv=False, sample_size=ch * 8)
