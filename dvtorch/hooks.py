"""Hook points of the model, named like DeepVariant's Keras layers: read, patch, cache.

::

    with capture(model, ["mixed5", "mixed7"], pool="max") as acts:   # read
        probs = model(x)
    acts["mixed5"]            # [N, 768], on the model's device

    with patch(model, {"mixed5": lambda out, name: out * 0}):         # write
        probs = model(x)

    probs, cache = run_with_cache(model, x, names_filter=["mixed5"])  # both at once

One hook signature: a patch function gets ``(output, name)`` and returns a replacement
output, or None to keep it (it may also just look). ``capture`` and ``patch`` nest, in one
forward: a capture on a patched layer sees the patched output (patches are applied first
whichever ``with`` came first). Hooks are removed when the ``with`` block exits, including
on an exception, so a failed batch never leaves a model that keeps capturing or patching.
Activations inside the model are NCHW (the NHWC input is permuted on entry).

Pooling is done inside the hook, on the device, so that only ``[N, C]`` rows ever need to
leave the GPU (a flattened mixed5 map is 48x larger). Layouts follow Keras/NHWC, the
convention of the DeepVariant graph: ``flatten`` rows are in H, W, C order (Keras
``Flatten`` on NHWC), which differs from a naive NCHW ``reshape``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from dvtorch.layers import all_layer_names, resolve

POOLS = ("max", "mean", "flatten", None)

Names = str | Iterable[str] | Callable[[str], bool]


def pool_activation(t: torch.Tensor, pool: str | None) -> torch.Tensor:
    """Reduce one layer output (NCHW logical layout, or ``[N, C]`` vectors) for storage.

    * ``"max"`` / ``"mean"``: over H and W -> ``[N, C]``
    * ``"flatten"``: ``[N, H*W*C]`` in H, W, C order (Keras Flatten of the NHWC map)
    * ``None``: the NHWC map ``[N, H, W, C]``

    Vector outputs (``avg_pool``, ``logits``, ``classification``) are returned unchanged by
    every mode: there is nothing to pool. bfloat16/float16 results are returned as float32.
    """
    check_pool(pool)
    if t.dim() == 2:
        return _as_float32(t)
    if t.dim() != 4:
        raise ValueError(f"expected a [N, C, H, W] or [N, C] activation, got {list(t.shape)}")
    if pool == "max":
        return _as_float32(t.amax(dim=(2, 3)))
    if pool == "mean":
        # Accumulate in float32 so that bf16 maps are averaged without extra rounding.
        return t.mean(dim=(2, 3), dtype=torch.float32)
    nhwc = t.permute(0, 2, 3, 1)
    if pool == "flatten":
        return _as_float32(nhwc.reshape(t.shape[0], -1))
    return _as_float32(nhwc.contiguous())


def _as_float32(t: torch.Tensor) -> torch.Tensor:
    """Half-precision captures become float32: numpy has no bfloat16, and the stored rows
    of a bf16 model should not need a dtype special case downstream."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def check_pool(pool: str | None) -> None:
    """Refuse a pooling mode :func:`pool_activation` does not know."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")


def resolve_layers(model: nn.Module, names: list[str]) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` for each of ``names``: duplicates and unknown names refused
    (before any hook is registered; also by engines that capture in a traced program)."""
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate layer names in {names}")
    return [(n, resolve(model, n)) for n in names]


def _select(model: nn.Module, names: Names) -> list[str]:
    """Normalise ``names``: one name, a list of names, or a predicate over all layer names."""
    if isinstance(names, str):
        return [names]
    if callable(names):
        chosen = [n for n in all_layer_names(model) if names(n)]
        if not chosen:
            raise ValueError("the names filter selected no layer")
        return chosen
    chosen = list(names)
    if not chosen:
        raise ValueError("no layer names given")
    return chosen


class Activations(Mapping):
    """Read-only mapping name -> captured tensor, filled by the hooks of :func:`capture`.

    Indexing a layer that the last forward did not reach raises a KeyError that says so
    (rather than silently returning stale data from an earlier batch).
    """

    def __init__(self, names: list[str], pool: str | None):
        self.names = names
        self.pool = pool
        self._data: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._data:
            if name in self.names:
                raise KeyError(f"layer {name!r} was requested but no forward pass has reached it")
            raise KeyError(f"layer {name!r} was not requested; captured: {self.names}")
        return self._data[name]

    def __iter__(self) -> Iterator[str]:
        return iter([n for n in self.names if n in self._data])

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        """Forget the last batch (the next forward refills)."""
        self._data.clear()

    def _store(self, name: str, t: torch.Tensor) -> None:
        self._data[name] = t


