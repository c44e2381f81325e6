"""Deterministic random-weight diffusers pipelines, built offline with the real classes.

No weights come from any hub: every component is constructed locally from a small config and a
fixed seed, then written with ``save_pretrained`` so that it is loaded back through the real
``DiffusionPipeline.from_pretrained`` path, exactly as a downloaded checkpoint would be.

    python -m vllm_omni.testing.tiny_models qwen-image OUT_DIR
    python -m vllm_omni.testing.tiny_models qwen-image-bench OUT_DIR

``qwen-image`` keeps the real latent and sequence geometry (8x VAE, 16 latent channels, patch 2) at
toy widths; ``qwen-image-bench`` is the same architecture sized so that a 256x256, 20-step image
takes about 1-3 s on a 2-core CPU, which makes it useful for overhead and cache benchmarks.

Every other seed model has a family too (``FAMILIES``): the real pipeline class, tokenizer kinds,
latent channels, VAE factor and patch sizes, with 1-2 blocks of width 16-48. The builders comment
their gotchas (FLUX.2-klein's 28-layer encoder, Z-Image's uninitialised pad tokens, GLM-Image's
vocabulary layout).
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


def build_qwen_image(size: QwenImageSize = QWEN_IMAGE_TINY, seed_offset: int = 0):
    import torch
    from diffusers import QwenImagePipeline

    torch.manual_seed(seed_offset)
    parts = _qwen_image_parts(size, seed_offset=seed_offset)
    return QwenImagePipeline(**parts)


# -- shared tokenizers and components ------------------------------------------------------------

# Qwen3's chat template, reduced to what the pipelines use: user turns and an empty think block
# when enable_thinking is False (as the released template renders it).
_QWEN3_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
# Qwen2-VL's template as used by Qwen2VLProcessor.apply_chat_template (text and image parts).
_QWEN2VL_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_qwen3_tokenizer():
    tok = build_qwen2_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    tok.chat_template = _QWEN3_CHAT_TEMPLATE
    return tok


def build_qwen2vl_processor(tokenizer):
    """Qwen2VLProcessor around ``tokenizer`` (needs a loadable torchvision: platform_fixes)."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tokenizer.chat_template = _QWEN2VL_CHAT_TEMPLATE
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 256),
        tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(),
        chat_template=_QWEN2VL_CHAT_TEMPLATE,
    )


def build_t5_tokenizer():
    """A Unigram T5 tokenizer: specials, then letters and digits with and without '▁'."""
    from transformers import T5Tokenizer

    chars = "abcdefghijklmnopqrstuvwxyz0123456789,.!?'-"
    words = ("a", "the", "of", "in", "on", "and", "with", "red", "blue", "cat", "dog", "fox",
             "photo")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("▁" + w, -2.0) for w in words]
    vocab += [("▁" + c, -4.0) for c in chars] + [(c, -5.0) for c in chars] + [("▁", -3.0)]
    return T5Tokenizer(vocab=vocab, extra_ids=8, model_max_length=512)


def build_clip_tokenizer():
    """A character-level CLIP BPE (no merges): every byte, alone and as a word end."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in sorted(chars):
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _qwen25vl_text_encoder(tokenizer, width: int = 32, layers: int = 2, seed: int = 0):
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    head_dim = width // 2
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=width * 2,
            num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                             "mrope_section": [head_dim // 4, head_dim // 8, head_dim // 8]},
            bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
            pad_token_id=ids("<|endoftext|>"),
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=width,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[1],
            window_size=112,
        ),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _qwen3_text_encoder(tokenizer, width: int, layers: int, causal_lm: bool = False,
                        seed: int = 0):
    """A Qwen3 text encoder (``Qwen3Model``, or ``Qwen3ForCausalLM`` for FLUX.2-klein)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    ids = tokenizer.convert_tokens_to_ids
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=width * 2,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2, head_dim=width // 2,
        max_position_embeddings=4096, bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
    )
    torch.manual_seed(seed)
    return (Qwen3ForCausalLM if causal_lm else Qwen3Model)(config).eval()


