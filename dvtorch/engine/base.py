"""What every engine shares: the snapshot of a model, capture hooks, the result contract."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from dvtorch.hooks import pool_activation, resolve_layers
from dvtorch.inception import DeepVariantInceptionV3

#: ``(probs [N, classes] float32, {layer: pooled rows [N, ...] float32})``, on the device.
Result = tuple[torch.Tensor, dict[str, torch.Tensor]]


def check_hookless(model: nn.Module) -> None:
    """Refuse a model with forward hooks: an engine runs a snapshot without them, and a
    patch meant to change the results must not be dropped without a word."""
    from torch.nn.modules import module as torch_module

    hooked = [name or type(model).__name__ for name, m in model.named_modules()
              if m._forward_hooks or m._forward_pre_hooks]
    if getattr(torch_module, "_global_forward_hooks", None) \
            or getattr(torch_module, "_global_forward_pre_hooks", None):
        hooked.append("every module (a global hook, register_module_forward_hook)")
    if hooked:
        raise ValueError(
            f"the model carries forward hooks on {', '.join(hooked[:5])}"
            + (" ..." if len(hooked) > 5 else "")
            + "; engines run a snapshot of the weights without hooks: run hook experiments "
              "on the model itself, or remove the hooks before building an engine")


def snapshot(model: nn.Module) -> DeepVariantInceptionV3:
    """A new model with a copy of ``model``'s weights in float32 (eval, no grad).

    A copy, so that what the engine does to its weights (folding, casting, packing) never
    touches the user's model; float32, so that BN folding is done from the full-precision
    weights whatever dtype the engine runs in.
    """
    if not isinstance(model, DeepVariantInceptionV3):
        raise TypeError(f"engines run DeepVariantInceptionV3 models, got {type(model).__name__}")
    with torch.device("meta"):
        copy = DeepVariantInceptionV3(model.input_shape, model.num_classes)
    state = {k: v.detach().to("cpu", torch.float32, copy=True)
             for k, v in model.state_dict().items()}
    copy.load_state_dict(state, strict=True, assign=True)
    copy.requires_grad_(False)
    return copy.eval()


class Engine:
    """Bulk inference of one model snapshot: ``engine(pixels) -> (probs, {layer: rows})``.

    ``submit(pixels)`` starts a batch and returns a getter of its result. A caller keeps at
    most ``ahead`` batches started and not yet taken after each submit (CPU: one per
    worker thread plus one queued), and takes results in submission order. Subclasses set
    ``ahead`` and implement :meth:`submit`.
    """

    name = "engine"
    ahead = 1

    def __init__(self, layers: Sequence[str], pool: str | None):
        self.layers = list(layers)
        self.pool = pool
        # Hooks write into the calling thread's slot, so that forwards running side by
        # side on worker threads each collect their own batch's captures.
        self._slot = threading.local()

    def submit(self, pixels: torch.Tensor) -> Callable[[], Result]:
        raise NotImplementedError

    def __call__(self, pixels: torch.Tensor) -> Result:
        return self.submit(pixels)()

    def describe(self) -> dict[str, Any]:
        """What store.json records about how the rows were computed."""
        return {"engine": self.name}

    def _install_captures(self, model: nn.Module) -> None:
        for name, module in resolve_layers(model, self.layers):
            module.register_forward_hook(self._capture_hook(name))

    def _capture_hook(self, name: str) -> Callable:
        slot, pool = self._slot, self.pool

        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            acts = getattr(slot, "acts", None)
            if acts is not None:
                acts[name] = pool_activation(output, pool)
        return hook

    def _forward(self, model: Callable[[torch.Tensor], torch.Tensor],
                 pixels: torch.Tensor) -> Result:
        """One forward in this thread, with this thread's captures."""
        self._slot.acts = {}
        try:
            with torch.inference_mode():
                probs = model(pixels)
            acts = self._slot.acts
        finally:
            self._slot.acts = None
        missing = [n for n in self.layers if n not in acts]
        if missing:
            raise RuntimeError(f"the forward did not reach {missing}")
        return probs, acts