@contextmanager
def capture(model: nn.Module, names: Names, pool: str | None = "max") -> Iterator[Activations]:
    """Context manager: forward hooks on ``names`` that store pooled, detached outputs.

    ``names`` is a layer name, a list of names, or a predicate ``f(name) -> bool`` evaluated
    over :func:`dvtorch.layers.all_layer_names` (TransformerLens-style ``names_filter``).
    Each forward replaces the previous batch's tensors (a layer the last forward did not
    reach raises KeyError). Tensors stay on the model's device.
    """
    check_pool(pool)
    chosen = _select(model, names)
    modules = resolve_layers(model, chosen)  # raises on unknown names first
    acts = Activations(chosen, pool)

    def make_hook(name: str) -> Callable:
        def hook(_module: nn.Module, _inputs, output: torch.Tensor) -> None:
            acts._store(name, pool_activation(output.detach(), pool))
        return hook

    def new_forward(_module: nn.Module, _inputs) -> None:
        # Each forward starts empty, so a layer it does not reach (it raised, or a hook
        # stopped it early) is a KeyError, not the previous batch's tensor.
        acts.clear()

    hooks = [(model, model.register_forward_pre_hook(new_forward))]
    with _removing(hooks):
        for n, m in modules:
            hooks.append((m, m.register_forward_hook(make_hook(n))))
        yield acts


#: ``fn(output, name) -> new output or None`` (None: keep the output as it is).
PatchFn = Callable[[torch.Tensor, str], "torch.Tensor | None"]


@contextmanager
def patch(model: nn.Module, patches: Mapping[str, PatchFn]) -> Iterator[None]:
    """Context manager: replace layer outputs during forwards (ablation, activation patching).

    ``patches`` maps a layer name to ``fn(output, name)``, which returns the output to use
    instead (a tensor of the same shape, dtype and device; NCHW maps), or None to keep it.
    Patches run before any :func:`capture` hook on the same layer, so captures read what
    the rest of the network sees. Nested patches of one layer run outermost first: an
    inner patch gets the outer one's output and has the last word (zero every channel
    outside, restore one inside). Gradients flow through what the function returns.
    """
    if not patches:
        raise ValueError("no patches given")
    for name, fn in patches.items():
        if not callable(fn):
            raise TypeError(f"patch for {name!r} must be callable as fn(output, name), got "
                            f"{type(fn).__name__}")
    modules = resolve_layers(model, list(patches))

    def make_hook(name: str, fn: PatchFn) -> Callable:
        def hook(_module: nn.Module, _inputs, output: torch.Tensor) -> torch.Tensor | None:
            new = fn(output, name)
            if new is not None:
                _check_patched(name, new, output)
            return new
        setattr(hook, _PATCH_MARK, True)
        return hook

    hooks: list = []
    with _removing(hooks):
        for name, m in modules:
            handle = m.register_forward_hook(make_hook(name, patches[name]), prepend=True)
            _after_earlier_patches(m, handle.id)
            hooks.append((m, handle))
        yield


_PATCH_MARK = "_dvtorch_patch"


def _check_patched(name: str, new: Any, output: torch.Tensor) -> None:
    """A patch must return what the next layer can take in place of ``output``."""
    if not isinstance(new, torch.Tensor):
        raise TypeError(f"patch for {name!r} returned {type(new).__name__}; return a tensor "
                        "like the layer's output, or None to keep it")
    for what, got, want in (("shape", list(new.shape), list(output.shape)),
                            ("dtype", new.dtype, output.dtype),
                            ("device", new.device, output.device)):
        if got != want:
            raise ValueError(f"patch for {name!r} returned {what} {got}; the layer's output "
                             f"has {what} {want}")


def _after_earlier_patches(module: nn.Module, hook_id: int) -> None:
    """Move the just-prepended patch hook behind the patches registered before it, so that
    patches run in the order they were entered, all of them before any capture hook.
    (``register_forward_hook`` can only append or prepend; the order is its dict's.)"""
    hooks = module._forward_hooks
    new = hooks.pop(hook_id)
    ordered = list(hooks.items())
    first_other = next((i for i, (_, h) in enumerate(ordered)
                        if not getattr(h, _PATCH_MARK, False)), len(ordered))
    ordered.insert(first_other, (hook_id, new))
    hooks.clear()
    hooks.update(ordered)


def run_with_cache(model: nn.Module, x: torch.Tensor, names_filter: Names | None = None,
                   pool: str | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(probs, cache)``: one forward, and every selected layer's output by name.

    ``names_filter`` as in :func:`capture` (default: :data:`dvtorch.layers.LAYER_NAMES`,
    the stem, mixed0..mixed10 and the head); ``pool=None`` keeps whole maps (NHWC, as
    Keras lays them out), ``"max"`` / ``"mean"`` pool them to ``[N, C]``. Runs with the
    caller's grad mode; cached tensors are detached.
    """
    if names_filter is None:
        from dvtorch.layers import LAYER_NAMES

        names_filter = LAYER_NAMES
    with capture(model, names_filter, pool=pool) as acts:
        probs = model(x)
    return probs, dict(acts.items())


@contextmanager
def _removing(hooks: list[tuple[nn.Module, Any]]) -> Iterator[None]:
    """Remove every hook handle appended to ``hooks`` on exit, exceptions included."""
    try:
        yield
    finally:
        for _module, handle in hooks:
            handle.remove()