def _flux_vae(latent_channels: int = 16, seed: int = 2, channels=(8, 16, 16, 16),
              groups: int = 4, **extra):
    """The FLUX/SD3 VAE topology (4 stages: 8x) at toy width."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=channels,
        layers_per_block=1, latent_channels=latent_channels, norm_num_groups=groups,
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
        use_post_quant_conv=False, **extra,
    )


def _flow_scheduler(**overrides):
    from diffusers import FlowMatchEulerDiscreteScheduler

    base = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    return FlowMatchEulerDiscreteScheduler(**{**base, **overrides})


def _qwen_image_parts(size: QwenImageSize = QWEN_IMAGE_TINY, layered: bool = False,
                      zero_cond_t: bool = False, seed_offset: int = 0):
    """Components shared by every Qwen-Image pipeline (text-to-image, edit, layered)."""
    import torch
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    tokenizer = build_qwen2_tokenizer()
    text_encoder = _qwen25vl_text_encoder(tokenizer, size.text_width, size.text_layers,
                                          seed=seed_offset)
    torch.manual_seed(seed_offset + 1)
    extra = {}
    if layered:
        extra = dict(use_layer3d_rope=True, use_additional_t_cond=True)
    if zero_cond_t:
        extra["zero_cond_t"] = True
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=size.dit_layers,
        attention_head_dim=size.dit_head_dim, num_attention_heads=size.dit_heads,
        joint_attention_dim=size.text_width, guidance_embeds=False, axes_dims_rope=size.rope_axes,
        **extra,
    )
    torch.manual_seed(seed_offset + 2)
    vae = AutoencoderKLQwenImage(
        base_dim=size.vae_base_dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
        temperal_downsample=[False, True, True], **({"input_channels": 4} if layered else {}),
    )
    # The released Qwen-Image scheduler config (dynamic exponential shift).
    scheduler = _flow_scheduler(base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
                                shift_terminal=0.02, time_shift_type="exponential")
    return dict(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                transformer=transformer)


def build_qwen_image_edit(plus: bool = False):
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline

    parts = _qwen_image_parts()
    cls = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    return cls(processor=build_qwen2vl_processor(parts["tokenizer"]), **parts)


def build_qwen_image_layered():
    from diffusers import QwenImageLayeredPipeline

    parts = _qwen_image_parts(layered=True)
    return QwenImageLayeredPipeline(processor=build_qwen2vl_processor(parts["tokenizer"]), **parts)


def build_z_image():
    import torch
    from diffusers import ZImagePipeline, ZImageTransformer2DModel

    tokenizer = build_qwen3_tokenizer()
    text_encoder = _qwen3_text_encoder(tokenizer, 32, 2)
    torch.manual_seed(1)
    # dim 48: the FFN width int(dim / 3 * 8) = 128 splits over tensor-parallel ranks, as the
    # released model's 10240 does.
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=48, n_layers=2,
        n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[8, 8, 8],
        axes_lens=[256, 64, 64],
    )
    with torch.no_grad():  # created with torch.empty: random memory would make outputs vary
        transformer.x_pad_token.normal_(0, 0.02)
        transformer.cap_pad_token.normal_(0, 0.02)
    # Z-Image-Turbo's released scheduler: static shift 3.
    scheduler = _flow_scheduler(use_dynamic_shifting=False, shift=3.0)
    return ZImagePipeline(scheduler=scheduler, vae=_flux_vae(), text_encoder=text_encoder,
                          tokenizer=tokenizer, transformer=transformer)


def _clip_text_encoder(tokenizer, width: int, projection: bool, seed: int):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=width * 2,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
        projection_dim=width, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def _t5_encoder(tokenizer, width: int, seed: int):
    import torch
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=len(tokenizer), d_model=width, d_ff=width * 2, d_kv=width // 2,
                      num_layers=2, num_heads=2, relative_attention_num_buckets=8,
                      decoder_start_token_id=0, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def build_flux1():
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel

    tokenizer, tokenizer_2 = build_clip_tokenizer(), build_t5_tokenizer()
    text_encoder = _clip_text_encoder(tokenizer, 16, projection=False, seed=0)
    text_encoder_2 = _t5_encoder(tokenizer_2, 32, seed=3)
    torch.manual_seed(1)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
        guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    )
    return FluxPipeline(scheduler=_flow_scheduler(), vae=_flux_vae(), text_encoder=text_encoder,
                        tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                        tokenizer_2=tokenizer_2, transformer=transformer)


def build_flux2_klein(distilled: bool = True):
    import torch
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel

    tokenizer = build_qwen3_tokenizer()
    # The pipeline stacks hidden states of layers (9, 18, 27): the encoder needs 28 layers.
    text_encoder = _qwen3_text_encoder(tokenizer, 16, 28, causal_lm=True)
    torch.manual_seed(1)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=128, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * 16, timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
    )
    torch.manual_seed(2)
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=32,
        norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
    )
    scheduler = _flow_scheduler(shift=3.0, use_dynamic_shifting=True)
    return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                              tokenizer=tokenizer, transformer=transformer,
                              is_distilled=distilled)


def build_sd35():
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline

    clip_tok, clip_tok_2 = build_clip_tokenizer(), build_clip_tokenizer()
    t5_tok = build_t5_tokenizer()
    te1 = _clip_text_encoder(clip_tok, 16, projection=True, seed=0)
    te2 = _clip_text_encoder(clip_tok_2, 16, projection=True, seed=4)
    te3 = _t5_encoder(t5_tok, 32, seed=3)
    torch.manual_seed(1)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
        pooled_projection_dim=32, out_channels=16, pos_embed_max_size=96, qk_norm="rms_norm",
    )
    torch.manual_seed(2)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16),
        layers_per_block=1, latent_channels=16, norm_num_groups=4, scaling_factor=1.5305,
        shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=_flow_scheduler(use_dynamic_shifting=False),
        vae=vae, text_encoder=te1, tokenizer=clip_tok, text_encoder_2=te2, tokenizer_2=clip_tok_2,
        text_encoder_3=te3, tokenizer_3=t5_tok,
    )


def build_longcat_image(edit: bool = False):
    import torch
    from diffusers import (
        LongCatImageEditPipeline,
        LongCatImagePipeline,
        LongCatImageTransformer2DModel,
    )

    tokenizer = build_qwen2_tokenizer()
    text_encoder = _qwen25vl_text_encoder(tokenizer, 32, 2)
    torch.manual_seed(1)
    transformer = LongCatImageTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[4, 6, 6],
    )
    cls = LongCatImageEditPipeline if edit else LongCatImagePipeline
    return cls(scheduler=_flow_scheduler(), vae=_flux_vae(), text_encoder=text_encoder,
               tokenizer=tokenizer, text_processor=build_qwen2vl_processor(tokenizer),
               transformer=transformer)


def build_ovis_image():
    import torch
    from diffusers import OvisImagePipeline, OvisImageTransformer2DModel

    tokenizer = build_qwen3_tokenizer()
    text_encoder = _qwen3_text_encoder(tokenizer, 32, 2)
    torch.manual_seed(1)
    transformer = OvisImageTransformer2DModel(
        patch_size=1, in_channels=64, out_channels=64, num_layers=1, num_single_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6),
    )
    return OvisImagePipeline(scheduler=_flow_scheduler(), vae=_flux_vae(),
                             text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)

# GLM-Image's processor chat template: user turns (text and images), then the assistant turn the
# processor appends the target grid and the image-start token to.
_GLM_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|begin_of_image|><|image|><|end_of_image|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}<|assistant|>\n"
)


def build_glm_tokenizer(vision_codes: int = 64):
    """GLM-Image's vocabulary layout: vision codes first (0..codes-1), then image start/end,
    then a small byte-level BPE, then the chat specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    vision = [f"<|v{i}|>" for i in range(vision_codes)] + ["<|begin_of_image|>", "<|end_of_image|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=len(vision) + 400, special_tokens=vision,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(_CORPUS_WORDS.split(". "), trainer=trainer)
    specials = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|image|>", "<sop>", "<eop>"]
    bpe.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|begin_of_image|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", chat_template=_GLM_CHAT_TEMPLATE,
        extra_special_tokens={"image_token": "<|image|>", "grid_bos_token": "<sop>",
                              "grid_eos_token": "<eop>"},
    )


