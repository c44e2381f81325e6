"""Step-level batching (``--step-batching``): requests with different steps, guidance, seeds and
prompts share denoiser forwards, join a running batch at its next step and leave after their
last, and each output equals the same request run alone."""

from __future__ import annotations

import concurrent.futures
import time

import numpy as np
import pytest
import requests
import torch

from conftest import Server, kill_later, metric
from test_models import CASES, INPUTS, PROMPT

# Batched kernels round differently from single ones (fp32 GEMMs over another batch size, and a
# masked attention where the prompt was padded); measured at most 3e-6 on every family here.
TOL = 1e-5
# Their denoisers take inputs that are not per-sample tensors (Z-Image: lists of unpadded
# sequences; GLM-Image: prior tokens), so each request's forward runs on its own: still exact.
UNMERGED = {"z-image-turbo", "glm-image"}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.family)
def test_every_family_equals_alone(case, tiny_models):
    from vllm_omni import Omni, OmniDiffusionSamplingParams

    prompt = {"prompt": PROMPT}
    if case.inputs:
        prompt["multi_modal_data"] = {"image": INPUTS[:case.inputs]}
    params = [OmniDiffusionSamplingParams(num_inference_steps=steps, seed=seed, output_type="np",
                                          **case.params)
              for steps, seed in [(2, 1), (3, 2), (4, 3)]]
    with Omni(tiny_models[case.family], step_batching=True, max_num_seqs=3) as engine:
        alone = [engine.generate(prompt, p, use_tqdm=False)[0] for p in params]
        together = engine.generate([prompt] * 3, params, use_tqdm=False)
    for a, b in zip(alone, together):
        assert len(a.images) == len(b.images) == case.outputs
        for x, y in zip(a.images, b.images):
            assert float(np.abs(np.asarray(x) - np.asarray(y)).max()) <= TOL
    shared = max(o.metrics["batch_size"] for o in together)
    assert shared == 1 if case.family in UNMERGED else shared == 3


def test_mixed_requests_join_and_equal_the_plain_engine(tiny_qwen_image, omni):
    """Different prompt lengths (padded under a mask), CFG and none, a negative prompt, n=2 and
    a size of its own; two in flight, so the rest join as earlier ones leave."""
    from vllm_omni import Omni, OmniDiffusionSamplingParams

    def p(**kw):
        return OmniDiffusionSamplingParams(**{"num_inference_steps": 4, "width": 64,
                                              "height": 64, "output_type": "np", **kw})

    prompts = ["a red fox", "an old lighthouse on a rocky coast at dusk", "a blue cat",
               {"prompt": "a red fox", "negative_prompt": "blurry"}, "a green owl"]
    params = [p(seed=1, num_inference_steps=6),
              p(seed=2, true_cfg_scale=4.0, num_images_per_prompt=2),
              p(seed=3, width=48), p(seed=4, num_inference_steps=3),
              p(seed=5, true_cfg_scale=2.0)]
    want = omni.generate(prompts, params, use_tqdm=False)  # the plain engine, one at a time
    with Omni(tiny_qwen_image, step_batching=True, max_num_seqs=2) as engine:
        got = engine.generate(prompts, params, use_tqdm=False)
    for a, b in zip(want, got):
        assert len(a.images) == len(b.images)
        for x, y in zip(a.images, b.images):
            assert float(np.abs(x - y).max()) <= TOL
    # The first two start together and share; who shares with the later ones depends on when
    # they join. The one 48-wide request shares with none: no other has its token count.
    assert got[0].metrics["batch_size"] > 1 and got[1].metrics["batch_size"] > 1
    assert got[2].metrics["batch_size"] == 1
    assert all(o.metrics["first_step_s"] >= o.metrics["queue_wait_s"] for o in got)


@pytest.fixture(scope="module")
def step_server(tiny_qwen_image, tmp_path_factory):
    s = Server(tiny_qwen_image, "--step-batching", "--max-num-seqs", "4",
               "--max-inference-steps", "100000",
               log_path=str(tmp_path_factory.mktemp("logs") / "step.log"))
    yield s
    s.stop()


GEN = "/v1/images/generations"


def _post(server, body, timeout=120):
    return requests.post(server.url + GEN, json=body, timeout=timeout)


