"""The batching scheduler: compatible requests run as one pipeline call, with the images each would
get alone; incompatible ones keep FIFO order."""

import numpy as np
import pytest

from vllm_omni.engine.request import DiffusionRequest
from vllm_omni.engine.scheduler import Scheduler


def _req(rid, w=64, steps=4):
    return DiffusionRequest(request_id=rid, prompt="p", negative_prompt=None, width=w, height=64,
                            num_inference_steps=steps, seed=0)


def test_scheduler_batches_by_key_keeps_fifo_and_never_starves_the_head():
    s = Scheduler(max_num_seqs=2, batch_key=lambda r: (r.width, r.num_inference_steps))
    for r in [_req("a"), _req("b", w=48), _req("c"), _req("d"), _req("e", w=48)]:
        s.add(r)
    batches = []
    while s.has_waiting():
        batches.append([r.request_id for r in s.schedule()])
    # The oldest request always leads; compatible later ones join up to the limit.
    assert batches == [["a", "c"], ["b", "e"], ["d"]]
    one = Scheduler(max_num_seqs=4)  # no key: one at a time, in order
    for r in [_req("x"), _req("y")]:
        one.add(r)
    assert [r.request_id for r in one.schedule()] == ["x"]
    # A request its adapter will not batch (key None: input images, a video) runs alone, even
    # beside another such request.
    never = Scheduler(max_num_seqs=4, batch_key=lambda r: None)
    for r in [_req("v"), _req("w")]:
        never.add(r)
    assert [r.request_id for r in never.schedule()] == ["v"]
    # The engine's key adds each request's LoRA adapters: different sets never share a call.
    from types import SimpleNamespace

    from vllm_omni.engine.core import batch_key

    adapter = SimpleNamespace(batch_key=lambda r: (r.width,))
    with_lora = Scheduler(max_num_seqs=4, batch_key=lambda r: batch_key(adapter, r))
    reqs = [_req("l1"), _req("l2"), _req("l3")]
    reqs[1].loras = ("an adapter",)
    for r in reqs:
        with_lora.add(r)
    assert [r.request_id for r in with_lora.schedule()] == ["l1", "l3"]


def test_batched_images_equal_each_request_alone(tiny_qwen_image, omni):
    from vllm_omni import Omni, OmniDiffusionSamplingParams

    def p(**kw):
        return OmniDiffusionSamplingParams(**{"num_inference_steps": 4, "width": 64, "height": 64,
                                              "output_type": "np", "true_cfg_scale": 3.0, **kw})

    prompts = ["a red fox", "an old lighthouse on a rocky coast at dusk", "a blue cat",
               {"prompt": "a red fox", "negative_prompt": "blurry"}, "a green owl"]
    params = [p(seed=1), p(seed=2, num_images_per_prompt=1), p(seed=3, width=48), p(seed=4),
              p(seed=5)]
    alone = omni.generate(prompts, params, use_tqdm=False)
    with Omni(model=tiny_qwen_image, max_num_seqs=4, step_batching=False) as engine:
        batched = engine.generate(prompts, params, use_tqdm=False)
    assert [o.metrics["batch_size"] for o in batched] == [4, 4, 1, 4, 4]
    for a, b in zip(alone, batched):
        # In request order (ids differ: each engine numbers its own requests).
        assert a.prompt == b.prompt and len(a.images) == len(b.images)
        for x, y in zip(a.images, b.images):
            # Same noise per image; only the batched kernels' rounding differs.
            assert float(np.abs(x - y).max()) <= 1e-5


def test_batching_with_a_cache_is_refused_and_step_batching_is_the_default(tiny_qwen_image):
    from vllm_omni.diffusion.data import OmniEngineConfig
    from vllm_omni.models.registry import load_model_spec

    def config(**kw):
        return OmniEngineConfig(model=tiny_qwen_image, model_name="m", **kw)

    with pytest.raises(ValueError, match="max_num_seqs > 1 with a cache backend"):
        config(max_num_seqs=2, cache_backend="tea_cache", step_batching=False)
    # Left to the model (None), step batching runs wherever there is more than one in flight.
    adapter = load_model_spec(tiny_qwen_image).adapter
    for max_num_seqs, on in ((2, True), (1, False)):
        c = config(max_num_seqs=max_num_seqs, cache_backend="tea_cache")
        adapter.check_engine(c)
        assert c.step_batching is on


@pytest.mark.parametrize("name", ["U2xCFG2", "R2xTP2"])
def test_batching_under_a_parallel_layout(tiny_qwen_image, omni, name):
    """A batch split across ranks (sequence, ring, tensor and CFG parallel) gives each image as the
    single process gives it alone."""
    from vllm_omni import Omni, OmniDiffusionSamplingParams
    from vllm_omni.diffusion.data import DiffusionParallelConfig
    from vllm_omni.testing.dist import parse_layout_name

    prompts = ["a red fox", "an old lighthouse on a rocky coast at dusk", "a blue cat"]
    params = [OmniDiffusionSamplingParams(num_inference_steps=4, width=80, height=48, seed=i,
                                          true_cfg_scale=3.0, output_type="np") for i in range(3)]
    alone = omni.generate(prompts, params, use_tqdm=False)
    with Omni(model=tiny_qwen_image, max_num_seqs=4, step_batching=False,
              parallel_config=DiffusionParallelConfig(**parse_layout_name(name))) as engine:
        batched = engine.generate(prompts, params, use_tqdm=False)
    assert [o.metrics["batch_size"] for o in batched] == [3, 3, 3]
    for a, b in zip(alone, batched):
        assert float(np.abs(a.images[0] - b.images[0]).max()) <= 1e-4