def build_glm_image():
    import torch
    from diffusers import GlmImagePipeline, GlmImageTransformer2DModel
    from transformers import (
        ByT5Tokenizer,
        GlmImageConfig,
        GlmImageForConditionalGeneration,
        GlmImageImageProcessor,
        GlmImageProcessor,
    )

    codes = 64
    tok = build_glm_tokenizer(codes)
    ids = tok.convert_tokens_to_ids
    processor = GlmImageProcessor(image_processor=GlmImageImageProcessor(), tokenizer=tok,
                                  chat_template=_GLM_CHAT_TEMPLATE)
    config = GlmImageConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         vision_vocab_size=codes + 2, pad_token_id=ids("<|endoftext|>"),
                         eos_token_id=ids("<|endoftext|>"),
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64,
                           patch_size=16, image_size=512),
        vq_config=dict(embed_dim=16, num_embeddings=codes, latent_channels=32),
        image_token_id=ids("<|image|>"), image_start_token_id=ids("<|begin_of_image|>"),
        image_end_token_id=ids("<|end_of_image|>"),
    )
    torch.manual_seed(0)
    prior = GlmImageForConditionalGeneration(config).eval()
    glyph_tok = ByT5Tokenizer()
    glyph_encoder = _t5_encoder(glyph_tok, 32, seed=3)
    torch.manual_seed(1)
    transformer = GlmImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=16, num_layers=1, attention_head_dim=16,
        num_attention_heads=2, text_embed_dim=32, time_embed_dim=32, condition_dim=16,
        prior_vq_quantizer_codebook_size=codes + 2,
    )
    return GlmImagePipeline(tokenizer=glyph_tok, processor=processor, text_encoder=glyph_encoder,
                            vision_language_encoder=prior,
                            # GLM-Image's VAE normalises latents per channel (mean/std).
                            vae=_flux_vae(latents_mean=[0.1 * (i % 4) for i in range(16)],
                                          latents_std=[1.0 + 0.1 * (i % 3) for i in range(16)]),
                            transformer=transformer, scheduler=_flow_scheduler())


