"""The ``--omni`` hook in stock vLLM's CLI and our flag handling."""

import os
import subprocess
import sys
import time

import pytest

VLLM = os.path.join(os.path.dirname(sys.executable), "vllm")


def refused(capsys, *argv) -> str:
    """``vllm serve ARGV --omni`` past stock vLLM's hook (whose routing the two subprocess tests
    here cover), in this process: it must exit with status 2 before starting anything; its stderr.
    A process start costs ~20 s of vLLM imports; these checks need none."""
    from vllm_omni.entrypoints.cli.main import _serve

    with pytest.raises(SystemExit) as e:
        _serve(["serve", *argv, "--omni"], None)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_help_lists_omni_flags(capsys):
    from vllm_omni.entrypoints.cli.main import _serve

    with pytest.raises(SystemExit) as e:
        _serve(["serve", "--omni", "--help"], None)
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--usp", "--ring", "--cfg-parallel-size", "--vae-patch-parallel-size",
                 "--cache-backend", "--cache-config", "--enable-cpu-offload", "--lora-path",
                 "--enable-layerwise-offload", "--quantization-config",
                 "--no-step-batching", "--api-key", "--served-model-name", "--port"):
        assert flag in out, flag


def test_rejects_vllm_flags_it_would_ignore(tiny_qwen_image):
    import psutil

    # Its own session, so that whatever it started can be found afterwards.
    p = subprocess.Popen([VLLM, "serve", tiny_qwen_image, "--omni", "--max-model-len", "128"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == 2
    assert "--max-model-len" in stderr and "no meaning for diffusion" in stderr
    # The engine core it started before parsing (and that core's fork server, mid-import) went
    # with it: nothing of that session is left running.
    # (A killed process may take a moment to be gone from the table; a fork server left to
    # finish its imports would live for seconds.)
    deadline = time.monotonic() + 2
    while True:
        left = [q for q in psutil.process_iter(["pid", "status"])
                if q.info["status"] != psutil.STATUS_ZOMBIE and _session(q) == p.pid]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not left, [q.info for q in left]


def _session(proc) -> int | None:
    try:
        return os.getsid(proc.pid)
    except OSError:
        return None


def test_rejects_impossible_layout_before_starting(tiny_qwen_image, capsys):
    # The tiny model has 2 heads: Ulysses 3 cannot split them; the message names --usp 2.
    err = refused(capsys, tiny_qwen_image, "--usp", "3")
    assert "2 attention heads" in err and "--usp 2" in err
    err = refused(capsys, tiny_qwen_image, "--usp", "2", "--vae-patch-parallel-size", "4")
    assert "vae_patch_parallel_size <= 2" in err
    assert "not valid JSON" in refused(capsys, tiny_qwen_image, "--cache-config", "{bad")
    # vLLM's parser takes it; the diffusion engine has no single-process executor.
    err = refused(capsys, tiny_qwen_image, "--distributed-executor-backend", "uni")
    assert "must be one of mp, ray" in err


def test_refuses_an_empty_api_key(tiny_qwen_image, capsys, monkeypatch):
    """``--api-key "$KEY"`` with KEY unset: vLLM's parser makes the key None, which must neither
    become the key "None" nor leave the server open."""
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    for keys in ([""], ["", "sk-real"]):
        assert "--api-key: a key is empty" in refused(capsys, tiny_qwen_image, "--api-key", *keys)


def test_rejects_unknown_model_dir(tmp_path, capsys):
    err = refused(capsys, str(tmp_path / "missing"))
    assert "neither a pipeline directory nor a hub id" in err


def test_without_omni_vllm_cli_does_not_reach_us():
    code = ("import sys; sys.argv = ['vllm', 'serve', 'some/model'];"
            "from vllm.entrypoints.cli.main import maybe_run_omni;"
            "assert maybe_run_omni() is False;"
            "assert 'vllm_omni.entrypoints.cli.main' not in sys.modules; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_general_plugin_entry_point_is_registered():
    from importlib.metadata import entry_points

    eps = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert eps.get("vllm_omni") == "vllm_omni.plugin:register"
    from vllm_omni.plugin import register

    register()  # idempotent, cheap


def test_refuses_features_outside_the_models_support_matrix(tiny_models, capsys):
    # FLUX.1-dev: Cache-DiT, tensor parallel and LoRA only (README model table).
    err = refused(capsys, tiny_models["flux.1-dev"], "--cache-backend", "tea_cache")
    assert "does not support TeaCache" in err, err
    assert "Supported with this model: Cache-DiT, Tensor Parallel, LoRA\n" in err
