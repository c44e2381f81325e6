"""LoRA in the worker: adapters loaded with diffusers' loaders (every format they convert:
diffusers, peft, kohya keys), kept unfused, and activated per pipeline call with
``set_adapters`` and each request's scales, so switching adapters changes no base weight.

At most ``max_loras`` adapters sit in the model; loading another evicts the least recently used
(``delete_adapters``). Their state dicts stay in host memory, up to ``max_cpu_loras``, so an
evicted adapter comes back without reading its file again. Under CPU offload the adapters stay
on the compute device while the base weights come and go.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections import OrderedDict
from typing import Any

from vllm_omni.engine.request import InvalidRequestError
from vllm_omni.features import Feature
from vllm_omni.utils import tasks

logger = logging.getLogger(__name__)


class LoraFeature(Feature):
    name = "lora"

    def apply(self, pipe, groups) -> None:
        self.pipe, self.groups = pipe, groups
        self.batcher = None
        self.in_use: dict[Any, set[str]] = {}  # step batching: a call's task -> its adapters
        self.loaded: OrderedDict[str, Any] = OrderedDict()  # key -> LoraRef, least recent first
        self.host: OrderedDict[str, dict] = OrderedDict()  # key -> state dict
        self.max_host = self.config.max_cpu_loras or self.config.max_loras
        self.active: tuple = ()
        self.switch_s = 0.0
        self.by_pipeline = hasattr(pipe, "load_lora_weights")
        if not self.by_pipeline:
            with_adapter_loader(pipe.transformer)

    def use_batcher(self, batcher) -> None:
        """Calls with different adapter sets run side by side: each loads its adapters, tags
        its forwards with its set, and the set is activated before each batched forward (only
        forwards with equal sets share one)."""
        self.batcher = batcher
        batcher.before_forward.append(lambda group: self.activate(group[0].tag))

    # -- per call --------------------------------------------------------------------------------
    def prepare_call(self, reqs) -> None:
        refs = reqs[0].loras  # a batch shares its adapters (the batch key includes them)
        wanted = tuple((r.key, r.scale) for r in refs)
        if self.batcher is not None:
            self._prepare_side_by_side(refs, wanted)
            return
        if wanted == self.active:
            self.switch_s = 0.0
            return
        t0 = time.perf_counter()
        # Unknown until the set below is in place: a load that fails half-way (diffusers may
        # have activated what it loaded) must not leave the next call trusting the old set.
        self.active = None
        for ref in refs:
            self._load(ref, keep={r.key for r in refs})
        self.activate(wanted)
        self.switch_s = time.perf_counter() - t0

    def _prepare_side_by_side(self, refs, wanted: tuple) -> None:
        """Step batching: load this call's adapters (never evicting one a running call uses;
        the model may briefly hold more than ``max_loras``) and tag its forwards."""
        me = tasks.current()
        # On this call's turn: no round's forwards run meanwhile (StepBatcher.ready).
        self.in_use = {k: v for k, v in self.in_use.items() if not k.dead and k is not me}
        busy = set().union(*self.in_use.values()) if self.in_use else set()
        t0, before = time.perf_counter(), set(self.loaded)
        for ref in refs:
            self._load(ref, keep=busy | {r.key for r in refs})
        if set(self.loaded) != before:  # diffusers may have activated what it loaded
            self.active = None
        self.switch_s = time.perf_counter() - t0
        self.in_use[me] = {r.key for r in refs}
        self.batcher.local.tag = wanted

    def activate(self, tag) -> None:
        """Puts an adapter set in place (before a batched forward: the one its calls were
        tagged with)."""
        wanted = tag or ()
        if wanted == self.active:
            return
        self.active = None  # unknown until set (see prepare_call)
        if wanted:
            self._set([k for k, _ in wanted], [s for _, s in wanted])
        elif self.loaded:
            self._disable()
        self.active = wanted

    def stats(self) -> dict[str, Any]:
        active = self.active if self.batcher is None else getattr(self.batcher.local, "tag", ())
        return {"lora_adapters": len(active or ()), "lora_switch_s": self.switch_s}

    # -- loading ---------------------------------------------------------------------------------
    def _load(self, ref, keep: set[str]) -> None:
        if ref.key in self.loaded:
            self.loaded.move_to_end(ref.key)
            return
        while len(self.loaded) >= self.config.max_loras:
            old = next((k for k in self.loaded if k not in keep), None)
            if old is None:  # step batching: each is in use by a running call; hold one more
                break
            logger.info("evicting LoRA %s (--max-loras %d)", self.loaded[old].name,
                        self.config.max_loras)
            self._delete(old)
            self.active = ()
        state = self._state_dict(ref)
        try:
            self._load_state(self._for_ranks(state, ref), ref.key)
        except InvalidRequestError:
            raise
        except Exception as e:  # shapes or keys that do not fit this model
            self._delete(ref.key, missing_ok=True)
            raise InvalidRequestError(f"LoRA {ref.name!r} does not fit "
                                      f"{self.adapter.spec.pipeline_class}: "
                                      f"{type(e).__name__}: {str(e)[:300]}", param="lora") from None
        if ref.key not in self._names():
            raise InvalidRequestError(f"LoRA {ref.name!r} matches no layer of "
                                      f"{self.adapter.spec.pipeline_class}'s transformer",
                                      param="lora")
        if self.config.parallel.tensor_parallel_size > 1:
            from vllm_omni.distributed.tensor_parallel import reduce_lora_inputs

            for denoiser in self.denoisers(self.pipe):
                reduce_lora_inputs(denoiser)
        if self.config.enable_cpu_offload or self.config.enable_layerwise_offload:
            self._keep_on_device()
        self.loaded[ref.key] = ref

    def _keep_on_device(self) -> None:
        """Under offload, peft creates an adapter beside its base weight, which is off the device
        between runs; the offload units know only the weights they were built with. Adapters are
        small: they stay on the compute device for good."""
        for denoiser in self.denoisers(self.pipe):
            for name, p in denoiser.named_parameters():
                if ".lora_" in name and p.device != self.device:
                    p.data = p.data.to(self.device)

    def _for_ranks(self, state: dict, ref) -> dict:
        """A copy of ``state`` (the loaders pop from the dict they get) with the factors of
        tensor-parallel layers cut to this rank's parts."""
        if self.config.parallel.tensor_parallel_size <= 1:
            return dict(state)
        from vllm_omni.distributed.tensor_parallel import shard_lora_state

        if self.by_pipeline and not all(k.startswith("transformer.") for k in state):
            # Another format (kohya, ...): diffusers' converter gives its own keys, which are
            # the ones we can cut. Its network alphas (kept apart by some converters, dropped
            # unless asked for by FLUX's) are folded into the B factors.
            ask = "return_alphas" in inspect.signature(self.pipe.lora_state_dict).parameters
            converted = self.pipe.lora_state_dict(dict(state), **(
                {"return_alphas": True} if ask else {}))
            state, alphas = (converted[0], converted[1]) if isinstance(converted, tuple) else (
                converted, None)
            state = fold_alphas(state, alphas or {})
        return shard_lora_state(state, self.pipe.transformer)

    def _state_dict(self, ref) -> dict:
        if ref.key in self.host:
            self.host.move_to_end(ref.key)
            return self.host[ref.key]
        from safetensors.torch import load_file

        try:
            state = load_file(ref.path)
        except Exception as e:
            raise InvalidRequestError(f"LoRA {ref.name!r} could not be read: "
                                      f"{type(e).__name__}: {str(e)[:200]}",
                                      param="lora") from None
        self.host[ref.key] = state
        while len(self.host) > self.max_host:
            self.host.popitem(last=False)
        return state

    # -- diffusers ---------------------------------------------------------------------------------
    def _load_state(self, state: dict, key: str) -> None:
        pipe = self.pipe
        if self.by_pipeline:
            extra = {}
            if getattr(pipe, "transformer_2", None) is not None:
                extra["load_into_transformer_2"] = True  # Wan2.2 A14B: both experts
            pipe.load_lora_weights(state, adapter_name=key, **extra)
        else:  # a pipeline without a loader mixin: diffusers' model-level loader
            pipe.transformer.load_lora_adapter(state, prefix="transformer", adapter_name=key)

    def _names(self) -> set[str]:
        if self.by_pipeline:
            return {n for names in self.pipe.get_list_adapters().values() for n in names}
        return set(getattr(self.pipe.transformer, "peft_config", {}) or {})

    def _set(self, keys: list[str], scales: list[float]) -> None:
        if self.by_pipeline:
            self.pipe.enable_lora()
            self.pipe.set_adapters(keys, adapter_weights=scales)
        else:
            self.pipe.transformer.enable_lora()
            self.pipe.transformer.set_adapters(keys, weights=scales)

    def _disable(self) -> None:
        (self.pipe if self.by_pipeline else self.pipe.transformer).disable_lora()

    def _delete(self, key: str, missing_ok: bool = False) -> None:
        if missing_ok and key not in self._names():
            return
        (self.pipe if self.by_pipeline else self.pipe.transformer).delete_adapters(key)
        self.loaded.pop(key, None)

    def remove(self) -> None:
        for key in list(self.loaded):
            self._delete(key)
        self.active = ()


def fold_alphas(state: dict, alphas: dict) -> dict:
    """``state`` with each module's network alpha (``<module>.alpha``) folded into its B factor
    as ``alpha / rank``, the scale peft would apply, so the factors alone give the delta."""
    state = dict(state)
    for key, alpha in alphas.items():
        module = key.removesuffix(".alpha")
        a, b = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        if a not in state or b not in state:
            raise InvalidRequestError(f"LoRA alpha {key!r} has no lora_A/lora_B factors",
                                      param="lora")
        state[b] = state[b] * (float(alpha) / state[a].shape[0])
    return state


def with_adapter_loader(model) -> None:
    """Gives ``model`` diffusers' model-level adapter API (``PeftAdapterMixin``:
    ``load_lora_adapter``, ``set_adapters``, ...) where its class lacks it (StableAudioDiTModel):
    the instance becomes a subclass with the mixin, so the loading is still diffusers' own."""
    from diffusers.loaders.peft import PeftAdapterMixin

    cls = type(model)
    if not issubclass(cls, PeftAdapterMixin):
        model.__class__ = type(cls.__name__, (PeftAdapterMixin, cls),
                               {"__module__": cls.__module__})
