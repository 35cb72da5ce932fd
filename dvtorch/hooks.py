"""Capture layer activations during an ordinary forward pass.

::

    with capture(model, ["mixed5", "mixed7"], pool="max") as acts:
        probs = model(x)
    acts["mixed5"]            # [N, 768], on the model's device

One forward fills every requested layer. Hooks are removed when the ``with`` block exits,
including on an exception, so a failed batch never leaves a model that keeps capturing.

Pooling is done inside the hook, on the device, so that only ``[N, C]`` rows ever need to
leave the GPU (a flattened mixed5 map is 48x larger). Layouts follow Keras/NHWC, the
convention of the DeepVariant graph: ``flatten`` rows are in H, W, C order (Keras
``Flatten`` on NHWC), which differs from a naive NCHW ``reshape``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from dvtorch.layers import all_layer_names, resolve
from dvtorch.parallel import defer, in_worker, split_safe

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
    handles = []

    def make_hook(name: str):
        def commit(t: torch.Tensor) -> None:
            acts._store(name, t)

        # Split-safe: every pool mode is per example, so slices of a batch-split forward
        # (dvtorch.parallel) concatenate to the full-batch result.
        @split_safe
        def hook(_module: nn.Module, _inputs, output: torch.Tensor) -> None:
            t = pool_activation(output.detach(), pool)
            if not defer((id(acts), name), t, commit):
                commit(t)
        return hook

    @split_safe
    def new_forward(_module: nn.Module, _inputs) -> None:
        # Each forward starts empty, so a layer it does not reach (it raised, or a hook
        # stopped it early) is a KeyError, not the previous batch's tensor. Inside a
        # worker's whole-batch or split forward the tensors are committed in the caller's
        # thread after the forward (dvtorch.parallel), which replaces them there.
        if not in_worker():
            acts.clear()

    try:
        handles.append(model.register_forward_pre_hook(new_forward))
        for n, m in modules:
            handles.append(m.register_forward_hook(make_hook(n)))
        yield acts
    finally:
        for h in handles:
            h.remove()