# -- Wan 2.2 (video) -------------------------------------------------------------------------------
# The serving defaults the tiny checkpoints carry (``generation_config.json``, read by
# models/wan.py): small enough that a request, and a server's warm-up, take about a second.
WAN_TINY_DEFAULTS = dict(width=64, height=64, num_frames=5, num_inference_steps=2)


def _umt5_encoder(tokenizer, width: int = 32, seed: int = 0):
    import torch
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(vocab_size=len(tokenizer), d_model=width, d_ff=width * 2, d_kv=width // 4,
                        num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                        decoder_start_token_id=0, pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return UMT5EncoderModel(config).eval()


def _wan_transformer(in_channels: int, out_channels: int, seed: int):
    import torch
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
        in_channels=in_channels, out_channels=out_channels, text_dim=32, freq_dim=32, ffn_dim=64,
        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    )


def _wan_vae(wan22: bool = False, seed: int = 2):
    """Wan2.1's VAE (z 16, 8x spatial, 4x temporal: the A14B models), or Wan2.2's (z 48, pixels
    packed 2x2 first, residual blocks, 16x spatial: TI2V-5B), at toy widths."""
    import torch
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    if not wan22:
        return AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                temperal_downsample=[False, True, True])
    return AutoencoderKLWan(
        base_dim=8, decoder_base_dim=12, z_dim=48, in_channels=12, out_channels=12,
        is_residual=True, patch_size=2, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
        scale_factor_spatial=16, scale_factor_temporal=4, temperal_downsample=[False, True, True],
        latents_mean=[0.05 * (i % 5) - 0.1 for i in range(48)],
        latents_std=[0.8 + 0.05 * (i % 7) for i in range(48)],
    )


