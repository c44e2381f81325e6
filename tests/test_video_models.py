"""Wan 2.2 video models, built tiny: offline generation equals a direct diffusers call exactly
(every frame; each video of a request has its own seed), and the request checks every video model shares (frame counts, sizes,
the image of image-to-video, the second expert's CFG scale) refuse with the field named.

Each case writes out by hand what a diffusers user would pass for the same request (the released
models' CFG defaults included), so the adapter's mapping is what is being checked.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import VIDEO_FAMILIES
from vllm_omni.engine.errors import InvalidRequestError

# 3 steps: the last one is below both A14B boundaries, so the low-noise expert (transformer_2)
# runs too (timesteps 999, 960, 857 for T2V's boundary 875; 999, 909, 714 for I2V's 900).
SEED, STEPS, PROMPT = 7, 3, "a red fox in the snow"
IMAGE = Image.fromarray((np.random.RandomState(1).rand(48, 64, 3) * 255).astype("uint8"))


def _prompt(family: str, image: Image.Image | None = IMAGE) -> Any:
    if family == "wan2.2-i2v" and image is not None:
        return {"prompt": PROMPT, "multi_modal_data": {"image": image}}
    return PROMPT


# family -> (sampling params, the same request in diffusers, frames' (width, height), fps)
CASES = {
    "wan2.2-t2v": (dict(width=64, height=32, negative_prompt="blurry", guidance_scale_2=2.0),
                   dict(width=64, height=32, negative_prompt="blurry", guidance_scale=4.0,
                        guidance_scale_2=2.0), (64, 32), 16.0),
    # No size: the image's aspect ratio at the model's default area (64x64) -> 80x48.
    "wan2.2-i2v": (dict(fps=8.0), dict(image=IMAGE, width=80, height=48, guidance_scale=3.5,
                                       guidance_scale_2=3.5), (80, 48), 8.0),
    "wan2.2-ti2v": (dict(width=96, height=64, guidance_scale=2.5),
                    dict(width=96, height=64, guidance_scale=2.5), (96, 64), 24.0),
}


@pytest.fixture(scope="module")
def engines(video_models):
    from vllm_omni import Omni

    opened = {f: Omni(model=d) for f, d in video_models.items()}
    yield opened
    for omni in opened.values():
        omni.close()


def _generate(omni, family: str, output_type: str = "pil", **params):
    from vllm_omni.inputs.data import OmniDiffusionSamplingParams

    params = {**CASES[family][0], "num_frames": 5, "seed": SEED, "num_inference_steps": STEPS,
              "output_type": output_type, **params}
    return omni.generate(_prompt(family), OmniDiffusionSamplingParams(**params),
                         use_tqdm=False)[0]


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_offline_equals_diffusers(family, video_models, engines):
    from diffusers import DiffusionPipeline

    _, call, size, fps = CASES[family]
    pipe = DiffusionPipeline.from_pretrained(video_models[family])
    pipe.set_progress_bar_config(disable=True)
    for output_type in ("pil", "np"):
        want = pipe(prompt=PROMPT, num_frames=5, num_inference_steps=STEPS,
                    generator=torch.Generator("cpu").manual_seed(SEED), output_type=output_type,
                    **call).frames[0]
        out = _generate(engines[family], family, output_type)
        assert out.images == [] and len(out.videos) == 1
        video = out.videos[0]
        assert video.fps == fps and len(video.frames) == len(want) == 5
        for got, w in zip(video.frames, want):
            if output_type == "pil":
                assert got.size == size
            np.testing.assert_array_equal(np.asarray(got), np.asarray(w))


def test_guidance_scale_2_scales_the_low_noise_steps(engines):
    """guidance_scale sets the high-noise expert's CFG (the early steps), guidance_scale_2 the
    low-noise expert's (here only the last step): changing either changes the video."""
    def frames(**params):
        out = _generate(engines["wan2.2-t2v"], "wan2.2-t2v", "np", **params)
        return np.stack(out.videos[0].frames)

    base = frames()  # guidance_scale 4.0 (the default), guidance_scale_2 2.0
    assert not np.array_equal(base, frames(guidance_scale_2=6.0))
    assert not np.array_equal(base, frames(guidance_scale=6.0))


def test_each_video_of_a_request_has_its_own_seed(video_models, engines):
    """n videos per prompt: video i is what seed + i gives alone (up to float rounding: a batch
    of two runs other matrix shapes than one)."""
    out = _generate(engines["wan2.2-t2v"], "wan2.2-t2v", "np", num_images_per_prompt=2)
    second = _generate(engines["wan2.2-t2v"], "wan2.2-t2v", "np", seed=SEED + 1)
    assert len(out.videos) == 2
    np.testing.assert_allclose(np.stack(out.videos[1].frames), np.stack(second.videos[0].frames),
                               rtol=0, atol=1e-5)
    assert not np.array_equal(np.stack(out.videos[0].frames), np.stack(out.videos[1].frames))


