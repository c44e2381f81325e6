"""Deterministic random LoRA adapters for the tiny models, in diffusers' format.

    python -m vllm_omni.testing.tiny_lora FAMILY OUT.safetensors [--rank 4] [--seed 0]

The adapter targets the attention projections (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) of
the family's transformer (both experts of Wan2.2 A14B load it; BAGEL: its generation expert's
``*_proj_moe_gen``), with random A and B matrices
large enough to change the output visibly. Keys are diffusers' (``transformer.<module>.lora_A
.weight``), as ``save_lora_weights`` writes them.
"""

from __future__ import annotations

import argparse

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# BAGEL's image generation runs through its generation expert: an image LoRA adapts those.
BAGEL_TARGETS = ["q_proj_moe_gen", "k_proj_moe_gen", "v_proj_moe_gen", "o_proj_moe_gen"]


def build(family: str, out_path: str, rank: int = 4, seed: int = 0) -> str:
    """A LoRA for ``family``'s tiny transformer (or, given a pipeline directory, for its
    transformer) written to ``out_path``."""
    import os

    import tempfile

    from vllm_omni.models.bagel.layout import is_bagel_dir
    from vllm_omni.testing.tiny_models import FAMILIES

    if family == "bagel" or os.path.isdir(family) and is_bagel_dir(family):
        import torch

        from vllm_omni.models.bagel.pipeline import load_bagel
        from vllm_omni.testing.tiny_models import build as build_model

        with tempfile.TemporaryDirectory() as tmp:  # the weights are in memory once loaded
            model_dir = family if os.path.isdir(family) else build_model(
                "bagel", os.path.join(tmp, "bagel"))
            transformer = load_bagel(model_dir, torch.float32).transformer
        return for_transformer(transformer, out_path, rank, seed, BAGEL_TARGETS)
    if os.path.isdir(family):
        from diffusers import DiffusionPipeline

        transformer = DiffusionPipeline.from_pretrained(family).transformer
    elif family in FAMILIES:
        transformer = FAMILIES[family]().transformer
    else:
        raise ValueError(f"unknown family {family!r}; choose one of {sorted(FAMILIES)}")
    return for_transformer(transformer, out_path, rank, seed)


def for_transformer(transformer, out_path: str, rank: int = 4, seed: int = 0,
                    targets: list[str] = TARGETS) -> str:
    import torch
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file

    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False)
    inject_adapter_in_model(config, transformer, adapter_name="default")
    state = get_peft_model_state_dict(transformer, adapter_name="default")
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, value in sorted(state.items()):
        # 1/sqrt(fan-in) for A and B: the delta moves outputs by about as much as the layer.
        w = torch.randn(value.shape, generator=gen) / value.shape[1] ** 0.5
        tensors[f"transformer.{key}"] = w.to(torch.float32).contiguous()
    save_file(tensors, out_path, metadata={"format": "pt"})
    return out_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("family", help="a tiny family, or a pipeline directory")
    parser.add_argument("out")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build(args.family, args.out, args.rank, args.seed))


if __name__ == "__main__":
    main()
