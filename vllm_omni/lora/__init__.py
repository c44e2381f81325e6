"""LoRA adapters: which files may load, and which adapters a request asks for.

The API side (this module) resolves a request's ``lora`` entries into ``LoraRef``s: a registered
name (``--lora-modules``) or a path, which must lie under ``--allowed-lora-dirs`` once every
symlink and ``..`` is resolved, and be safetensors (pickle files run code when loaded). The
worker side (``lora.feature``) loads them with diffusers' loaders and activates them per call.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from vllm_omni.engine.request import InvalidRequestError

# Weight files a LoRA directory holds, in the order diffusers and peft write them.
WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_SCALE = 100.0


@dataclass(frozen=True)
class LoraRef:
    """One adapter of a request: its name, its resolved weight file and its weight."""

    name: str
    path: str  # the real path of a .safetensors file
    scale: float = 1.0

    @property
    def key(self) -> str:
        """The adapter's name inside the model: one per file, whatever users call it."""
        return "lora_" + hashlib.sha256(self.path.encode()).hexdigest()[:16]


def weight_file(path: str, param: str = "lora") -> str:
    """The real path of the safetensors file ``path`` names (itself, or the one adapter file in
    a directory); a 400 naming the problem otherwise."""
    real = os.path.realpath(path)
    if os.path.isdir(real):
        for name in WEIGHT_NAMES:
            if os.path.isfile(os.path.join(real, name)):
                return weight_file(os.path.join(real, name), param)
        found = sorted(f for f in os.listdir(real) if f.endswith(".safetensors"))
        if len(found) == 1:
            return weight_file(os.path.join(real, found[0]), param)
        pickles = [f for f in os.listdir(real) if f.endswith(PICKLE_SUFFIXES)]
        why = (f"it holds {len(found)} .safetensors files; name one" if found else
               f"it holds only pickle files ({', '.join(sorted(pickles)[:3])}), which are refused: "
               "convert them to safetensors" if pickles else "it holds no .safetensors file")
        raise InvalidRequestError(f"LoRA directory {path!r}: {why}", param=param)
    if not os.path.isfile(real):
        raise InvalidRequestError(f"LoRA {path!r} does not exist", param=param)
    if real.endswith(PICKLE_SUFFIXES):
        raise InvalidRequestError(f"LoRA {path!r} is a pickle file, which can run code when "
                                  "loaded; only .safetensors adapters are accepted", param=param)
    if not real.endswith(".safetensors"):
        raise InvalidRequestError(f"LoRA {path!r} is not a .safetensors file", param=param)
    return real


