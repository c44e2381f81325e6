"""What the runner hangs on a pipeline call's steps: step ends for pipelines without a step
callback, when previews decode, the finite check, where a lone rank may stop a cancelled request,
and the record of where the time went."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field

import torch


@contextlib.contextmanager
def scheduler_steps(pipe, on_step):
    """Calls ``on_step`` after each ``scheduler.step``, for pipelines without a step callback
    (LongCat): the same (pipe, step, timestep, {"latents": ...}) a callback would get."""
    scheduler = pipe.scheduler
    step_fn, count = scheduler.step, [0]

    @functools.wraps(step_fn)
    def step(model_output, timestep, sample, *args, **kwargs):
        out = step_fn(model_output, timestep, sample, *args, **kwargs)
        latents = out[0] if isinstance(out, tuple) else out.prev_sample
        on_step(pipe, count[0], timestep, {"latents": latents})
        count[0] += 1
        return out

    scheduler.step = step
    try:
        yield
    finally:
        del scheduler.step


def preview_steps(total: int, count: int) -> list[int]:
    """The (0-based) steps after which the ``count`` partial images are decoded: evenly spread,
    never the last step (the final image follows it)."""
    if count <= 0 or total < 2:
        return []
    return sorted({min(total - 2, max(0, round(total * (j + 1) / (count + 1)) - 1))
                   for j in range(count)})


class NonFiniteError(RuntimeError):
    """The numbers went to NaN or infinity: the image would come out black or noise."""


def check_finite(x: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError(f"{what} contain NaN or infinite values (numerical overflow; try "
                             "other settings, e.g. a lower guidance scale or more steps)")


class RequestCancelled(Exception):
    """Raised at a step end on every rank when the engine cancelled the request."""


def cancel_points(denoisers: list[torch.nn.Module], vae) -> list[torch.nn.Module]:
    """Where a lone rank checks for cancellation: each block of the denoisers' block stacks
    (the ModuleLists directly under a denoiser), and each layer with weights of the VAE decoder
    (its convolutions and norms: at full resolution a single residual block of a large image
    takes seconds on a CPU; each tile of a tiled decode runs them again)."""
    points = []
    for model in denoisers:
        for child in model.children():
            if isinstance(child, torch.nn.ModuleList):
                points.extend(child)
    decoder = getattr(vae, "decoder", None)
    if isinstance(decoder, torch.nn.Module):
        points.extend(m for m in decoder.modules()
                      if next(m.parameters(recurse=False), None) is not None)
    return points


@dataclass
class StepTiming:
    """Where one request's time went, filled by the step callback and the timing hooks."""

    steps: int = 0
    cancelled: list[int] = field(default_factory=list)  # per request: its cancel code, 0 if none
    denoise_start: float | None = None  # the first transformer call
    denoise_end: float | None = None  # the last step end
    decode_start: float = 0.0  # the VAE decoder's current call
    vae_s: float = 0.0

    @property
    def denoise_s(self) -> float:
        if self.denoise_start is None or self.denoise_end is None:
            return 0.0
        return self.denoise_end - self.denoise_start