def _wan_scheduler(flow_shift: float):
    """UniPC in flow-matching mode with a static shift, as every Wan2.2 checkpoint ships it."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                   flow_shift=flow_shift, num_train_timesteps=1000)


def build_wan22(kind: str):
    """``t2v``: Wan2.2-T2V-A14B (a high-noise ``transformer`` and a low-noise ``transformer_2``,
    switched at boundary_ratio 0.875); ``i2v``: I2V-A14B (the same with the image's latents and
    mask joined to the noise, in_channels 36, boundary 0.9, no CLIP image encoder);
    ``ti2v``: TI2V-5B (one transformer on the 48-channel Wan2.2 VAE, per-token timesteps).
    Flow shifts are the Wan team's sample_shift for each (12, 5, 5)."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    tokenizer = build_t5_tokenizer()
    parts = dict(tokenizer=tokenizer, text_encoder=_umt5_encoder(tokenizer))
    if kind == "ti2v":
        return WanPipeline(**parts, vae=_wan_vae(wan22=True), scheduler=_wan_scheduler(5.0),
                           transformer=_wan_transformer(48, 48, seed=1), transformer_2=None,
                           boundary_ratio=None, expand_timesteps=True)
    in_channels = 36 if kind == "i2v" else 16
    experts = dict(transformer=_wan_transformer(in_channels, 16, seed=1),
                   transformer_2=_wan_transformer(in_channels, 16, seed=3))
    if kind == "i2v":
        return WanImageToVideoPipeline(**parts, **experts, vae=_wan_vae(),
                                       scheduler=_wan_scheduler(5.0), image_processor=None,
                                       image_encoder=None, boundary_ratio=0.9)
    return WanPipeline(**parts, **experts, vae=_wan_vae(), scheduler=_wan_scheduler(12.0),
                       boundary_ratio=0.875)


# -- Stable Audio Open (audio) -----------------------------------------------------------------
# The tiny VAE hops 32 samples per latent at 16 kHz; 256 latents make the longest clip 0.512 s.
STABLE_AUDIO_TINY_DEFAULTS = dict(audio_end_in_s=0.25, num_inference_steps=4)


def build_stable_audio():
    """Stable Audio Open 1.0's parts at toy widths: a T5 encoder (prompts padded to 128 tokens,
    as the released tokenizer does), the seconds-conditioning projection, a DiT with grouped
    KV heads, a stereo Oobleck VAE and the released scheduler (cosine DPM-Solver, SDE: it draws
    fresh noise each step from a Brownian tree seeded by the request's generator)."""
    import torch
    from diffusers import (
        AutoencoderOobleck,
        CosineDPMSolverMultistepScheduler,
        StableAudioDiTModel,
        StableAudioPipeline,
        StableAudioProjectionModel,
    )

    tokenizer = build_t5_tokenizer()
    tokenizer.model_max_length = 128
    text_encoder = _t5_encoder(tokenizer, width=32, seed=0)
    torch.manual_seed(1)
    transformer = StableAudioDiTModel(
        sample_size=256, in_channels=8, out_channels=8, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, num_key_value_attention_heads=2, cross_attention_dim=32,
        time_proj_dim=16, global_states_input_dim=64, cross_attention_input_dim=32)
    torch.manual_seed(2)
    vae = AutoencoderOobleck(encoder_hidden_size=16, downsampling_ratios=[2, 4, 4],
                             channel_multiples=[1, 2, 4], decoder_channels=16,
                             decoder_input_channels=8, audio_channels=2, sampling_rate=16000)
    torch.manual_seed(3)
    projection = StableAudioProjectionModel(text_encoder_dim=32, conditioning_dim=32,
                                            min_value=0, max_value=512)
    # The released scheduler_config.json's values (sigma 0.3-500, v-prediction, midpoint).
    scheduler = CosineDPMSolverMultistepScheduler(sigma_min=0.3, sigma_max=500, sigma_data=1.0,
                                                  solver_order=2, prediction_type="v_prediction",
                                                  rho=7.0, solver_type="midpoint")
    return StableAudioPipeline(vae=vae, text_encoder=text_encoder, projection_model=projection,
                               tokenizer=tokenizer, transformer=transformer, scheduler=scheduler)


