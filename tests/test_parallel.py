"""Every parallel layout with world size <= 4 reproduces the single-process output.

Model-level tests run the tiny Qwen-Image transformer/VAE on plain gloo ranks; end-to-end tests
start the real engine with the layout and compare float outputs (output_type="np").
"""

import time

import numpy as np
import pytest
import torch

from vllm_omni.diffusion.data import DiffusionParallelConfig
from vllm_omni.distributed.layout import RankLayout
from vllm_omni.testing.dist import parse_layout_name, run_ranks

TOL = 1e-4


# -- model level: the transformer with a padded text batch ---------------------------------------
def _transformer_inputs(model):
    g = torch.Generator().manual_seed(1)
    h, w = 5, 3  # 15 image tokens: uneven over 2 and 4 ranks
    txt = 7  # odd text length; the second prompt is padded after 4 tokens
    cfg = model.config
    mask = torch.ones(2, txt, dtype=torch.bool)
    mask[1, 4:] = False
    return dict(
        hidden_states=torch.randn(2, h * w, cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(2, txt, cfg.joint_attention_dim, generator=g),
        encoder_hidden_states_mask=mask,
        timestep=torch.tensor([0.7, 0.7]),
        img_shapes=[[(1, h, w)]] * 2,
        return_dict=False,
    )


def _transformer_rank(rank, world, model_dir, layout):
    from diffusers import QwenImageTransformer2DModel

    from vllm_omni.distributed.groups import torch_groups
    from vllm_omni.distributed.sequence_parallel import SequenceParallel
    from vllm_omni.distributed.tensor_parallel import apply_tensor_parallel
    from vllm_omni.models.qwen_image_attention import QwenImageSPAttnProcessor

    model = QwenImageTransformer2DModel.from_pretrained(model_dir, subfolder="transformer").eval()
    inputs = _transformer_inputs(model)
    with torch.inference_mode():
        expected = model(**inputs)[0]
        groups = torch_groups(RankLayout(**layout))
        apply_tensor_parallel(model, type(model)._tp_plan, groups.tp)
        if groups.sp.world_size > 1:
            SequenceParallel(groups.ulysses, groups.ring, groups.sp).apply(
                model, type(model)._cp_plan, QwenImageSPAttnProcessor)
        out = model(**inputs)[0]
    return (out - expected).abs().max().item(), groups.bytes_sent()


@pytest.mark.parametrize("layout", [
    dict(ulysses=2), dict(ring=2), dict(ulysses=2, ring=2), dict(tp=2), dict(ring=2, tp=2),
], ids=lambda d: "x".join(f"{k}{v}" for k, v in d.items()))
def test_transformer_matches_single_rank_with_padded_text(tiny_qwen_image, layout):
    results = run_ranks(_transformer_rank, RankLayout(**layout).world_size, tiny_qwen_image, layout)
    for err, sent in results:
        assert err < TOL, results
        assert sum(sent.values()) > 0


# -- model level: the VAE decoded in bands ----------------------------------------------------------
def _vae_rank(rank, world, model_dir, halo):
    from diffusers import AutoencoderKLQwenImage

    from vllm_omni.distributed.groups import torch_groups
    from vllm_omni.distributed.vae_patch_parallel import VaePatchParallel

    vae = AutoencoderKLQwenImage.from_pretrained(model_dir, subfolder="vae").eval()
    z = torch.randn(1, vae.config.z_dim, 1, 40, 6, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = vae.decode(z).sample
        pp = VaePatchParallel(vae, torch_groups(RankLayout(vae=world)).vae)
        computed_halo = pp.halo
        if halo is not None:
            pp.halo = halo
        out = vae.decode(z).sample
    return (out - expected).abs().max().item(), computed_halo


def test_vae_patch_parallel_is_exact_and_needs_its_halo(tiny_qwen_image):
    for err, halo in run_ranks(_vae_rank, 2, tiny_qwen_image, None):
        assert err < TOL and 0 < halo < 20  # 40 latent rows: the bands really are cropped
    # The check can fail: a halo shallower than the receptive field changes the seam.
    errs = [e for e, _ in run_ranks(_vae_rank, 2, tiny_qwen_image, 2)]
    assert max(errs) > 1e-3


# -- startup checks ------------------------------------------------------------------------------------
def test_impossible_layouts_fail_at_startup_naming_a_fix(tiny_qwen_image):
    from vllm_omni import Omni

    with pytest.raises(ValueError, match=r"2 attention heads.*--usp 2"):
        Omni(model=tiny_qwen_image, parallel_config=DiffusionParallelConfig(ulysses_degree=3))
    with pytest.raises(ValueError, match=r"must be 1 or 2"):
        Omni(model=tiny_qwen_image, parallel_config=DiffusionParallelConfig(cfg_parallel_size=4))
    with pytest.raises(ValueError, match=r"vae_patch_parallel_size <= 2"):
        DiffusionParallelConfig(ulysses_degree=2, vae_patch_parallel_size=4)


def test_layout_groups():
    lay = RankLayout(ulysses=2, ring=2, cfg=2)
    g = lay.groups()
    assert lay.world_size == 8
    assert g["ulysses"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert g["ring"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert g["sp"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert g["cfg"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert RankLayout(vae=2).world_size == 2 and RankLayout(vae=2).groups()["vae"] == [[0, 1]]
    assert RankLayout(tp=2, cfg=2).groups()["tp"] == [[0, 1], [2, 3]]
    assert parse_layout_name("U2xR2xCFG2xVAE-PP2") == dict(
        ulysses_degree=2, ring_degree=2, cfg_parallel_size=2, vae_patch_parallel_size=2)
    with pytest.raises(ValueError, match="bad layout"):
        parse_layout_name("Q2")


# -- end to end, offline ----------------------------------------------------------------------------
REQUESTS = [
    # odd image-token count (5 x 3) and a negative prompt
    ({"prompt": "a red fox", "negative_prompt": "blurry watercolour"},
     dict(width=80, height=48, true_cfg_scale=3.0)),
    # tall: 34 latent rows, so VAE bands are cropped; CFG with the default empty negative
    ("an old lighthouse on a rocky coast at dusk, oil painting",
     dict(width=48, height=272, true_cfg_scale=2.5)),
    # no CFG: a CFG-parallel engine runs it on every rank
    ("snow", dict(width=64, height=48)),
]


def _generate(engine):
    from vllm_omni import OmniDiffusionSamplingParams

    prompts = [p for p, _ in REQUESTS]
    params = [OmniDiffusionSamplingParams(num_inference_steps=2, seed=11, output_type="np", **kw)
              for _, kw in REQUESTS]
    return [o.images[0] for o in engine.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def single_rank_outputs(omni):
    return _generate(omni)


LAYOUTS = ["U2", "R2", "U2xR2", "CFG2", "TP2", "U2xCFG2", "TP2xCFG2", "R2xCFG2", "VAE-PP2"]


@pytest.mark.parametrize("name", LAYOUTS)
def test_offline_layout_matches_single_rank(tiny_qwen_image, single_rank_outputs, name):
    from vllm_omni import Omni

    config = DiffusionParallelConfig(**parse_layout_name(name))
    with Omni(model=tiny_qwen_image, parallel_config=config) as engine:
        assert len(engine.worker_pids) == config.world_size
        outputs = _generate(engine)
    for got, want in zip(outputs, single_rank_outputs):
        assert got.shape == want.shape
        assert float(np.abs(got - want).max()) <= TOL


# -- end to end, through `vllm serve --omni` with the flags ------------------------------------------
@pytest.mark.parametrize("flags", [
    ["--usp", "2", "--cfg-parallel-size", "2", "--vae-patch-parallel-size", "2"],
    ["--ring", "2", "--tensor-parallel-size", "2"],
], ids=["U2xCFG2xVAE-PP2", "R2xTP2"])
def test_server_with_parallel_flags_matches_single_rank(tiny_qwen_image, single_rank_outputs,
                                                        tmp_path, flags):
    import psutil
    import requests
    from conftest import Server, decode

    server = Server(tiny_qwen_image, *flags, log_path=str(tmp_path / "server.log"))
    try:
        workers = [p for p in psutil.Process(server.proc.pid).children(recursive=True)
                   if "vllm_omni::worker_rank" in " ".join(p.cmdline())]
        assert len(workers) == 4  # both flag sets make four ranks
        for (prompt, kw), want in zip(REQUESTS, single_rank_outputs):
            body = {"prompt": prompt if isinstance(prompt, str) else prompt["prompt"],
                    "size": f"{kw['width']}x{kw['height']}", "num_inference_steps": 2, "seed": 11,
                    "response_format": "b64_json"}
            if isinstance(prompt, dict):
                body["negative_prompt"] = prompt["negative_prompt"]
            if "true_cfg_scale" in kw:
                body["true_cfg_scale"] = kw["true_cfg_scale"]
            r = requests.post(f"{server.url}/v1/images/generations", json=body, timeout=120)
            assert r.status_code == 200, r.text
            got = np.asarray(decode(r.json()["data"][0]["b64_json"]).convert("RGB"), dtype=np.int16)
            # The server sends 8-bit PNGs; the float outputs agree to 1e-4, so after rounding
            # a pixel can differ by at most one level, and almost none do.
            ref = np.round(want * 255).astype(np.int16)
            diff = np.abs(got - ref)
            assert diff.max() <= 1 and (diff > 0).mean() < 0.01
        assert requests.get(f"{server.url}/health", timeout=5).status_code == 200
    finally:
        server.stop()


def test_rank_failing_alone_does_not_hang_the_group(tiny_qwen_image, single_rank_outputs,
                                                    monkeypatch):
    """Rank 1 fails while rank 0 waits in an all-to-all: the request errors, workers restart."""
    from vllm_omni import Omni, OmniDiffusionSamplingParams
    from vllm_omni.testing.faults import FAULT_MARKER

    monkeypatch.setenv("VLLM_OMNI_TEST_FAIL_RANK", "1")
    monkeypatch.setattr("vllm_omni.executor.base.DESYNC_GRACE_S", 3.0)
    params = OmniDiffusionSamplingParams(num_inference_steps=2, width=64, height=48, seed=1)
    with Omni(model=tiny_qwen_image,
              parallel_config=DiffusionParallelConfig(ulysses_degree=2)) as engine:
        before = engine.worker_pids
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="did not finish"):
            engine.generate(f"a cat {FAULT_MARKER}", params, use_tqdm=False)
        assert time.monotonic() - t0 < 20
        assert _generate(engine)[0].shape == single_rank_outputs[0].shape  # serving again
        assert engine.worker_pids != before