def test_served_requests_join_a_running_one_and_leave_first(step_server, server):
    long = {"prompt": "a red fox", "size": "64x64", "num_inference_steps": 1000, "seed": 1}
    shorts = [{"prompt": p, "size": "64x64", "num_inference_steps": 3, "seed": s,
               "true_cfg_scale": g}
              for p, s, g in [("a blue cat", 2, 1.0), ("an old lighthouse at dusk", 3, 4.0)]]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        slow = pool.submit(_post, step_server, long)
        deadline = time.monotonic() + 60
        while metric(step_server, "vllm_omni:num_requests_in_flight") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)  # the long request is stepping now
        t0 = time.monotonic()
        quick = list(pool.map(lambda b: _post(step_server, b), shorts))
        quick_s = time.monotonic() - t0
        assert not slow.done()  # they joined it and left before it ended
        assert all(r.status_code == 200 for r in quick), [r.text for r in quick]
        assert slow.result().status_code == 200
    assert quick_s < 30
    # Each image is what the plain server makes for that request.
    for body, r in zip(shorts, quick):
        assert r.json()["data"][0]["b64_json"] == _post(server, body).json()["data"][0]["b64_json"]
    assert metric(step_server, "vllm_omni:batch_size_sum") > metric(
        step_server, "vllm_omni:batch_size_count")
    assert metric(step_server, "vllm_omni:time_to_first_step_seconds_count") >= 3


def test_a_cancelled_request_leaves_and_its_mates_finish(step_server):
    before = metric(step_server, "vllm_omni:engine_requests_total", outcome="cancelled")
    mate = {"prompt": "a red fox", "size": "64x64", "num_inference_steps": 60, "seed": 4}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        gone = pool.submit(lambda: pytest.raises(requests.Timeout, _post, step_server,
                                                 {**mate, "num_inference_steps": 50000, "seed": 5},
                                                 timeout=2))
        time.sleep(0.3)
        stays = pool.submit(_post, step_server, mate)
        gone.result()
        assert stays.result().status_code == 200
    deadline = time.monotonic() + 20
    while metric(step_server, "vllm_omni:engine_requests_total", outcome="cancelled") == before:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert _post(step_server, {**mate, "num_inference_steps": 2}).status_code == 200


def test_adapter_sets_share_forwards_only_with_their_own(tiny_qwen_image, tmp_path):
    """Requests with different LoRA sets (and none) in flight together, three adapters under
    --max-loras 2 (none is evicted while a running request uses it): each equals the plain
    engine's output, and only requests of one set share a forward."""
    from vllm_omni import Omni, OmniDiffusionSamplingParams
    from vllm_omni.testing.tiny_lora import build

    modules = {n: build(tiny_qwen_image, str(tmp_path / f"{n}.safetensors"), seed=i)
               for i, n in enumerate(("ghibli", "ink", "owl"))}
    sets = [{"name": "ghibli"}, {"name": "ink", "scale": 0.5}, None, {"name": "ghibli"},
            [{"name": "ghibli", "scale": 0.5}, {"name": "ink", "scale": 0.5}], {"name": "owl"}]
    params = [OmniDiffusionSamplingParams(num_inference_steps=3, width=64, height=64, seed=i,
                                          output_type="np", lora=lora)
              for i, lora in enumerate(sets)]
    prompts = ["a red fox"] * len(sets)
    with Omni(tiny_qwen_image, lora_modules=modules, max_loras=2) as engine:
        want = [engine.generate(p, q, use_tqdm=False)[0] for p, q in zip(prompts, params)]
    with Omni(tiny_qwen_image, lora_modules=modules, max_loras=2, step_batching=True,
              max_num_seqs=len(sets)) as engine:
        got = engine.generate(prompts, params, use_tqdm=False)
    for a, b in zip(want, got, strict=True):
        assert float(np.abs(a.images[0] - b.images[0]).max()) <= TOL
    assert [o.metrics["lora_adapters"] for o in got] == [1, 1, 0, 1, 2, 1]
    # The two ghibli requests run as one call (one batch key); every other set alone.
    assert [o.metrics["batch_size"] for o in got] == [2, 1, 1, 2, 1, 1]


