"""BAGEL-7B-MoT, our own modelling: the published checkpoint layout, correctness without a
reference run (determinism, the cached prompt, packed attention against a plain forward written
here, guidance off = no guidance, the edit input matters), and serving over HTTP."""

from __future__ import annotations

import base64
import io
import math

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from conftest import Server, decode

PROMPT, STEPS, SEED = "a red fox in the snow", 3, 11


@pytest.fixture(scope="module")
def bagel_dir(tmp_path_factory):
    from vllm_omni.testing.tiny_models import build

    return build("bagel", str(tmp_path_factory.mktemp("bagel") / "tiny-bagel"))


@pytest.fixture(scope="module")
def pipe(bagel_dir):
    from vllm_omni.models.bagel.pipeline import load_bagel

    return load_bagel(bagel_dir, torch.float32)


def _gen(seed=SEED):
    return [torch.Generator().manual_seed(seed)]


def _image(seed: int, size=(80, 48)) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype("uint8"))


# -- the published layout ---------------------------------------------------------------------
# BAGEL-7B-MoT's configs (llm_config.json: Qwen2.5-7B; vit_config.json: SigLIP so400m-14-980).
LLM_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
              num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
              rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
VIT_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                  num_attention_heads=16, patch_size=14, image_size=980)


def published_ema_index() -> dict[str, tuple[int, ...]]:
    """``ema.safetensors``' tensors, transcribed from the reference implementation's modules
    (ByteDance-Seed/Bagel ``modeling/bagel``: Bagel, Qwen2MoTDecoderLayer with
    PackedAttentionMoT and qk_norm, SiglipVisionModel with the patch conv saved as a Linear
    and its last layer dropped) at BAGEL-7B-MoT's configs and demo settings (latent patch 2,
    max latent size 64, 70 ViT patches per side)."""
    d, ff, heads, kv, vocab = 3584, 18944, 28, 4, 152064
    hd = d // heads
    index = {"language_model.model.embed_tokens.weight": (vocab, d),
             "language_model.model.norm.weight": (d,),
             "language_model.model.norm_moe_gen.weight": (d,),
             "language_model.lm_head.weight": (vocab, d),
             "time_embedder.mlp.0.weight": (d, 256), "time_embedder.mlp.0.bias": (d,),
             "time_embedder.mlp.2.weight": (d, d), "time_embedder.mlp.2.bias": (d,),
             "vae2llm.weight": (d, 64), "vae2llm.bias": (d,),
             "llm2vae.weight": (64, d), "llm2vae.bias": (64,),
             "latent_pos_embed.pos_embed": (64 * 64, d),
             "connector.fc1.weight": (d, 1152), "connector.fc1.bias": (d,),
             "connector.fc2.weight": (d, d), "connector.fc2.bias": (d,),
             "vit_pos_embed.pos_embed": (70 * 70, d)}
    for i in range(28):
        p = f"language_model.model.layers.{i}."
        for e in ("", "_moe_gen"):
            index |= {p + f"self_attn.q_proj{e}.weight": (d, d), p + f"self_attn.q_proj{e}.bias": (d,),
                      p + f"self_attn.k_proj{e}.weight": (kv * hd, d),
                      p + f"self_attn.k_proj{e}.bias": (kv * hd,),
                      p + f"self_attn.v_proj{e}.weight": (kv * hd, d),
                      p + f"self_attn.v_proj{e}.bias": (kv * hd,),
                      p + f"self_attn.o_proj{e}.weight": (d, d),
                      p + f"self_attn.q_norm{e}.weight": (hd,),
                      p + f"self_attn.k_norm{e}.weight": (hd,),
                      p + f"mlp{e}.gate_proj.weight": (ff, d), p + f"mlp{e}.up_proj.weight": (ff, d),
                      p + f"mlp{e}.down_proj.weight": (d, ff),
                      p + f"input_layernorm{e}.weight": (d,),
                      p + f"post_attention_layernorm{e}.weight": (d,)}
    v, vf = 1152, 4304
    vm = "vit_model.vision_model."
    index |= {vm + "embeddings.patch_embedding.weight": (v, 14 * 14 * 3),
              vm + "embeddings.patch_embedding.bias": (v,),
              vm + "embeddings.position_embedding.weight": (70 * 70, v),
              vm + "post_layernorm.weight": (v,), vm + "post_layernorm.bias": (v,)}
    for i in range(26):
        p = f"{vm}encoder.layers.{i}."
        for name, shape in (("self_attn.q_proj", (v, v)), ("self_attn.k_proj", (v, v)),
                            ("self_attn.v_proj", (v, v)), ("self_attn.out_proj", (v, v)),
                            ("layer_norm1", None), ("layer_norm2", None),
                            ("mlp.fc1", (vf, v)), ("mlp.fc2", (v, vf))):
            out = shape[0] if shape else v
            index[p + name + ".weight"] = shape or (v,)
            index[p + name + ".bias"] = (out,)
    return index


