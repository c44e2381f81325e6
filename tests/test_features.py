"""Every feature comes off exactly: after apply and remove the pipeline's weights are bitwise those
it loaded with, and its transformer and VAE compute bitwise the same outputs."""

import pytest
import torch

from test_parallel import _transformer_inputs
from vllm_omni.diffusion.data import DiffusionParallelConfig, OmniEngineConfig
from vllm_omni.testing.dist import run_ranks


def _wan_inputs(model) -> dict:
    """A 2-frame latent video (12 tokens a frame) and an odd-length prompt for a Wan expert."""
    g, cfg = torch.Generator().manual_seed(1), model.config
    return dict(hidden_states=torch.randn(1, cfg.in_channels, 2, 6, 4, generator=g),
                timestep=torch.tensor([700.0]),
                encoder_hidden_states=torch.randn(1, 7, cfg.text_dim, generator=g),
                return_dict=False)


def _denoisers(pipe) -> list[str]:
    return [n for n in ("transformer", "transformer_2") if getattr(pipe, n, None) is not None]


def _outputs(pipe) -> dict[str, torch.Tensor]:
    z = torch.randn(1, pipe.vae.config.z_dim, 1, 40, 6, generator=torch.Generator().manual_seed(2))
    inputs = _wan_inputs if "Wan" in type(pipe).__name__ else _transformer_inputs
    with torch.inference_mode():
        out = {n: getattr(pipe, n)(**inputs(getattr(pipe, n)))[0] for n in _denoisers(pipe)}
        return {**out, "vae": pipe.vae.decode(z).sample}


def _state(pipe) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.clone() for name in (*_denoisers(pipe), "vae")
            for k, v in getattr(pipe, name).state_dict().items()}


def _apply_and_remove(model_dir: str, groups, **config) -> list[str]:
    """Applies the features ``config`` asks for, runs the model, removes them, and checks the
    model is what it was; returns the names of the features it applied."""
    from diffusers import DiffusionPipeline

    from vllm_omni.features import build_features
    from vllm_omni.models.registry import load_model_spec

    pipe = DiffusionPipeline.from_pretrained(model_dir)
    spec = load_model_spec(model_dir)
    config = OmniEngineConfig(model=model_dir, model_name=model_dir, device="cpu", **config)
    before, want = _state(pipe), _outputs(pipe)
    features = build_features(spec.adapter, config)
    for f in features:
        f.apply(pipe, groups)
        f.begin_request(2, uses_cfg=False)
    _outputs(pipe)  # the features run
    for f in reversed(features):
        f.remove()
    after, got = _state(pipe), _outputs(pipe)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    for k in want:
        assert torch.equal(want[k], got[k]), k
    return [f.name for f in features]


@pytest.mark.parametrize("backend", ["tea_cache", "cache_dit"])
def test_cache_removes_exactly(tiny_qwen_image, backend):
    from vllm_omni.distributed.groups import ParallelGroups

    cache_config = {"rel_l1_thresh": 0.3} if backend == "tea_cache" else {}
    assert _apply_and_remove(tiny_qwen_image, ParallelGroups.single(), cache_backend=backend,
                             cache_config=cache_config) == [backend]


def _rank(rank, world, model_dir, parallel):
    from vllm_omni.distributed.groups import torch_groups

    parallel = DiffusionParallelConfig(**parallel)
    return _apply_and_remove(model_dir, torch_groups(parallel.layout), parallel=parallel)


