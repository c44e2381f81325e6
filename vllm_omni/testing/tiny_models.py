"""Deterministic random-weight diffusers pipelines, built offline with the real classes.

No weights come from any hub: every component is constructed locally from a small config and a
fixed seed, then written with ``save_pretrained`` so that it is loaded back through the real
``DiffusionPipeline.from_pretrained`` path, exactly as a downloaded checkpoint would be.

    python -m vllm_omni.testing.tiny_models qwen-image OUT_DIR
    python -m vllm_omni.testing.tiny_models qwen-image-bench OUT_DIR

``qwen-image`` keeps the real latent and sequence geometry (8x VAE, 16 latent channels, patch 2) at
toy widths; ``qwen-image-bench`` is the same architecture sized so that a 256x256, 20-step image
takes about 1-3 s on a 2-core CPU, which makes it useful for overhead and cache benchmarks.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

# Prompt templates the pipelines wrap around user text; training the tokenizer on them keeps
# the template prefix close to the real token count (the pipeline drops a fixed number of them).
_QWEN_IMAGE_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
    "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n"
    "{}<|im_end|>\n<|im_start|>assistant\n"
)
_CORPUS_WORDS = (
    "a red fox in the snow, a blue cat on a chair, an astronaut riding a horse on the moon, "
    "the quick brown fox jumps over the lazy dog. a photo of a mountain landscape at sunset "
    "with a lake, trees, clouds and birds. a painting of a city street in the rain. "
    "low quality, blurry, distorted, ugly, bad anatomy. make it sunset, add a hat, remove the "
    "background. 0 1 2 3 4 5 6 7 8 9 colors: red green blue yellow white black orange purple."
)
_QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)


def build_qwen2_tokenizer(vocab_size: int = 700):
    """A byte-level BPE with Qwen2's pre-tokenizer, trained on a small fixed corpus."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    corpus = [_QWEN_IMAGE_TEMPLATE.format(_CORPUS_WORDS)] * 4 + _CORPUS_WORDS.split(". ")
    bpe.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=merges)
    tok.add_special_tokens({"additional_special_tokens": list(_QWEN_SPECIAL_TOKENS[1:])})
    return tok


@dataclass(frozen=True)
class QwenImageSize:
    """Widths of a Qwen-Image variant. Geometry (patch, channels, 8x VAE) is always the real one."""

    text_width: int = 32
    text_layers: int = 2
    dit_layers: int = 2
    dit_heads: int = 2
    dit_head_dim: int = 16
    rope_axes: tuple[int, int, int] = (8, 4, 4)
    vae_base_dim: int = 16


QWEN_IMAGE_TINY = QwenImageSize()
# Sized on the 2-core project machine: 256x256 x 20 steps ~ 1.7 s, ~80% of it in the transformer
# (a narrow VAE keeps decode small, so step-level features show in end-to-end time).
QWEN_IMAGE_BENCH = QwenImageSize(
    text_width=64, text_layers=2, dit_layers=8, dit_heads=4, dit_head_dim=64,
    rope_axes=(16, 24, 24), vae_base_dim=8,
)


def build_qwen_image(size: QwenImageSize = QWEN_IMAGE_TINY):
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = build_qwen2_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    head_dim = size.text_width // 2
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=size.text_width,
        intermediate_size=size.text_width * 2,
        num_hidden_layers=size.text_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                         "mrope_section": [head_dim // 4, head_dim // 8, head_dim // 8]},
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
    )
    vision_config = dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=size.text_width,
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[1],
        window_size=112,
    )
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    torch.manual_seed(0)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()

    torch.manual_seed(1)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=size.dit_layers,
        attention_head_dim=size.dit_head_dim,
        num_attention_heads=size.dit_heads,
        joint_attention_dim=size.text_width,
        guidance_embeds=False,
        axes_dims_rope=size.rope_axes,
    )
    torch.manual_seed(2)
    vae = AutoencoderKLQwenImage(
        base_dim=size.vae_base_dim,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    # The released Qwen-Image scheduler config (dynamic exponential shift).
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9,
        num_train_timesteps=1000, shift=1.0, shift_terminal=0.02, time_shift_type="exponential",
        use_dynamic_shifting=True,
    )
    return QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        transformer=transformer,
    )


FAMILIES = {
    "qwen-image": lambda: build_qwen_image(QWEN_IMAGE_TINY),
    "qwen-image-bench": lambda: build_qwen_image(QWEN_IMAGE_BENCH),
}


def build(family: str, out_dir: str) -> str:
    """Builds ``family`` into ``out_dir`` (skipped if a complete build is already there)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {sorted(FAMILIES)}")
    marker = os.path.join(out_dir, ".vllm_omni_tiny")
    if os.path.exists(marker) and open(marker).read() == family:
        return out_dir
    pipe = FAMILIES[family]()
    pipe.save_pretrained(out_dir, safe_serialization=True)
    with open(marker, "w") as f:
        f.write(family)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("family", choices=sorted(FAMILIES))
    parser.add_argument("out_dir")
    args = parser.parse_args(argv)
    print(build(args.family, args.out_dir))


if __name__ == "__main__":
    main()