def test_our_parameters_are_the_published_checkpoints():
    """At BAGEL-7B-MoT's size (built on the meta device), every tensor we load has the published
    name and shape; the one we skip is the text head."""
    from transformers import Qwen2Config, SiglipVisionConfig

    from vllm_omni.models.bagel.layout import UNUSED_WEIGHTS, BagelConfig
    from vllm_omni.models.bagel.modeling import Bagel

    vit = SiglipVisionConfig(**{**VIT_SO400M, "num_hidden_layers": 26})
    with torch.device("meta"):
        model = Bagel(Qwen2Config(**LLM_7B), vit, BagelConfig(), 151652, 151653)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    published = published_ema_index()
    assert ours == {k: s for k, s in published.items() if k not in UNUSED_WEIGHTS}
    assert len(published) == len(ours) + 1
    params = sum(math.prod(s) for s in published.values())
    assert 14.0e9 < params < 14.8e9  # "7B-MoT": two 7B experts sharing embeddings, ~14B in all


def test_flux_autoencoder_layout_loads_into_diffusers():
    """``ae.safetensors`` (FLUX's autoencoder, original names: 244 tensors) maps onto diffusers'
    AutoencoderKL through diffusers' own single-file converter, every tensor used."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from vllm_omni.models.bagel.layout import AE_SCALE, AE_SHIFT, ae_config
    from vllm_omni.testing.tiny_models import original_ae_names

    with torch.device("meta"):
        flux = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4,
                             up_block_types=("UpDecoderBlock2D",) * 4,
                             block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                             latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
    names = original_ae_names(flux)
    assert len(names) == 244 and "encoder.mid.attn_1.q.weight" in names
    shapes = {"encoder.conv_in.weight": (128, 3, 3, 3), "encoder.conv_out.weight": (32, 512, 3, 3),
              **{f"encoder.down.{i}.block.{j}.conv1.weight": (c, c, 3, 3)
                 for i, c in enumerate((128, 256, 512, 512)) for j in range(2)}}
    config = ae_config(shapes)
    assert config["block_out_channels"] == [128, 256, 512, 512]
    assert config["layers_per_block"] == 2 and config["latent_channels"] == 16
    assert (config["scaling_factor"], config["shift_factor"]) == (AE_SCALE, AE_SHIFT)
    converted = convert_ldm_vae_checkpoint({n: torch.zeros(1) for n in names}, config)
    assert set(converted) == set(flux.state_dict())


def test_tiny_checkpoint_is_in_the_published_layout(bagel_dir):
    import os

    from vllm_omni.models.bagel.pipeline import load_autoencoder
    from vllm_omni.models.bagel.layout import weight_shapes

    files = set(os.listdir(bagel_dir))
    assert {"llm_config.json", "vit_config.json", "ema.safetensors", "ae.safetensors",
            "tokenizer.json"} <= files
    assert "model_index.json" not in files  # recognised by its own files, not as diffusers
    names = set(weight_shapes(os.path.join(bagel_dir, "ema.safetensors")))
    layer0 = {n.split("layers.0.", 1)[1] for n in names if ".model.layers.0." in n}
    want = {k.split("layers.0.", 1)[1] for k in published_ema_index()
            if ".model.layers.0." in k}
    assert layer0 == want
    assert {n for n in names if "layers." not in n} == \
        {k for k in published_ema_index() if "layers." not in k}
    vae = load_autoencoder(os.path.join(bagel_dir, "ae.safetensors"), torch.float32)
    assert vae.config.latent_channels == 16 and len(vae.config.block_out_channels) == 4


def test_a_checkpoint_missing_a_tensor_is_refused_naming_it(bagel_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from vllm_omni.models.registry import load_model_spec

    broken = shutil.copytree(bagel_dir, tmp_path / "broken")
    state = load_file(broken / "ema.safetensors")
    del state["latent_pos_embed.pos_embed"]
    save_file(state, broken / "ema.safetensors")
    with pytest.raises(ValueError, match="latent_pos_embed.pos_embed is missing"):
        load_model_spec(str(broken))


# -- correctness without a reference run --------------------------------------------------------
def test_same_seed_same_bytes_and_seeds_differ(pipe):
    a = pipe(PROMPT, height=64, width=48, num_inference_steps=STEPS, generator=_gen()).images[0]
    b = pipe(PROMPT, height=64, width=48, num_inference_steps=STEPS, generator=_gen()).images[0]
    c = pipe(PROMPT, height=64, width=48, num_inference_steps=STEPS, generator=_gen(12)).images[0]
    assert a.size == (48, 64)
    assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()


def _plain_velocity(model, ids: list[int], x: torch.Tensor, t: float, h: int, w: int):
    """The conditional velocity from ONE forward over [prompt, <start>, latents, <end>], no
    cache and no packing: prompt rows attend causally to the prompt, image rows to everything;
    attention, masks, RoPE and the expert routing are written out here."""
    from vllm_omni.models.bagel.modeling import grid_ids

    lm = model.language_model.model
    n, P = h * w, len(ids)
    text = lm.embed_tokens(torch.tensor(ids, dtype=torch.long)) if ids else x.new_zeros(0, 64)
    lat = (model.vae2llm(x) + model.time_embedder(torch.tensor([t]))
           + model.latent_pos_embed(grid_ids(h, w, model.config.max_latent_size)))
    marks = lm.embed_tokens(torch.tensor([model.start_of_image, model.end_of_image]))
    seq = torch.cat([text, marks[:1], lat, marks[1:]])
    L = seq.shape[0]
    gen = torch.zeros(L, dtype=torch.bool)
    gen[P + 1:P + 1 + n] = True
    allowed = torch.ones(L, L, dtype=torch.bool)
    allowed[:P, :] = False
    allowed[:P, :P] = torch.ones(P, P, dtype=torch.bool).tril()
    pos = torch.cat([torch.arange(P), torch.full((n + 2,), P)]).float()
    a0 = lm.layers[0].self_attn
    hd, heads, kv = a0.head_dim, a0.heads, a0.kv_heads
    inv = 1.0 / (lm.rotary_emb.config.rope_parameters["rope_theta"]
                 ** (torch.arange(0, hd, 2).float() / hd))
    ang = torch.cat([pos[:, None] * inv[None]] * 2, dim=-1)[:, None]
    rot = lambda q: torch.cat([-q[..., hd // 2:], q[..., :hd // 2]], -1)  # noqa: E731
    rope = lambda q: q * ang.cos() + rot(q) * ang.sin()  # noqa: E731

    def pick(und, gen_fn, v):
        out = und(v).clone()
        out[gen] = gen_fn(v)[gen]
        return out

    hid = seq
    for layer in lm.layers:
        a = layer.self_attn
        x_in = pick(layer.input_layernorm, layer.input_layernorm_moe_gen, hid)
        proj = lambda name, nh: pick(  # noqa: E731
            lambda v: (getattr(a, f"{name}_norm", None) or (lambda z: z))(
                getattr(a, f"{name}_proj")(v).view(L, nh, hd)),
            lambda v: (getattr(a, f"{name}_norm_moe_gen", None) or (lambda z: z))(
                getattr(a, f"{name}_proj_moe_gen")(v).view(L, nh, hd)), x_in)
        q, k, v = rope(proj("q", heads)), rope(proj("k", kv)), proj("v", kv)
        k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out = torch.einsum("hqk,khd->qhd", probs, v).reshape(L, -1)
        hid = hid + pick(a.o_proj, a.o_proj_moe_gen, out)
        hid = hid + pick(lambda z: layer.mlp(layer.post_attention_layernorm(z)),
                         lambda z: layer.mlp_moe_gen(layer.post_attention_layernorm_moe_gen(z)),
                         hid)
    hid = pick(lm.norm, lm.norm_moe_gen, hid)
    return model.llm2vae(hid[gen])


def test_packed_attention_equals_a_plain_forward(pipe):
    """Three sequences in one packed forward (two prompts from their cached contexts, one
    with no prompt) each equal the plain single-sequence forward."""
    from vllm_omni.models.bagel.modeling import EMPTY

    model, h, w = pipe.transformer, 4, 3
    ids_a, ids_b = pipe.prompt_ids(PROMPT), pipe.prompt_ids("a blue cat")
    ctx_a, ctx_b = model.add_text(EMPTY, ids_a), model.add_text(EMPTY, ids_b)
    x = torch.randn(2, h * w, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        packed = model(x, 0.7, [ctx_a, EMPTY, ctx_b], [0, 0, 1], h, w)
        for got, ids, img in ((packed[0], ids_a, 0), (packed[1], [], 0), (packed[2], ids_b, 1)):
            want = _plain_velocity(model, ids, x[img], 0.7, h, w)
            assert (got - want).abs().max() < 1e-5 * max(1.0, want.abs().max())


def test_cached_prompt_equals_recomputing_it_at_every_step(pipe):
    """The prompt (and edit input) contexts are computed once per request; recomputing them
    before every step gives bit-identical velocities."""
    from vllm_omni.models.bagel.modeling import EMPTY

    model, h, w = pipe.transformer, 4, 4
    image = pipe.vae_input(_image(3))
    with torch.no_grad():
        cond, no_text, _ = pipe.contexts(PROMPT, image, _gen()[0])
        x = torch.randn(1, h * w, 64, generator=torch.Generator().manual_seed(1))
        for t in pipe.timesteps(3, 3.0)[:-1].tolist():
            fresh, fresh_base, _ = pipe.contexts(PROMPT, image, _gen()[0])
            assert torch.equal(model(x, t, [cond, no_text], [0, 0], h, w),
                               model(x, t, [fresh, fresh_base], [0, 0], h, w))
            x = x - 0.3 * model(x, t, [cond], [0], h, w)
        text_only = model.add_text(EMPTY, pipe.prompt_ids(PROMPT))
        assert text_only.rope == len(pipe.prompt_ids(PROMPT)) and cond.rope == text_only.rope + 2


def test_guidance_scales_of_one_equal_the_path_without_guidance(pipe):
    """cfg scales 1 give exactly an Euler loop over the conditional velocity written here, and
    the guidance formula itself is the identity at scale 1 for every renorm type."""
    from vllm_omni.models.bagel.modeling import EMPTY
    from vllm_omni.models.bagel.pipeline import guide

    model, h, w = pipe.transformer, 4, 4
    got = pipe(PROMPT, height=64, width=64, num_inference_steps=STEPS, cfg_text_scale=1.0,
               cfg_img_scale=1.0, generator=_gen(), output_type="latent").images
    with torch.no_grad():
        cond = model.add_text(EMPTY, pipe.prompt_ids(PROMPT))
        x = torch.randn(h * w, 64, generator=_gen()[0])[None]
        t = pipe.timesteps(STEPS, 3.0)
        for i in range(STEPS):
            x = x - model(x, float(t[i]), [cond], [0], h, w) * (float(t[i]) - float(t[i + 1]))
    assert torch.equal(got, x)
    v, vt, vi = (torch.randn(16, 64, generator=torch.Generator().manual_seed(s)) for s in (1, 2, 3))
    for kind in ("global", "channel", "text_channel"):
        torch.testing.assert_close(guide(v, vt, vi, 1.0, 1.0, kind, 0.0), v)
    guided = pipe(PROMPT, height=64, width=64, num_inference_steps=STEPS, generator=_gen(),
                  output_type="latent").images
    assert not torch.equal(guided, got)


def test_edit_input_changes_the_output(pipe):
    kw = dict(num_inference_steps=STEPS, output_type="np")
    a = pipe(PROMPT, image=_image(1), generator=_gen(), **kw).images[0]
    b = pipe(PROMPT, image=_image(2), generator=_gen(), **kw).images[0]
    # An 80x48 input is encoded (and edited) at 112x64: short side at least 64, half the tiny
    # model's 128 px, both sides multiples of 16.
    assert a.shape == b.shape == (64, 112, 3)
    assert np.abs(a - b).max() > 1e-3
    assert np.abs(pipe(PROMPT, image=_image(1), generator=_gen(), **kw).images[0] - a).max() == 0


def test_sizes_follow_bagels_input_rules():
    from vllm_omni.models.bagel.layout import BagelConfig, fit_size, vae_input_size

    real = BagelConfig()
    assert vae_input_size(real, 640, 480) == (688, 512)  # short side up to 512, stride 16
    assert vae_input_size(real, 3000, 1000) == (1024, 336)  # long side down to 1024
    assert fit_size(500, 400, 980, 224, 14) == (504, 406)  # ViT: as is, rounded to 14


def test_step_batching_is_refused_with_the_alternative(bagel_dir):
    from vllm_omni.diffusion.data import OmniEngineConfig
    from vllm_omni.models.registry import load_model_spec

    spec = load_model_spec(bagel_dir)
    with pytest.raises(ValueError, match="step-batching does not run BAGEL"):
        spec.adapter.check_engine(OmniEngineConfig(model=bagel_dir, model_name="b",
                                                   step_batching=True,
                                                   max_num_seqs=4, device="cpu"))
    # Left to the model, BAGEL batches whole calls (and a cache then needs one in flight).
    config = OmniEngineConfig(model=bagel_dir, model_name="b", max_num_seqs=4, device="cpu")
    spec.adapter.check_engine(config)
    assert config.step_batching is False
    with pytest.raises(ValueError, match="max_num_seqs > 1 with a cache backend"):
        spec.adapter.check_engine(OmniEngineConfig(model=bagel_dir, model_name="b",
                                                   max_num_seqs=4, device="cpu",
                                                   cache_backend="tea_cache"))


def test_offline_omni_generates_and_edits(bagel_dir, pipe):
    from vllm_omni import Omni
    from vllm_omni.inputs.data import OmniDiffusionSamplingParams as Params
    from vllm_omni.worker.model_runner import make_generators

    with Omni(model=bagel_dir) as omni:
        [t2i] = omni.generate(PROMPT, Params(num_inference_steps=STEPS, seed=SEED, width=48,
                                             height=32, extra_args={"cfg_renorm_min": 0.5}),
                              use_tqdm=False)
        [edit] = omni.generate({"prompt": "make it blue", "multi_modal_data": {"image": _image(6)}},
                               Params(num_inference_steps=STEPS, seed=SEED), use_tqdm=False)
    want = pipe(PROMPT, width=48, height=32, num_inference_steps=STEPS, cfg_renorm_min=0.5,
                generator=make_generators(SEED, 1)).images[0]
    np.testing.assert_array_equal(np.asarray(t2i.images[0]), np.asarray(want))
    want = pipe("make it blue", image=_image(6), num_inference_steps=STEPS,
                generator=make_generators(SEED, 1)).images[0]
    np.testing.assert_array_equal(np.asarray(edit.images[0]), np.asarray(want))


# -- served -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bagel_server(bagel_dir, tmp_path_factory):
    s = Server(bagel_dir, "--served-model-name", "bagel",
               log_path=str(tmp_path_factory.mktemp("bagel-logs") / "server.log"))
    yield s
    s.stop()


def test_http_generation_equals_the_pipeline(bagel_server, pipe):
    from vllm_omni.worker.model_runner import make_generators

    r = requests.post(f"{bagel_server.url}/v1/images/generations", json={
        "model": "bagel", "prompt": PROMPT, "size": "64x48", "num_inference_steps": STEPS,
        "seed": SEED, "n": 2, "cfg_text_scale": 3.0, "timestep_shift": 2.0,
        "cfg_interval": [0.2, 1.0], "cfg_renorm_type": "channel"}, timeout=120)
    assert r.status_code == 200, r.text
    got = [decode(d["b64_json"]) for d in r.json()["data"]]
    want = pipe(PROMPT, width=64, height=48, num_inference_steps=STEPS, num_images_per_prompt=2,
                cfg_text_scale=3.0, timestep_shift=2.0, cfg_interval=[0.2, 1.0],
                cfg_renorm_type="channel", generator=make_generators(SEED, 2)).images
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    models = requests.get(f"{bagel_server.url}/v1/models", timeout=10).json()
    assert models["data"][0]["task"] == "image-generate-edit"


def test_http_edit_at_the_inputs_size(bagel_server, pipe):
    from vllm_omni.worker.model_runner import make_generators

    buf = io.BytesIO()
    _image(4).save(buf, "PNG")
    r = requests.post(f"{bagel_server.url}/v1/images/edits", json={
        "image": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(),
        "prompt": "make it blue", "num_inference_steps": STEPS, "seed": SEED,
        "cfg_img_scale": 1.5}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["size"] == "112x64"  # 80x48 in, encoded (and made) at 112x64
    want = pipe("make it blue", image=_image(4), num_inference_steps=STEPS, cfg_img_scale=1.5,
                generator=make_generators(SEED, 1)).images[0]
    np.testing.assert_array_equal(np.asarray(decode(r.json()["data"][0]["b64_json"])),
                                  np.asarray(want))


def test_http_multipart_edit_takes_list_options(bagel_server, pipe):
    """The openai client sends a list in a form as repeated ``name[]`` fields; curl users write
    one JSON array. Both reach the pipeline as the list."""
    import openai

    from vllm_omni.worker.model_runner import make_generators

    buf = io.BytesIO()
    _image(5).save(buf, "PNG")
    client = openai.OpenAI(base_url=f"{bagel_server.url}/v1", api_key="x")
    got = client.images.edit(image=("a.png", buf.getvalue(), "image/png"), prompt="make it blue",
                             extra_body={"num_inference_steps": STEPS, "seed": SEED,
                                         "cfg_interval": [0.5, 1.0]})
    want = pipe("make it blue", image=_image(5), num_inference_steps=STEPS,
                cfg_interval=[0.5, 1.0], generator=make_generators(SEED, 1)).images[0]
    np.testing.assert_array_equal(np.asarray(decode(got.data[0].b64_json)), np.asarray(want))
    r = requests.post(f"{bagel_server.url}/v1/images/edits", files={
        "image": ("a.png", buf.getvalue(), "image/png")}, data={
        "prompt": "make it blue", "num_inference_steps": str(STEPS), "seed": str(SEED),
        "cfg_interval": "[0.5, 1.0]"}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["b64_json"] == got.data[0].b64_json
    r = requests.post(f"{bagel_server.url}/v1/images/edits", files={
        "image": ("a.png", buf.getvalue(), "image/png")}, data={
        "prompt": "x", "cfg_interval": "0.5, 1.0"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "cfg_interval", r.text


@pytest.mark.parametrize("fields, param", [
    ({"negative_prompt": "blurry"}, "negative_prompt"),
    ({"guidance_scale": 3.0}, "guidance_scale"),
    ({"cfg_interval": [0.6, 0.2]}, "cfg_interval"),
    ({"cfg_interval": [0.1, 0.5, 0.9]}, "cfg_interval"),
    ({"cfg_renorm_type": "bogus"}, "cfg_renorm_type"),
    ({"cfg_text_scale": 1.0, "cfg_img_scale": 2.0}, "cfg_img_scale"),
    ({"timestep_shift": 0}, "timestep_shift"),
    ({"size": "256x256"}, "size"),  # the tiny position table stops at 128 px
])
def test_http_refuses_what_bagel_cannot_honour(bagel_server, fields, param):
    r = requests.post(f"{bagel_server.url}/v1/images/generations",
                      json={"prompt": PROMPT, "num_inference_steps": STEPS, **fields}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
