"""Weights off the compute device until they run.

Two granularities, one feature (the support matrix's "CPU Offload" column):

* **model-level** (``--enable-cpu-offload``): every pipeline component (text encoders,
  transformers, VAE, image encoder) is one unit; only the one running is on the device. An
  accelerate ``ModelHook`` on each component onloads it before its forward (and before a VAE's
  ``encode``/``decode``, which diffusers routes through the same hook) and offloads the one that
  was resident, so diffusers' ``_execution_device`` finds the device from the hooks as it does
  under ``enable_model_cpu_offload``.
* **layerwise** (``--enable-layerwise-offload``): each denoiser's blocks are units; the rest of the
  pipeline stays resident. On a GPU this is diffusers' group offloading (block level, one block
  per group, the next block prefetched on a side stream).

Where an offloaded unit's tensors live: on a GPU, a pinned host copy made once (onload is one
async copy, offload drops the device copy; weights never change, so nothing is copied back). On
a CPU the device *is* host memory, so a unit lives in a file instead and is read back when it
runs: the resident set holds one unit at a time. The files are unlinked as soon as they are
open, so a killed worker leaves nothing on disk.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import tempfile
from typing import Any

import torch
from accelerate.hooks import ModelHook
from accelerate.utils import send_to_device

from vllm_omni.features import Feature

logger = logging.getLogger("vllm_omni")


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return list(dict.fromkeys([*module.parameters(), *module.buffers()]))


def _trim_heap() -> None:
    """Gives freed heap pages back to the OS (glibc keeps them otherwise, and the resident set
    would not shrink when a unit is dropped)."""
    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):
            pass


_ALIGN = 64


def _at_alignment(src: torch.Tensor, align: int) -> torch.Tensor:
    """A copy of ``src`` whose address is ``align`` modulo 64 bytes. CPU BLAS kernels choose
    their code path by address alignment, so a weight read back at a different one gives
    results that differ in the last bits; read back where it was loaded, outputs stay equal."""
    n = src.numel() * src.element_size()
    buf = torch.empty(n + _ALIGN, dtype=torch.uint8)
    start = (align - buf.data_ptr()) % _ALIGN
    if start % src.element_size():
        return src.clone()
    return buf[start:start + n].view(src.dtype).view(src.shape).copy_(src)


class Unit:
    """One offloaded module: its tensors' home off the device, and moves to and from it."""

    def __init__(self, module: torch.nn.Module, device: torch.device, spill_dir: str | None):
        self.module, self.device = module, device
        self.tensors = _tensors(module)
        self.on_device = True
        if device.type == "cpu":
            import safetensors.torch

            self.align = [t.data_ptr() % _ALIGN for t in self.tensors]
            self.file = tempfile.TemporaryFile(dir=spill_dir)  # already unlinked
            self.file.write(safetensors.torch.save(
                {str(i): t.data.contiguous() for i, t in enumerate(self.tensors)}))
            self.file.flush()
            self.pinned = None
        else:
            self.file = None
            pin = torch.cuda.is_available()
            self.pinned = [t.data.to("cpu").pin_memory() if pin else t.data.to("cpu")
                           for t in self.tensors]
        self.offload()

    def onload(self) -> None:
        if self.on_device:
            return
        if self.file is not None:
            import safetensors.torch

            state = safetensors.torch.load_file(f"/proc/self/fd/{self.file.fileno()}")
            for i, (t, align) in enumerate(zip(self.tensors, self.align)):
                t.data = _at_alignment(state[str(i)], align)
        else:
            for t, home in zip(self.tensors, self.pinned):
                t.data = home.to(self.device, non_blocking=True)
        self.on_device = True

    def offload(self) -> None:
        if not self.on_device:
            return
        if self.file is not None:
            for t in self.tensors:
                t.data = torch.empty(0, dtype=t.dtype)
            _trim_heap()
        else:
            for t, home in zip(self.tensors, self.pinned):
                t.data = home
        self.on_device = False

    def restore(self) -> None:
        """Back on the device for good, its home released."""
        self.onload()
        if self.file is not None:
            self.file.close()
        self.pinned = None