@pytest.mark.parametrize("offload", ["enable_cpu_offload", "enable_layerwise_offload"])
def test_offload_keeps_each_request_equal_to_alone(tiny_qwen_image, offload):
    """Model-level offload swaps whole components: the third request joins while the long
    second one's rounds run, and its text encoder runs only on its turn, never during a round's
    forward (when it could, the transformer's weights vanished mid-forward in about half the
    runs). Layerwise streams the transformer's blocks inside the forwards."""
    from vllm_omni import Omni, OmniDiffusionSamplingParams

    params = [OmniDiffusionSamplingParams(num_inference_steps=steps, width=64, height=64,
                                          seed=steps, output_type="np", true_cfg_scale=cfg)
              for steps, cfg in [(2, 1.0), (30, 4.0), (3, 1.0)]]
    prompts = ["a red fox", "an old lighthouse at dusk", "a blue cat"]
    with Omni(tiny_qwen_image, **{offload: True}) as engine:
        want = [engine.generate(p, q, use_tqdm=False)[0] for p, q in zip(prompts, params)]
    with Omni(tiny_qwen_image, step_batching=True, max_num_seqs=2, **{offload: True}) as engine:
        got = engine.generate(prompts, params, use_tqdm=False)
    for a, b in zip(want, got, strict=True):
        assert float(np.abs(a.images[0] - b.images[0]).max()) <= TOL
    assert max(o.metrics["batch_size"] for o in got) > 1


def test_teacache_decides_per_request_in_shared_forwards(tiny_qwen_image):
    """TeaCache keeps each request's (and CFG branch's) state: requests with different steps,
    guidance and thresholds' worth of change share forwards in which some skip and others
    compute, and each equals the request run alone with the same cache, skipping as many calls."""
    from vllm_omni import Omni, OmniDiffusionSamplingParams

    params = [OmniDiffusionSamplingParams(num_inference_steps=steps, width=64, height=64,
                                          seed=seed, output_type="np", true_cfg_scale=cfg)
              for steps, seed, cfg in [(12, 1, 1.0), (7, 2, 4.0), (16, 3, 1.0), (9, 4, 1.0)]]
    prompts = ["a red fox", {"prompt": "an old lighthouse at dusk", "negative_prompt": "blurry"},
               "a blue cat", "a green owl in a tall tree"]
    cache = dict(cache_backend="tea_cache", cache_config={"rel_l1_thresh": 0.6})
    with Omni(tiny_qwen_image, **cache) as engine:
        want = [engine.generate(p, q, use_tqdm=False)[0] for p, q in zip(prompts, params)]
    with Omni(tiny_qwen_image, step_batching=True, max_num_seqs=3, **cache) as engine:
        got = engine.generate(prompts, params, use_tqdm=False)
    for a, b in zip(want, got, strict=True):
        assert float(np.abs(a.images[0] - b.images[0]).max()) <= TOL
        for k in ("transformer_calls_computed", "transformer_calls_skipped"):
            assert a.metrics[k] == b.metrics[k], k
    assert all(o.metrics["transformer_calls_skipped"] > 0 for o in got)
    assert max(o.metrics["batch_size"] for o in got) > 1


def test_cache_dit_keeps_each_requests_state(tiny_qwen_image):
    """Cache-DiT under step batching: each request keeps its own cache contexts (its steps,
    CFG branches, cached residuals and TaylorSeer history) and decides on its own samples in
    shared forwards where others compute or reuse, so each equals the request alone with the
    same cache, skipping as many calls."""
    from vllm_omni import Omni, OmniDiffusionSamplingParams

    params = [OmniDiffusionSamplingParams(num_inference_steps=steps, width=64, height=64,
                                          seed=seed, output_type="np", true_cfg_scale=cfg)
              for steps, seed, cfg in [(12, 1, 1.0), (7, 2, 4.0), (16, 3, 1.0), (9, 4, 1.0)]]
    prompts = ["a red fox", {"prompt": "an old lighthouse at dusk", "negative_prompt": "blurry"},
               "a blue cat", "a green owl in a tall tree"]
    cache = dict(cache_backend="cache_dit", cache_config={
        "residual_diff_threshold": 0.4, "max_warmup_steps": 2, "max_continuous_cached_steps": 2,
        "enable_taylorseer": True})
    with Omni(tiny_qwen_image, **cache) as engine:
        want = [engine.generate(p, q, use_tqdm=False)[0] for p, q in zip(prompts, params)]
    with Omni(tiny_qwen_image, step_batching=True, max_num_seqs=3, **cache) as engine:
        got = engine.generate(prompts, params, use_tqdm=False)
        again = engine.generate(prompts[1], params[1], use_tqdm=False)[0]
    for a, b in zip(want + want[1:2], got + [again], strict=True):
        assert float(np.abs(a.images[0] - b.images[0]).max()) <= TOL
        for k in ("transformer_calls_computed", "transformer_calls_skipped"):
            assert a.metrics[k] == b.metrics[k], k
    assert all(o.metrics["transformer_calls_skipped"] > 0 for o in got)
    assert max(o.metrics["batch_size"] for o in got) > 1