def _spec(video_models, family):
    from vllm_omni.models.registry import load_model_spec

    return load_model_spec(video_models[family])


def _process(spec, family: str, image: Image.Image | None = IMAGE, **params):
    from vllm_omni.engine.input_processor import InputProcessor
    from vllm_omni.inputs.data import OmniDiffusionSamplingParams

    images = [image] if family == "wan2.2-i2v" and image is not None else []
    return InputProcessor(spec).process(PROMPT, OmniDiffusionSamplingParams(**params),
                                        images=images)


def test_model_facts_and_defaults(video_models):
    t2v, i2v, ti2v = (_spec(video_models, f) for f in VIDEO_FAMILIES)
    # 8x VAE x patch 2 for the A14B models; the Wan2.2 VAE's 16x x patch 2 for TI2V-5B.
    assert (t2v.size_multiple, i2v.size_multiple, ti2v.size_multiple) == (16, 16, 32)
    assert t2v.adapter.parallel_plan().denoisers == ("transformer", "transformer_2")
    assert ti2v.adapter.parallel_plan().denoisers == ("transformer",)
    assert t2v.adapter.task == ti2v.adapter.task == "text-to-video"
    assert i2v.adapter.task == "image-to-video"
    # The checkpoint's generation_config.json sets size, frames and steps; the rest is released.
    req = _process(t2v, "wan2.2-t2v")
    assert (req.width, req.height, req.num_inference_steps) == (64, 64, 2)
    kwargs = t2v.adapter.pipeline_kwargs(req)
    assert (kwargs["num_frames"], kwargs["guidance_scale"], kwargs["guidance_scale_2"]) == \
        (5, 4.0, 3.0)  # high-noise expert 4.0, low-noise 3.0 (Wan2.2-T2V-A14B's)
    assert "fps" not in kwargs and kwargs["num_videos_per_prompt"] == 1
    kwargs = ti2v.adapter.pipeline_kwargs(_process(ti2v, "wan2.2-ti2v"))
    assert kwargs["guidance_scale"] == 5.0 and "guidance_scale_2" not in kwargs
    image = i2v.adapter.pipeline_kwargs(_process(i2v, "wan2.2-i2v"))["image"]
    np.testing.assert_array_equal(np.asarray(image), np.asarray(IMAGE))


@pytest.mark.parametrize("family, frames, nearest", [
    ("wan2.2-t2v", 6, "5 or 9"), ("wan2.2-ti2v", 4, "1 or 5"), ("wan2.2-i2v", 80, "77 or 81")])
def test_bad_frame_count_names_the_nearest(video_models, family, frames, nearest):
    with pytest.raises(InvalidRequestError, match=f"4k\\+1.*nearest: {nearest}") as e:
        _process(_spec(video_models, family), family, num_frames=frames)
    assert e.value.param == "num_frames"


def test_bad_requests_are_refused_naming_the_field(video_models, engines):
    t2v, i2v, ti2v = (_spec(video_models, f) for f in VIDEO_FAMILIES)
    cases = [
        (ti2v, "wan2.2-ti2v", dict(extra_args={"guidance_scale_2": 2.0}), "guidance_scale_2",
         "one transformer"),
        # The negative branch runs only when the high-noise scale exceeds 1.
        (t2v, "wan2.2-t2v", dict(guidance_scale=1.0, extra_args={"guidance_scale_2": 3.0}),
         "guidance_scale_2", "no effect unless guidance_scale > 1"),
        (ti2v, "wan2.2-ti2v", dict(width=48, height=64), "size", "multiple of 32.*32 or 64"),
        (t2v, "wan2.2-t2v", dict(width=40, height=64), "size", "multiple of 16.*32 or 48"),
        (t2v, "wan2.2-t2v", dict(fps=0.5), "fps", "between 1 and 240"),
    ]
    for spec, family, params, param, message in cases:
        with pytest.raises(InvalidRequestError, match=message) as e:
            _process(spec, family, **params)
        assert e.value.param == param, (params, e.value)
    with pytest.raises(InvalidRequestError, match="exactly 1 input image") as e:
        _process(i2v, "wan2.2-i2v", image=None)
    with pytest.raises(InvalidRequestError, match="generates from text alone"):
        from vllm_omni.engine.input_processor import InputProcessor
        from vllm_omni.inputs.data import OmniDiffusionSamplingParams

        InputProcessor(t2v).process(PROMPT, OmniDiffusionSamplingParams(), images=[IMAGE])
    # Offline, the same refusals are ValueErrors from generate.
    from vllm_omni.inputs.data import OmniDiffusionSamplingParams

    with pytest.raises(ValueError, match="exactly 1 input image"):
        engines["wan2.2-i2v"].generate(PROMPT, OmniDiffusionSamplingParams(num_frames=5),
                                       use_tqdm=False)
    with pytest.raises(ValueError, match="nearest: 5 or 9"):
        engines["wan2.2-t2v"].generate(PROMPT, OmniDiffusionSamplingParams(num_frames=7),
                                       use_tqdm=False)