@pytest.mark.parametrize("parallel, name", [
    (dict(tensor_parallel_size=2), "tensor_parallel"),
    (dict(ulysses_degree=2), "sequence_parallel"),
    (dict(cfg_parallel_size=2), "cfg_parallel"),
    (dict(vae_patch_parallel_size=2), "vae_patch_parallel"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_parallel_removes_exactly(tiny_qwen_image, parallel, name):
    assert run_ranks(_rank, 2, tiny_qwen_image, parallel) == [[name]] * 2


def test_wan_parallel_features_remove_exactly_from_both_experts(video_models):
    """Wan2.2 T2V-A14B: tensor parallelism (with its sharded query/key norms), Ulysses and
    CFG-parallel on both experts come off bitwise."""
    parallel = dict(tensor_parallel_size=2)
    assert run_ranks(_rank, 2, video_models["wan2.2-t2v"], parallel) == [["tensor_parallel"]] * 2
    for parallel in (dict(ulysses_degree=2), dict(cfg_parallel_size=2)):
        run_ranks(_rank, 2, video_models["wan2.2-t2v"], parallel)


def test_tensor_parallel_shards_packed_layers_block_by_block(tiny_models):
    """FLUX's single-stream ``proj_out`` reads cat([attention, MLP]) (diffusers' packed style):
    each rank keeps its slice of each block, ``shard_weight`` cuts any tensor laid out like the
    weight (a LoRA delta, FP8 scales) the same way, and ``restore`` brings back every weight."""
    assert run_ranks(_flux_rank, 2, tiny_models["flux.1-dev"]) == [True] * 2


def _flux_rank(rank, world, model_dir):
    from diffusers import FluxTransformer2DModel

    from vllm_omni.distributed.groups import torch_groups
    from vllm_omni.distributed.layout import RankLayout
    from vllm_omni.distributed.tensor_parallel import (
        RowParallelLinear,
        apply_tensor_parallel,
        restore,
    )

    model = FluxTransformer2DModel.from_pretrained(model_dir, subfolder="transformer")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    block = model.single_transformer_blocks[0]
    attn = block.attn.inner_dim
    full, x = block.proj_out.weight.clone(), torch.randn(3, block.proj_out.in_features)
    with torch.inference_mode():
        want = block.proj_out(x)
    replaced = apply_tensor_parallel(model, type(model)._tp_plan, torch_groups(RankLayout(tp=2)).tp)
    layer = block.proj_out
    assert isinstance(layer, RowParallelLinear)
    blocks = [attn, full.shape[1] - attn]
    mine = torch.cat([part.chunk(2, 1)[rank] for part in full.split(blocks, 1)], 1)
    assert torch.equal(layer.weight, mine) and torch.equal(layer.shard_weight(full, 1), mine)
    with torch.inference_mode():  # the layer reads its slice of each input block, then reduces
        got = layer(torch.cat([h.chunk(2, 1)[rank] for h in x.split(blocks, 1)], 1))
    assert (got - want).abs().max() < 1e-5
    restore(replaced)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    return type(block.proj_out) is torch.nn.Linear


def test_features_apply_to_every_denoiser_the_plan_names(tiny_qwen_image):
    """A two-stage pipeline (Wan2.2 A14B: ``transformer`` and ``transformer_2``) gets each
    feature on both denoisers, and loses it from both."""
    import dataclasses
    from types import SimpleNamespace

    from diffusers import QwenImageTransformer2DModel
    from diffusers.hooks import HookRegistry

    from vllm_omni.cache.teacache import HEAD_HOOK
    from vllm_omni.distributed.groups import ParallelGroups
    from vllm_omni.features import build_features
    from vllm_omni.models.registry import load_model_spec

    models = [QwenImageTransformer2DModel.from_pretrained(tiny_qwen_image, subfolder="transformer")
              for _ in range(2)]
    pipe = SimpleNamespace(transformer=models[0], transformer_2=models[1])
    spec = load_model_spec(tiny_qwen_image)
    config = OmniEngineConfig(model=tiny_qwen_image, model_name=tiny_qwen_image, device="cpu",
                              cache_backend="tea_cache")
    [feature] = build_features(spec.adapter, config)
    feature.plan = dataclasses.replace(feature.plan, denoisers=("transformer", "transformer_2"))
    feature.apply(pipe, ParallelGroups.single())

    def hooked(model):
        return HEAD_HOOK in HookRegistry.check_if_exists_or_initialize(
            model.transformer_blocks[0]).hooks

    assert [hooked(m) for m in models] == [True, True] and len(feature.caches) == 2
    feature.remove()
    assert [hooked(m) for m in models] == [False, False]