CACHE_ON = {"tea_cache": {"rel_l1_thresh": 0.6},
            "cache_dit": {"residual_diff_threshold": 0.6, "max_warmup_steps": 1}}


# One of each shape of cache-dit's block wrappers: two stacks (FLUX.1), a BlockAdapter of our
# own (SD3), and two transformers in turn (Wan2.2's experts, each with its own wrappers).
CACHE_DIT_FAMILIES = ["flux.1-dev", "sd3.5", "longcat-image", "ovis-image", "wan2.2-t2v"]


@pytest.mark.parametrize("family", CACHE_DIT_FAMILIES)
def test_cache_dit_decides_per_request_in_every_wrapper_shape(family, tiny_models,
                                                               video_models):
    from vllm_omni import Omni, OmniDiffusionSamplingParams

    if family in video_models:
        path, params = video_models[family], dict(width=64, height=64, num_frames=5,
                                                  guidance_scale=4.0, guidance_scale_2=3.0)
    else:
        case = next(c for c in CASES if c.family == family)
        path, params = tiny_models[family], case.params
    params = [OmniDiffusionSamplingParams(num_inference_steps=steps, seed=seed,
                                          output_type="np", **params)
              for steps, seed in [(7, 1), (3, 2), (6, 3)]]
    cache = dict(cache_backend="cache_dit", cache_config={
        "residual_diff_threshold": 0.9, "max_warmup_steps": 1, "max_continuous_cached_steps": 2})
    prompts = [PROMPT, "an old lighthouse at dusk", "a blue cat asleep in the snow"]
    # Two in flight: the third joins the first mid-way, so their steps (and so their decisions)
    # differ within a forward.
    with Omni(path, step_batching=True, max_num_seqs=2, **cache) as engine:
        alone = [engine.generate(q, p, use_tqdm=False)[0] for q, p in zip(prompts, params)]
        together = engine.generate(prompts, params, use_tqdm=False)
    for a, b in zip(alone, together):
        x, y = (np.stack(o.videos[0].frames) if o.videos else o.images[0] for o in (a, b))
        assert float(np.abs(x - y).max()) <= TOL
        for k in ("transformer_calls_computed", "transformer_calls_skipped"):
            assert a.metrics[k] == b.metrics[k], k
    assert sum(o.metrics["transformer_calls_skipped"] for o in together) > 0
    assert max(o.metrics["batch_size"] for o in together) > 1


@pytest.mark.parametrize("layout, cache", [("U2", None), ("R2", None), ("TP2", None),
                                           ("VAE-PP2", None), ("CFG2", None),
                                           ("U2xCFG2", "tea_cache"), ("U2", "cache_dit"),
                                           ("CFG2", "cache_dit")])