# -- BAGEL (our own modelling, in its published checkpoint layout) ------------------------------
def original_ae_names(vae) -> list[str]:
    """The parameter names of ``vae`` in FLUX's original autoencoder layout (``ae.safetensors``)."""
    chans, blocks = list(vae.config.block_out_channels), vae.config.layers_per_block
    conv = lambda p: [f"{p}.weight", f"{p}.bias"]  # noqa: E731
    def resnet(p, cin, cout):
        names = [n for part in ("norm1", "conv1", "norm2", "conv2") for n in conv(f"{p}.{part}")]
        return names + (conv(f"{p}.nin_shortcut") if cin != cout else [])
    def mid(p, c):
        return (resnet(f"{p}.mid.block_1", c, c) + resnet(f"{p}.mid.block_2", c, c)
                + [n for part in ("norm", "q", "k", "v", "proj_out")
                   for n in conv(f"{p}.mid.attn_1.{part}")])
    names, cin = conv("encoder.conv_in"), chans[0]
    for i, c in enumerate(chans):
        for j in range(blocks):
            names += resnet(f"encoder.down.{i}.block.{j}", cin, c)
            cin = c
        if i < len(chans) - 1:
            names += conv(f"encoder.down.{i}.downsample.conv")
    names += mid("encoder", cin) + conv("encoder.norm_out") + conv("encoder.conv_out")
    names += conv("decoder.conv_in") + mid("decoder", chans[-1])
    cin = chans[-1]
    for i in reversed(range(len(chans))):
        for j in range(blocks + 1):
            names += resnet(f"decoder.up.{i}.block.{j}", cin, chans[i])
            cin = chans[i]
        if i > 0:
            names += conv(f"decoder.up.{i}.upsample.conv")
    return names + conv("decoder.norm_out") + conv("decoder.conv_out")


def original_ae_state(vae) -> dict:
    """``vae``'s weights as ``ae.safetensors`` holds them: diffusers' own single-file converter,
    run on labelled placeholders, tells which original name each diffusers weight comes from."""
    import torch
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    names = original_ae_names(vae)
    labels = convert_ldm_vae_checkpoint({n: torch.tensor([float(i)]) for i, n in enumerate(names)},
                                        dict(vae.config))
    ours = vae.state_dict()
    if set(labels) != set(ours):
        raise RuntimeError(f"layout mismatch: {sorted(set(labels) ^ set(ours))[:4]}")
    state = {}
    for key, label in labels.items():
        name = names[int(label.item())]
        w = ours[key]
        state[name] = w[:, :, None, None] if name.split(".")[-2] in ("q", "k", "v", "proj_out") \
            and name.endswith("weight") else w
    return {k: v.contiguous() for k, v in state.items()}


class BagelCheckpoint:
    """A BAGEL checkpoint directory as ``ByteDance-Seed/BAGEL-7B-MoT`` publishes it."""

    def __init__(self, files: dict, tensors: dict, tokenizer):
        self.files, self.tensors, self.tokenizer = files, tensors, tokenizer

    def save_pretrained(self, out_dir: str, safe_serialization: bool = True) -> None:
        from safetensors.torch import save_file

        os.makedirs(out_dir, exist_ok=True)
        for name, data in self.files.items():
            with open(os.path.join(out_dir, name), "w") as f:
                json.dump(data, f, indent=2)
        for name, state in self.tensors.items():
            save_file(state, os.path.join(out_dir, name))
        self.tokenizer.save_pretrained(out_dir)


def build_bagel():
    """BAGEL-7B-MoT's layout at toy widths: a 2-layer Mixture-of-Transformers Qwen2 (hidden 64),
    a 2-layer SigLIP (BAGEL drops the last: 1 is used), FLUX's autoencoder topology (4 levels,
    32 channels, GroupNorm 32 as in BAGEL's), 8x8-patch position tables (so images up to 128²
    and ViT inputs up to 112²) and a Qwen2 tokenizer with BAGEL's special tokens."""
    import torch
    from transformers import Qwen2Config, SiglipVisionConfig

    from vllm_omni.models.bagel.modeling import Bagel, BagelConfig, sincos_2d

    tokenizer = build_qwen2_tokenizer()
    llm = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, rope_theta=1000000.0, rms_norm_eps=1e-6,
                      tie_word_embeddings=False)
    side = 8
    vit = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, patch_size=14, image_size=side * 14)
    used = SiglipVisionConfig(**{**vit.to_dict(), "num_hidden_layers": 1})
    ids = tokenizer.convert_tokens_to_ids
    torch.manual_seed(0)
    model = Bagel(llm, used, BagelConfig(max_latent_size=side, vit_max_num_patch_per_side=side),
                  ids("<|vision_start|>"), ids("<|vision_end|>"))
    state = dict(model.state_dict())
    state["latent_pos_embed.pos_embed"] = sincos_2d(side, 64)
    state["vit_pos_embed.pos_embed"] = sincos_2d(side, 64)
    state["language_model.lm_head.weight"] = torch.randn(len(tokenizer), 64) * 0.02
    vae = _flux_vae(seed=1, channels=(32,) * 4, groups=32)  # BAGEL's autoencoder: GroupNorm 32
    files = {"llm_config.json": llm.to_diff_dict() | {"architectures": ["Qwen2ForCausalLM"]},
             "vit_config.json": vit.to_diff_dict()}
    tensors = {"ema.safetensors": {k: v.contiguous() for k, v in state.items()},
               "ae.safetensors": original_ae_state(vae)}
    return BagelCheckpoint(files, tensors, tokenizer)


