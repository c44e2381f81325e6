"""Offline ``Omni`` drives the real engine and equals a direct diffusers call pixel for pixel."""

import numpy as np
import pytest
import torch

from vllm_omni import OmniDiffusionSamplingParams


def diffusers_images(pipe, prompt, seed, n=1, **kw):
    gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    return pipe(prompt, generator=gens, num_images_per_prompt=n, **kw).images


def test_parity_with_diffusers(omni, diffusers_pipe):
    params = OmniDiffusionSamplingParams(num_inference_steps=4, width=64, height=64, seed=7)
    [out] = omni.generate("a red fox", params, use_tqdm=False)
    [ref] = diffusers_images(diffusers_pipe, "a red fox", 7, height=64, width=64,
                             num_inference_steps=4)
    assert out.images[0].size == (64, 64)
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(ref))


def test_parity_true_cfg_non_square_multiple_images(omni, diffusers_pipe):
    params = OmniDiffusionSamplingParams(num_inference_steps=3, width=96, height=64, seed=11,
                                         true_cfg_scale=4.0, num_images_per_prompt=2)
    [out] = omni.generate({"prompt": "a blue cat", "negative_prompt": "blurry"}, params,
                          use_tqdm=False)
    refs = diffusers_images(diffusers_pipe, "a blue cat", 11, n=2, negative_prompt="blurry",
                            true_cfg_scale=4.0, height=64, width=96, num_inference_steps=3)
    assert [im.size for im in out.images] == [(96, 64), (96, 64)]
    for a, b in zip(out.images, refs):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # Per-image generators: the two images of one request differ.
    assert not np.array_equal(np.asarray(out.images[0]), np.asarray(out.images[1]))


def test_batch_of_prompts_keeps_order_and_seeds(omni):
    p = OmniDiffusionSamplingParams(num_inference_steps=2, width=32, height=32, seed=3)
    outs = omni.generate(["a red fox", "a blue cat", "a red fox"], p, use_tqdm=False)
    assert [o.prompt for o in outs] == ["a red fox", "a blue cat", "a red fox"]
    a, b, c = (np.asarray(o.images[0]) for o in outs)
    assert np.array_equal(a, c) and not np.array_equal(a, b)


def test_unseeded_requests_differ(omni):
    p = OmniDiffusionSamplingParams(num_inference_steps=2, width=32, height=32)
    x, y = omni.generate(["a red fox", "a red fox"], p, use_tqdm=False)
    assert x.seed != y.seed
    assert not np.array_equal(np.asarray(x.images[0]), np.asarray(y.images[0]))


def test_progress_bar_counts_steps(omni, capsys):
    p = OmniDiffusionSamplingParams(num_inference_steps=3, width=32, height=32, seed=1)
    omni.generate(["a", "b"], p, use_tqdm=True)
    assert "6/6" in capsys.readouterr().err


@pytest.mark.parametrize("params, match", [
    (dict(width=65, height=64), "multiple of 16"),
    (dict(guidance_scale=3.5), "not guidance-distilled"),
    (dict(num_frames=5), "num_frames is not supported"),
    (dict(negative_prompt="x", true_cfg_scale=1.0), "no effect unless true_cfg_scale > 1"),
])
def test_invalid_params_are_rejected(omni, params, match):
    with pytest.raises(ValueError, match=match):
        omni.generate("a red fox", OmniDiffusionSamplingParams(num_inference_steps=2, **params))


def test_sampling_params_validate_types():
    with pytest.raises(ValueError, match="num_inference_steps"):
        OmniDiffusionSamplingParams(num_inference_steps=0)
    with pytest.raises(ValueError, match="seed"):
        OmniDiffusionSamplingParams(seed=-1)
    with pytest.raises(ValueError, match="width must be an integer"):
        OmniDiffusionSamplingParams(width="64")


def test_too_long_prompt_is_rejected_not_truncated(omni):
    with pytest.raises(ValueError, match="accepts at most 1024"):
        omni.generate("fox " * 1100, OmniDiffusionSamplingParams(num_inference_steps=2,
                                                                 width=32, height=32))


def test_unimplemented_features_fail_loudly(tiny_qwen_image):
    from vllm_omni import Omni

    with pytest.raises(ValueError, match=r"lora_path \(--lora-path\): .* does not exist"):
        Omni(model=tiny_qwen_image, lora_path="/nonexistent/lora")
    with pytest.raises(ValueError, match="cache_backend must be one of"):
        Omni(model=tiny_qwen_image, cache_backend="magic")