def test_parallel_layouts_form_the_same_rounds_on_every_rank(tiny_qwen_image, omni, layout,
                                                             cache):
    """Every rank runs the calls' code in the same turns and admits joined requests where rank 0
    says: requests with different steps, CFG, prompt lengths and sizes (one 48 wide: a round of
    two forwards), two in flight so that the others join, each equal the plain one-process
    engine (parallel layouts: within 1e-4); with either cache, each request's skips are agreed
    over the ranks too. (Without the agreement on joins, this hangs: the ranks' rounds differ.)"""
    from vllm_omni import Omni, OmniDiffusionSamplingParams
    from vllm_omni.diffusion.data import DiffusionParallelConfig
    from vllm_omni.testing.dist import parse_layout_name

    params = [OmniDiffusionSamplingParams(num_inference_steps=steps, width=width, height=64,
                                          seed=steps, output_type="np", true_cfg_scale=cfg)
              for steps, cfg, width in [(3, 1.0, 64), (5, 4.0, 64), (2, 1.0, 48), (4, 1.0, 64)]]
    prompts = ["a red fox", {"prompt": "an old lighthouse at dusk", "negative_prompt": "blurry"},
               "a blue cat", "a green owl in a tall tree"]
    kw = dict(cache_backend=cache, cache_config=CACHE_ON[cache]) if cache else {}
    if cache == "cache_dit":  # prompts of one token count: only those share a forward there
        prompts = ["a red fox", {"prompt": "a blue cat", "negative_prompt": "a green owl"},
                   "a brown dog", "a white swan"]
    if cache:
        with Omni(tiny_qwen_image, **kw) as engine:
            want = engine.generate(prompts, params, use_tqdm=False)
    else:
        want = omni.generate(prompts, params, use_tqdm=False)
    with Omni(tiny_qwen_image, step_batching=True, max_num_seqs=2, **kw,
              parallel_config=DiffusionParallelConfig(**parse_layout_name(layout))) as engine:
        got = engine.generate(prompts, params, use_tqdm=False)
    for a, b in zip(want, got, strict=True):
        assert float(np.abs(a.images[0] - b.images[0]).max()) <= 1e-4
        if cache:
            assert a.metrics["transformer_calls_skipped"] == b.metrics["transformer_calls_skipped"]
    assert max(o.metrics["batch_size"] for o in got) > 1
    if cache:
        assert sum(o.metrics["transformer_calls_skipped"] for o in got) > 0


def test_a_rank_killed_mid_round_fails_its_calls_and_the_engine_recovers(tiny_qwen_image):
    """Two requests share rounds under Ulysses; rank 1 is killed mid-way: both fail within
    seconds (none hangs in a round or a collective), and new workers serve the next ones."""
    from vllm_omni import Omni, OmniDiffusionSamplingParams
    from vllm_omni.diffusion.data import DiffusionParallelConfig

    slow = [OmniDiffusionSamplingParams(num_inference_steps=steps, width=64, height=64, seed=1)
            for steps in (5000, 4000)]
    quick = OmniDiffusionSamplingParams(num_inference_steps=3, width=64, height=64, seed=2,
                                        output_type="np")
    with Omni(tiny_qwen_image, step_batching=True, max_num_seqs=2,
              parallel_config=DiffusionParallelConfig(ulysses_degree=2)) as engine:
        before = engine.worker_pids
        killed_at = kill_later(before[1], 3)
        # Rank 0's collective with the dead rank fails (gloo: connection reset), or the
        # executor sees the death first: either way the requests fail now.
        with pytest.raises(RuntimeError, match=r"worker rank 1|Connection reset|Connection closed"):
            engine.generate(["a slow fox", "a slower owl"], slow, use_tqdm=False)
        assert killed_at and time.monotonic() - killed_at[0] < 10
        got = engine.generate(["a red fox", "a blue cat"], [quick, quick], use_tqdm=False)
        assert all(np.isfinite(o.images[0]).all() for o in got)
        assert max(o.metrics["batch_size"] for o in got) > 1
        assert not set(engine.worker_pids) & set(before)


def test_step_batching_without_max_num_seqs_is_refused(tiny_qwen_image):
    from vllm_omni.diffusion.data import OmniEngineConfig

    with pytest.raises(ValueError, match="max_num_seqs 1"):
        OmniEngineConfig(model=tiny_qwen_image, model_name="m", step_batching=True)


def test_merge_pads_prompts_and_splits_outputs():
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    from vllm_omni.worker import step_batching as sb

    pad = {"encoder_hidden_states": sb.Padding(1, "encoder_hidden_states_mask")}
    module = torch.nn.Identity()

    def call(b, tokens, mask=None):
        kw = {"hidden_states": torch.randn(b, 4, 2), "encoder_hidden_states":
              torch.randn(b, tokens, 3), "encoder_hidden_states_mask": mask,
              "timestep": torch.rand(b), "img_shapes": [[(1, 2, 2)]] * b, "return_dict": False}
        return sb._Call(module, None, kw, b, sb._key(module, kw, b, pad))

    a, b = call(1, 5), call(2, 3, torch.tensor([[1, 1, 0], [1, 1, 1]]))
    assert a.key == b.key and sb._same_shared(a, b, {"encoder_hidden_states_mask"})
    merged = sb._merge([a, b], pad)
    assert merged["encoder_hidden_states"].shape == (3, 5, 3)
    assert merged["encoder_hidden_states_mask"].tolist() == [
        [True] * 5, [True, True, False, False, False], [True, True, True, False, False]]
    assert torch.equal(merged["encoder_hidden_states"][1:, :3], b.kwargs["encoder_hidden_states"])
    assert merged["img_shapes"] == [[(1, 2, 2)]] * 3 and merged["timestep"].shape == (3,)
    # Another image size, or a shared input that differs, keeps calls apart.
    bigger = {**a.kwargs, "hidden_states": torch.randn(1, 9, 2)}
    assert sb._key(module, bigger, 1, pad) != a.key
    assert sb._key(module, {**a.kwargs, "return_dict": True}, 1, pad) != a.key
    out = Transformer2DModelOutput(sample=torch.arange(6.0).reshape(3, 2))
    parts = sb._split(out, [1, 2])
    assert parts[0].sample.tolist() == [[0.0, 1.0]] and parts[1].sample.shape == (2, 2)
    assert [p[0].shape[0] for p in sb._split((torch.zeros(3, 1),), [1, 2])] == [1, 2]