def test_long_prompt_is_refused_not_truncated(engines):
    from vllm_omni.inputs.data import OmniDiffusionSamplingParams

    with pytest.raises(ValueError, match="accepts at most 512") as e:
        engines["wan2.2-ti2v"].generate("fox " * 600, OmniDiffusionSamplingParams(),
                                        use_tqdm=False)
    assert e.value.param == "prompt"


def test_image_models_refuse_video_options(tiny_qwen_image):
    from vllm_omni.models.registry import load_model_spec

    spec = load_model_spec(tiny_qwen_image)
    for params in (dict(num_frames=5), dict(fps=16.0)):
        with pytest.raises(InvalidRequestError) as e:
            _process(spec, "qwen-image", **params)
        assert e.value.code == "unsupported_parameter" and e.value.param in params


def test_memory_estimate_counts_latent_frames_and_one_decoded_chunk(video_models):
    """81 frames are 21 latent frames to the transformer, and the Wan VAE decodes a chunk at a
    time: only the decoded output grows with every frame (counting all 81 frames at once made a
    real 832x480 request look like ~200 GiB)."""
    from vllm_omni.worker import memory
    from vllm_omni.worker.memory import DECODE_OUTPUT_BYTES_PER_PIXEL, DIT_SLACK, TEXT_TOKENS

    spec = _spec(video_models, "wan2.2-t2v")
    dims = memory.ModelDims.from_model_dir(spec.model_dir, spec.adapter, spec, 4)

    def parts(frames):
        req = _process(spec, "wan2.2-t2v", width=832, height=480, num_frames=frames)
        return memory.estimate(dims, spec.adapter, [req], lambda r: True).parts

    short, long = parts(9), parts(81)
    tokens = (832 // 16) * (480 // 16)  # per latent frame
    assert (long["denoise"] - DIT_SLACK) / (short["denoise"] - DIT_SLACK) == pytest.approx(
        (21 * tokens + TEXT_TOKENS) / (3 * tokens + TEXT_TOKENS))
    assert long["decode"] - short["decode"] == pytest.approx(
        72 * 832 * 480 * DECODE_OUTPUT_BYTES_PER_PIXEL, abs=2)


def test_a_cache_dit_step_mask_is_refused_over_two_experts(video_models):
    """Each expert counts its own steps, so a step mask over the request's steps would land on
    the wrong steps of the low-noise expert: refused at start-up, allowed with one transformer."""
    from vllm_omni.diffusion.data import OmniEngineConfig
    from vllm_omni.models.registry import load_model_spec

    def check(family):
        config = OmniEngineConfig(model=video_models[family], model_name=family,
                                  cache_backend="cache_dit",
                                  cache_config={"scm_steps_mask_policy": "fast"})
        load_model_spec(config.model).adapter.check_engine(config)

    with pytest.raises(ValueError, match="runs 2 transformers"):
        check("wan2.2-t2v")
    check("wan2.2-ti2v")


def test_ti2v_animates_an_optional_image(video_models, engines):
    """TI2V-5B with an image runs diffusers' image-to-video pipeline on the same modules, and
    equals that call exactly; without one it stays text-to-video."""
    from diffusers import DiffusionPipeline, WanImageToVideoPipeline

    from vllm_omni.inputs.data import OmniDiffusionSamplingParams

    text = DiffusionPipeline.from_pretrained(video_models["wan2.2-ti2v"])
    pipe = WanImageToVideoPipeline(**text.components, expand_timesteps=True)
    pipe.set_progress_bar_config(disable=True)
    want = pipe(prompt=PROMPT, image=IMAGE, width=64, height=64, num_frames=5,
                num_inference_steps=STEPS, guidance_scale=2.5, output_type="np",
                generator=torch.Generator("cpu").manual_seed(SEED)).frames[0]
    params = OmniDiffusionSamplingParams(width=64, height=64, num_frames=5, seed=SEED,
                                         num_inference_steps=STEPS, guidance_scale=2.5,
                                         output_type="np")
    out = engines["wan2.2-ti2v"].generate(
        {"prompt": PROMPT, "multi_modal_data": {"image": IMAGE}}, params, use_tqdm=False)[0]
    np.testing.assert_array_equal(np.stack(out.videos[0].frames), want)
    text_only = engines["wan2.2-ti2v"].generate(PROMPT, params, use_tqdm=False)[0]
    assert not np.array_equal(np.stack(text_only.videos[0].frames), want)