class ComponentHook(ModelHook):
    """An accelerate hook on one pipeline component: onload before it runs (forward, or a VAE's
    encode/decode), the previously resident component offloaded first."""

    def __init__(self, offloader: "OffloadFeature", unit: Unit):
        self.offloader, self.unit = offloader, unit
        self.execution_device = unit.device  # what diffusers' _execution_device reads

    def pre_forward(self, module, *args, **kwargs):
        self.offloader.make_resident(self.unit)
        return send_to_device(args, self.unit.device), send_to_device(kwargs, self.unit.device)


def _block_stacks(model: torch.nn.Module) -> list[torch.nn.ModuleList]:
    """The denoiser's block stacks: its direct ModuleList children (as diffusers' block-level
    group offloading finds them)."""
    return [m for m in model.children() if isinstance(m, torch.nn.ModuleList)]


class OffloadFeature(Feature):
    name = "cpu_offload"
    places_model = True  # it decides what is on the device; the runner does not move the pipe

    def apply(self, pipe, groups) -> None:
        self.groups = groups
        device = self.device
        self.mode = "layerwise" if self.config.enable_layerwise_offload else "model"
        self.units: list[Unit] = []
        self.resident: Unit | None = None
        self.hooked: list[torch.nn.Module] = []
        self.block_hooks: list[Any] = []
        self.group_offloaded: list[torch.nn.Module] = []
        spill = os.environ.get("VLLM_OMNI_OFFLOAD_DIR") or None  # where CPU units' files go
        if self.mode == "model":
            from accelerate.hooks import add_hook_to_module

            for module in pipe.components.values():
                if isinstance(module, torch.nn.Module):
                    unit = Unit(module, device, spill)
                    self.units.append(unit)
                    add_hook_to_module(module, ComponentHook(self, unit))
                    self.hooked.append(module)
        else:
            denoisers = self.denoisers(pipe)
            for module in pipe.components.values():
                if isinstance(module, torch.nn.Module) and module not in denoisers:
                    module.to(device)
            for model in denoisers:
                self._layerwise(model, device, spill)
        logger.info("offload (%s) on %s: %d units off the device between uses%s", self.mode,
                    device, len(self.units) or sum(len(s) for m in self.group_offloaded
                                                    for s in _block_stacks(m)),
                    "; their weights stream from disk" if device.type == "cpu" else "")

    def _layerwise(self, model: torch.nn.Module, device: torch.device, spill: str | None) -> None:
        if device.type == "cuda":
            from diffusers.hooks import apply_group_offloading

            apply_group_offloading(model, onload_device=device, offload_device=torch.device("cpu"),
                                   offload_type="block_level", num_blocks_per_group=1,
                                   use_stream=True, non_blocking=True)
            self.group_offloaded.append(model)
            return
        # CPU: each block read from its file when it runs and dropped after.
        for stack in _block_stacks(model):
            for block in stack:
                unit = Unit(block, device, spill)
                self.units.append(unit)
                self.block_hooks.append(block.register_forward_pre_hook(
                    lambda m, args, unit=unit: unit.onload()))
                self.block_hooks.append(block.register_forward_hook(
                    lambda m, args, out, unit=unit: unit.offload()))
        model.to(device)

    def make_resident(self, unit: Unit) -> None:
        # Step batching: calls swap components only on their turn, never while a round's
        # forwards run (StepBatcher.ready).
        if self.resident is not unit:
            if self.resident is not None:
                self.resident.offload()
            unit.onload()
            self.resident = unit

    def stats(self) -> dict[str, Any]:
        return {"offload_mode": self.mode}

    def remove(self) -> None:
        from accelerate.hooks import remove_hook_from_module

        for h in self.block_hooks:
            h.remove()
        for module in self.hooked:
            remove_hook_from_module(module)
        for unit in self.units:
            unit.restore()
        for model in self.group_offloaded:
            from diffusers.hooks import HookRegistry

            registry = HookRegistry.check_if_exists_or_initialize(model)
            for hook in ("group_offloading", "layer_execution_tracker",
                         "lazy_prefetch_group_offloading"):
                registry.remove_hook(hook, recurse=True)
            model.to(self.device)
        self.units, self.hooked, self.block_hooks, self.group_offloaded = [], [], [], []
        self.resident = None