FAMILIES = {
    "qwen-image": lambda: build_qwen_image(QWEN_IMAGE_TINY),
    "qwen-image-bench": lambda: build_qwen_image(QWEN_IMAGE_BENCH),
    # Qwen-Image-2512 is a retrained Qwen-Image: same pipeline and architecture, new weights.
    "qwen-image-2512": lambda: build_qwen_image(QWEN_IMAGE_TINY, seed_offset=10),
    "qwen-image-edit": lambda: build_qwen_image_edit(plus=False),
    "qwen-image-edit-2509": lambda: build_qwen_image_edit(plus=True),
    "qwen-image-layered": build_qwen_image_layered,
    "z-image-turbo": build_z_image,
    "flux.1-dev": build_flux1,
    "flux.2-klein-4b": build_flux2_klein,
    # The undistilled "base" checkpoints: CFG against the empty prompt, two calls per step.
    "flux.2-klein-base-4b": lambda: build_flux2_klein(distilled=False),
    "sd3.5": build_sd35,
    "longcat-image": lambda: build_longcat_image(edit=False),
    "longcat-image-edit": lambda: build_longcat_image(edit=True),
    "ovis-image": build_ovis_image,
    "glm-image": build_glm_image,
    "wan2.2-t2v": lambda: build_wan22("t2v"),
    "wan2.2-i2v": lambda: build_wan22("i2v"),
    "wan2.2-ti2v": lambda: build_wan22("ti2v"),
    "stable-audio": build_stable_audio,
    "bagel": build_bagel,
}
# Serving defaults written beside a family's pipeline (``generation_config.json``): the tiny
# text-to-image models default to 64x64, where their released pipelines' 1024x1024 would make a
# server's warm-up, and a request that names no size, take seconds. Edit models default to their
# input's size.
IMAGE_TINY_DEFAULTS = dict(width=64, height=64)
GENERATION_DEFAULTS = {
    "qwen-image-bench": dict(width=256, height=256),  # the size the benchmarks serve
    **{f: IMAGE_TINY_DEFAULTS for f in ("qwen-image", "qwen-image-2512",
                                        "z-image-turbo", "flux.1-dev", "flux.2-klein-4b",
                                        "flux.2-klein-base-4b", "sd3.5", "longcat-image",
                                        "ovis-image", "glm-image")},
    "wan2.2-t2v": WAN_TINY_DEFAULTS, "wan2.2-i2v": WAN_TINY_DEFAULTS,
    "wan2.2-ti2v": WAN_TINY_DEFAULTS, "stable-audio": STABLE_AUDIO_TINY_DEFAULTS}
# BAGEL's published directory has a generation_config.json of its own (its language model's):
# the tiny one serves 64x64 by its size limits alone (8x8 latent patches of 16 pixels: 128²).


# Raised when what a build writes changes (weights, configs, serving defaults), so that an older
# build in the same directory is made again rather than served as if it were current.
BUILD_VERSION = 2


def build(family: str, out_dir: str) -> str:
    """Builds ``family`` into ``out_dir`` (skipped if a complete build is already there)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {sorted(FAMILIES)}")
    marker = os.path.join(out_dir, ".vllm_omni_tiny")
    stamp = f"{family} {BUILD_VERSION}"
    if os.path.exists(marker) and open(marker).read() == stamp:
        return out_dir
    pipe = FAMILIES[family]()
    pipe.save_pretrained(out_dir, safe_serialization=True)
    if family in GENERATION_DEFAULTS:
        with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
            json.dump(GENERATION_DEFAULTS[family], f, indent=2)
    with open(marker, "w") as f:
        f.write(stamp)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("family", choices=sorted(FAMILIES))
    parser.add_argument("out_dir")
    args = parser.parse_args(argv)
    print(build(args.family, args.out_dir))


if __name__ == "__main__":
    main()