@dataclass
class LoraRegistry:
    """What the server's flags allow: named adapters, the one applied to every request, the
    directories request paths may come from, and how many adapters may be active at once."""

    enabled: bool = False
    modules: dict[str, str] = field(default_factory=dict)  # name -> weight file
    static: LoraRef | None = None
    allowed_dirs: tuple[str, ...] = ()  # real paths
    max_loras: int = 1
    # POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's
    # VLLM_ALLOW_RUNTIME_LORA_UPDATING): names added at run time, their paths allowed as a
    # request's would be.
    runtime_updates: bool = False

    @classmethod
    def from_config(cls, config) -> "LoraRegistry":
        """Operator-given paths are checked now (a missing or pickle file fails start-up)."""
        def checked(path, flag):
            try:
                return weight_file(path)
            except InvalidRequestError as e:
                raise ValueError(f"{flag}: {e.message}") from None

        modules = {name: checked(path, f"lora_modules[{name!r}] (--lora-modules)")
                   for name, path in config.lora_modules.items()}
        static = None
        if config.lora_path is not None:
            static = LoraRef("lora-path", checked(config.lora_path, "lora_path (--lora-path)"))
        return cls(enabled=config.lora_enabled, modules=modules, static=static,
                   allowed_dirs=tuple(os.path.realpath(d) for d in config.allowed_lora_dirs),
                   max_loras=config.max_loras)

    # -- run-time updates --------------------------------------------------------------------------
    def add(self, name: str, path: str, replace: bool = False) -> None:
        """Registers ``name`` for ``path`` (a 400 ``InvalidRequestError`` if it may not load)."""
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise InvalidRequestError("lora_name must be 1-64 letters, digits, '.', '_' or '-', "
                                      f"got {name!r}", param="lora_name")
        if name in self.modules and not replace:
            raise InvalidRequestError(f"The lora adapter {name!r} has already been loaded; "
                                      "unload it first or set load_inplace", param="lora_name")
        try:
            ref = self._entry({"path": path})
        except InvalidRequestError as e:
            raise InvalidRequestError(e.message, param="lora_path") from None
        self.modules[name] = ref.path

    def remove(self, name: str) -> None:
        del self.modules[name]  # KeyError for a name never added

    def resolve(self, entries: Any, model_adapter: str | None = None) -> tuple[LoraRef, ...]:
        """A request's adapters: ``model_adapter`` (the name it gave as ``model``), then its
        ``lora`` entries (one ``{name, path, scale}`` object or a list of them), and the
        server's ``--lora-path`` adapter on every request."""
        if entries is None:
            entries = []
        elif isinstance(entries, dict):
            entries = [entries]
        if not isinstance(entries, (list, tuple)) or not all(isinstance(e, dict) for e in entries):
            raise InvalidRequestError("lora must be an object {name, path, scale} or a list of "
                                      "them", param="lora")
        if (entries or model_adapter) and not self.enabled:
            raise InvalidRequestError("this server runs without LoRA; start it with "
                                      "--enable-lora, --lora-modules or --lora-path",
                                      param="lora")
        # Counted before any is resolved: each costs file-system calls on the event loop.
        count = bool(model_adapter) + len(entries) + (self.static is not None)
        if count > self.max_loras:
            raise InvalidRequestError(
                f"{count} LoRA adapters in one request"
                + (" (with the server's --lora-path adapter)" if self.static else "")
                + f"; this server activates at most {self.max_loras} at once (--max-loras)",
                param="lora")
        refs = [LoraRef(model_adapter, self.modules[model_adapter])] if model_adapter else []
        refs += [self._entry(e) for e in entries]
        if self.static is not None:
            refs.append(self.static)
        keys = [r.key for r in refs]
        if len(set(keys)) != len(keys):
            raise InvalidRequestError("the same LoRA adapter is given twice; give it once with "
                                      "the scale you want", param="lora")
        return tuple(refs)

    def _entry(self, entry: dict) -> LoraRef:
        unknown = set(entry) - {"name", "path", "scale"}
        if unknown:
            raise InvalidRequestError(f"unknown lora field(s) {', '.join(sorted(unknown))}; "
                                      "an adapter is {name, path, scale}", param="lora")
        name, path, scale = entry.get("name"), entry.get("path"), entry.get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) \
                or not math.isfinite(scale) or abs(scale) > MAX_SCALE:
            raise InvalidRequestError(f"lora scale must be a finite number between "
                                      f"-{MAX_SCALE:g} and {MAX_SCALE:g}, got {scale!r}",
                                      param="lora")
        if name is not None and (not isinstance(name, str) or not NAME.fullmatch(name)):
            raise InvalidRequestError("lora name must be 1-64 letters, digits, '.', '_' or '-', "
                                      f"got {name!r}", param="lora")
        if path is None:
            if name is None:
                raise InvalidRequestError("a lora entry needs a name or a path", param="lora")
            if name not in self.modules:
                known = ", ".join(sorted(self.modules)) or "none"
                raise InvalidRequestError(f"no LoRA adapter named {name!r} on this server "
                                          f"(--lora-modules: {known}); give its path",
                                          param="lora")
            return LoraRef(name, self.modules[name], float(scale))
        if not isinstance(path, str) or not path or "\0" in path:
            raise InvalidRequestError("lora path must be a non-empty string", param="lora")
        if not self.allowed_dirs:
            raise InvalidRequestError("this server loads LoRA adapters from request paths only "
                                      "under --allowed-lora-dirs, and none is set; use a "
                                      "registered name", param="lora")
        def inside(p):
            return any(p.startswith(d.rstrip(os.sep) + os.sep) for d in self.allowed_dirs)

        outside = InvalidRequestError(f"LoRA path {path!r} is outside the directories this "
                                      "server loads adapters from (--allowed-lora-dirs)",
                                      param="lora")
        if not inside(os.path.realpath(path)):  # before looking: nothing is said about it
            raise outside
        file = weight_file(path)
        if not inside(file):  # a link inside the directory to a file elsewhere
            raise outside
        if name is not None and name in self.modules and self.modules[name] != file:
            raise InvalidRequestError(f"lora name {name!r} is a registered adapter with another "
                                      "file; give it without a path, or another name",
                                      param="lora")
        return LoraRef(name or os.path.basename(file), file, float(scale))