def test_merge_builds_the_mask_when_one_call_has_none():
    from vllm_omni.worker import step_batching as sb

    pad = {"encoder_hidden_states": sb.Padding(1, "encoder_hidden_states_mask")}
    module = torch.nn.Identity()
    calls = []
    for b, mask in ((2, torch.tensor([[1, 1, 1], [1, 1, 0]])), (1, None)):
        kw = {"hidden_states": torch.randn(b, 4, 2), "encoder_hidden_states": torch.randn(b, 3, 3),
              "encoder_hidden_states_mask": mask}
        calls.append(sb._Call(module, None, kw, b, sb._key(module, kw, b, pad)))
    assert calls[0].key == calls[1].key
    merged = sb._merge(calls, pad)
    assert merged["encoder_hidden_states_mask"].tolist() == [
        [True, True, True], [True, True, False], [True, True, True]]
    no_masks = [sb._Call(module, None, {**c.kwargs, "encoder_hidden_states_mask": None}, c.size,
                         c.key) for c in calls]
    assert sb._merge(no_masks, pad)["encoder_hidden_states_mask"] is None


def test_a_steps_cfg_branches_share_one_round_and_results_come_back():
    """Two calls of CFG (two denoiser calls a step each) and one without: each round holds
    every call's whole step, as one forward, and each call gets what it would alone."""
    from vllm_omni.worker import step_batching as sb

    class Denoiser(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj_out = torch.nn.Linear(2, 3)
            self.forwards = []

        def forward(self, hidden_states, timestep, return_dict=True):
            self.forwards.append(hidden_states.shape[0])
            return (self.proj_out(hidden_states) * timestep[:, None, None],)

    torch.manual_seed(0)
    model, batcher = Denoiser(), sb.StepBatcher()
    sb.install([model], batcher)
    results: dict[str, list] = {}

    def run(name, branches, steps):
        def call():
            batcher.begin_call(branches)
            x, t = torch.randn(1, 4, 2), torch.rand(1)
            got = []
            for _ in range(steps):
                outs = [model(hidden_states=x + i, timestep=t, return_dict=False)[0]
                        for i in range(branches)]
                got.append(sum(outs))
            alone = sum(model.proj_out(x + i) * t[:, None, None] for i in range(branches))
            results[name] = (got, alone)
        return call

    with torch.inference_mode():
        batcher.start(run("cfg", 2, 3))
        batcher.start(run("cfg-short", 2, 1))
        batcher.start(run("plain", 1, 2))
        batcher.run()
    assert model.forwards == [5, 3, 2]  # rounds: 2+2+1 samples, then 2+1, then 2
    for got, alone in results.values():
        assert all(torch.allclose(g, alone, atol=1e-6) for g in got)

    # A call declared with two branches that makes one call a step would read a placeholder
    # before the round fills it: it fails at its next step instead.
    errors = []

    def one_call_a_step():
        batcher.begin_call(2)
        x = torch.randn(1, 4, 2)
        try:
            for t in (0.9, 0.5):
                x = x + model(hidden_states=x, timestep=torch.tensor([t]),
                              return_dict=False)[0][..., :2]
        except RuntimeError as e:
            errors.append(str(e))

    with torch.inference_mode():
        batcher.start(one_call_a_step)
        batcher.run()
    assert errors and "different timesteps" in errors[0]
