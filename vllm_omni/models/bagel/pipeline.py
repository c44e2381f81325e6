"""BAGEL as a diffusers pipeline: loading the published checkpoint layout, the prompt contexts,
flow-matching sampling with BAGEL's text and image guidance, and decoding.

The checkpoint directory is ``ByteDance-Seed/BAGEL-7B-MoT`` as published: ``llm_config.json``,
``vit_config.json``, the Qwen2 tokenizer files, ``ema.safetensors`` (everything but the
autoencoder) and ``ae.safetensors`` (FLUX's autoencoder in its original layout, which diffusers'
single-file converter maps onto ``AutoencoderKL``).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from PIL import Image

from vllm_omni.models.bagel.layout import (
    AE_SCALE,
    AE_SHIFT,
    AE_WEIGHTS,
    ae_config,
    UNUSED_WEIGHTS,
    WEIGHTS,
    configs,
    fit_size,
    vae_input_size,
)
from vllm_omni.models.bagel.modeling import EMPTY, Bagel, Context, unpatchify

SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")
RENORM_TYPES = ("global", "channel", "text_channel")
# BAGEL's published settings (its inferencer and demo): text-to-image, then editing.
T2I_DEFAULTS = dict(cfg_img_scale=1.5, cfg_interval=(0.4, 1.0), cfg_renorm_type="global")
EDIT_DEFAULTS = dict(cfg_img_scale=2.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel")


def load_autoencoder(path: str, dtype: torch.dtype) -> AutoencoderKL:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors.torch import load_file

    state = load_file(path)
    config = ae_config({k: tuple(v.shape) for k, v in state.items()})
    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    state = {k: v.to(dtype) for k, v in convert_ldm_vae_checkpoint(state, config).items()}
    vae.load_state_dict(state, strict=True, assign=True)
    return vae.eval()


def load_bagel(model_dir: str, dtype: torch.dtype) -> "BagelPipeline":
    from safetensors.torch import load_file
    from transformers import AutoTokenizer
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    llm, vit, config = configs(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:  # what BAGEL's own loader does for a plain Qwen2 tokenizer
        tokenizer.add_tokens(missing)
    ids = tokenizer.convert_tokens_to_ids
    with torch.device("meta"):
        model = Bagel(llm, vit, config, ids("<|vision_start|>"), ids("<|vision_end|>"))
    state = {k: v for k, v in load_file(os.path.join(model_dir, WEIGHTS)).items()
             if k not in UNUSED_WEIGHTS}
    expected = set(model.state_dict())
    if set(state) != expected:
        extra, lost = sorted(set(state) - expected), sorted(expected - set(state))
        raise ValueError(f"{model_dir}/{WEIGHTS} does not match BAGEL's layout: unexpected "
                         f"{extra[:5]}, missing {lost[:5]}")
    model.load_state_dict(state, strict=True, assign=True)
    model = model.to(dtype).eval()
    # The RoPE frequencies are a computed buffer, not a weight: made for real, after the cast
    # (in bf16 they would be rounded).
    model.language_model.model.rotary_emb = Qwen2RotaryEmbedding(config=llm)
    vae = load_autoencoder(os.path.join(model_dir, AE_WEIGHTS), dtype)
    return BagelPipeline(transformer=model, vae=vae, tokenizer=tokenizer,
                         max_prompt_tokens=llm.max_position_embeddings)


def _resized(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    return image if image.size == size else image.resize(size, Image.BICUBIC)


def guide(v, v_text, v_img, text_scale: float, img_scale: float, renorm_type: str,
          renorm_min: float) -> torch.Tensor:
    """BAGEL's guidance of one image's velocity ``v`` [tokens, dim]: text guidance against the
    prompt-less branch, then image guidance against the image-less one (``v_img``; None: no
    image guidance), rescaled so that its norm (of the whole image, per token, or of the text
    step alone) does not grow, but shrinks at most to ``renorm_min`` of it."""
    def rescale(x, ref, dims):
        ratio = ref.norm(dim=dims, keepdim=True) / (x.norm(dim=dims, keepdim=True) + 1e-8)
        return x * ratio.clamp(min=renorm_min, max=1.0)

    text = v_text + text_scale * (v - v_text)
    if renorm_type == "text_channel":
        text = rescale(text, v, -1)
        return text if v_img is None else v_img + img_scale * (text - v_img)
    out = text if v_img is None else v_img + img_scale * (text - v_img)
    return rescale(out, v, (-2, -1) if renorm_type == "global" else -1)


class BagelPipeline(DiffusionPipeline):
    """Text-to-image and image editing with BAGEL. ``transformer`` is the whole ``Bagel``
    network; the prompt (and input image) are encoded once into key/value contexts, which every
    denoising step attends to."""

    model_cpu_offload_seq = "transformer->vae"

    def __init__(self, transformer: Bagel, vae: AutoencoderKL, tokenizer,
                 max_prompt_tokens: int = 32768):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, tokenizer=tokenizer)
        self.tokenizer_max_length = max_prompt_tokens
        self.image_processor = VaeImageProcessor(vae_scale_factor=transformer.config.vae_downsample)

    # -- input sizes -----------------------------------------------------------------------------
    def vae_input(self, image: Image.Image) -> Image.Image:
        """An edit input at the size the autoencoder sees it (and the default output size)."""
        return _resized(image.convert("RGB"),
                        vae_input_size(self.transformer.config, *image.size))

    def vit_input(self, image: Image.Image) -> Image.Image:
        """The (already autoencoder-sized) input at the size SigLIP sees it: 980 px at most."""
        t = self.transformer
        side = t.config.vit_max_num_patch_per_side * t.vit_patch_size
        return _resized(image, fit_size(*image.size, side, min(224, side), t.vit_patch_size))

    # -- contexts ---------------------------------------------------------------------------------
    def prompt_ids(self, text: str) -> list[int]:
        ids = self.tokenizer.convert_tokens_to_ids
        return [ids("<|im_start|>"), *self.tokenizer(text, add_special_tokens=False).input_ids,
                ids("<|im_end|>")]

    def _pixels(self, image: Image.Image) -> torch.Tensor:
        """[1, 3, H, W] in [-1, 1] (the image processor would round sizes to the VAE's 8)."""
        x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32))
        x = x.permute(2, 0, 1)[None] / 127.5 - 1.0
        return x.to(self._execution_device, self.transformer.dtype)

    def encode_image(self, image: Image.Image, generator) -> torch.Tensor:
        posterior = self.vae.encode(self._pixels(image).to(self.vae.dtype)).latent_dist
        z = posterior.sample(generator=generator)
        return ((z - AE_SHIFT) * AE_SCALE)[0].to(self.transformer.dtype)

    def contexts(self, prompt: str, image: Image.Image | None,
                 generator=None) -> tuple[Context, Context, Context]:
        """(with everything, without the prompt, without the image) for one request. Without an
        image the last is the first itself: image guidance then compares against it."""
        model, ids = self.transformer, self.prompt_ids(prompt)
        if image is None:
            cond = model.add_text(EMPTY, ids)
            return cond, EMPTY, cond
        image = self.vae_input(image)
        base = model.add_vae_image(EMPTY, self.encode_image(image, generator))
        base = model.add_vit_image(base, self._pixels(self.vit_input(image))[0])
        return model.add_text(base, ids), base, model.add_text(EMPTY, ids)

    # -- sampling ---------------------------------------------------------------------------------
    @staticmethod
    def timesteps(steps: int, shift: float) -> torch.Tensor:
        """From 1 (noise) to 0 in ``steps`` steps, shifted towards the noisy end."""
        t = torch.linspace(1, 0, steps + 1)
        return shift * t / (1 + (shift - 1) * t)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], image=None, height: int | None = None,
                 width: int | None = None, num_inference_steps: int = 50,
                 num_images_per_prompt: int = 1, cfg_text_scale: float = 4.0,
                 cfg_img_scale: float | None = None, cfg_interval=None,
                 cfg_renorm_min: float = 0.0, cfg_renorm_type: str | None = None,
                 timestep_shift: float = 3.0, generator=None, output_type: str = "pil",
                 callback_on_step_end=None, return_dict: bool = True):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        images = [None] * len(prompts) if image is None else \
            list(image) if isinstance(image, (list, tuple)) else [image]
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} input images for {len(prompts)} prompts")
        defaults = T2I_DEFAULTS if images[0] is None else EDIT_DEFAULTS
        img_scale = defaults["cfg_img_scale"] if cfg_img_scale is None else cfg_img_scale
        lo, hi = defaults["cfg_interval"] if cfg_interval is None else cfg_interval
        renorm = cfg_renorm_type or defaults["cfg_renorm_type"]
        if renorm not in RENORM_TYPES:
            raise ValueError(f"cfg_renorm_type must be one of {RENORM_TYPES}")
        n = num_images_per_prompt
        generators = generator if isinstance(generator, list) else [generator] * len(prompts) * n
        if images[0] is not None and (height is None or width is None):
            width, height = self.vae_input(images[0]).size
        cfg = self.transformer.config
        h, w = height // cfg.latent_downsample, width // cfg.latent_downsample
        device, dtype = self._execution_device, self.transformer.dtype

        contexts = [self.contexts(p, im, generators[i * n]) for i, (p, im) in
                    enumerate(zip(prompts, images))]
        dim = cfg.latent_patch_size ** 2 * cfg.latent_channels
        # The latents integrate in float32 whatever the model's dtype (as BAGEL does): 50 Euler
        # steps in bf16 would round away the small late updates.
        x = torch.stack([torch.randn(h * w, dim, generator=g, dtype=torch.float32)
                         for g in generators]).to(device)
        t = self.timesteps(num_inference_steps, timestep_shift)
        for step in range(num_inference_steps):
            ti = float(t[step])
            guided = lo < ti <= hi and cfg_text_scale > 1.0
            seqs, index = [], []  # index[j]: image j's (cond, text, img) sequence numbers
            for j in range(x.shape[0]):
                cond, no_text, no_img = contexts[j // n]
                row = [len(seqs), None, None]
                seqs.append((cond, j))
                if guided:
                    row[1] = len(seqs)
                    seqs.append((no_text, j))
                    if img_scale > 1.0 and no_img is not cond:
                        row[2] = len(seqs)
                        seqs.append((no_img, j))
                    elif img_scale > 1.0:
                        row[2] = row[0]
                index.append(row)
            v = self.transformer(x.to(dtype), ti, [c for c, _ in seqs], [j for _, j in seqs], h,
                                 w)
            if guided:
                v = torch.stack([guide(v[a].float(), v[b].float(),
                                       None if c is None else v[c].float(), cfg_text_scale,
                                       img_scale, renorm, cfg_renorm_min) for a, b, c in index])
            x = x - v.float() * (ti - float(t[step + 1]))
            if callback_on_step_end is not None:
                out = callback_on_step_end(self, step, ti, {"latents": x})
                x = (out or {}).get("latents", x)

        if output_type == "latent":
            images_out = x
        else:
            z = torch.stack([unpatchify(xi, h, w, cfg.latent_patch_size) for xi in x])
            decoded = self.vae.decode((z / AE_SCALE + AE_SHIFT).to(self.vae.dtype)).sample
            images_out = self.image_processor.postprocess(decoded.float(), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images_out,)
        return ImagePipelineOutput(images=images_out)
