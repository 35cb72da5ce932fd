"""Can a run fitted on one STORE be applied to another? (``dvprobe apply``, ``pa.apply``).

Applying re-uses fitted normalisers, PCAs and centres, which only mean something for
activations of the *same* model, pooled the *same* way: another model's mixed5 has the same
width but unrelated channels, and mean- vs max-pooled rows differ in scale, so either
would produce clusters that look fine and mean nothing. Both are refused. A different
``--dtype`` of the same model (fp32 vs bf16) moves rows only slightly (cosine > 0.999), so
it is allowed with a warning. STOREs written before these fields were recorded are not
checked.
"""

from __future__ import annotations

from typing import Any

from probing.analysis.errors import AnalysisError
from probing.store import Store


class IncompatibleStoreError(AnalysisError):
    """The target STORE was extracted with another model or pooling than the run's STORE."""


def _pooling(store: Store, layer: str) -> Any:
    """How ``layer`` was pooled: its own spec, else the extraction's ``--pool`` (or None)."""
    spec = store.meta.get("layers", {}).get(layer) or {}
    if "pool" in spec:
        return spec["pool"]
    return (store.meta.get("inputs") or {}).get("pool")


def _describe_pool(pool: Any) -> str:
    return f"{pool}-pooled" if pool else "not pooled"


def check_applicable(src: Store, tgt: Store, run: str, layers: list[str]) -> list[str]:
    """Raise :class:`IncompatibleStoreError` if run ``run`` of ``src`` cannot be applied to
    ``tgt``; return warnings (dtype differs) for the caller to log."""
    where = f"cannot apply run {run!r} of {src.path} to {tgt.path}"
    a, b = src.meta.get("inputs") or {}, tgt.meta.get("inputs") or {}
    sha_a, sha_b = a.get("bundle_sha256"), b.get("bundle_sha256")
    if sha_a and sha_b and sha_a != sha_b:
        raise IncompatibleStoreError(
            f"{where}: they were extracted with different models (bundle sha256 "
            f"{sha_a[:12]} vs {sha_b[:12]}); re-extract {tgt.path} with the run's model")
    for ly in layers:
        pa, pb = _pooling(src, ly), _pooling(tgt, ly)
        if pa != pb and pa is not None and pb is not None:
            raise IncompatibleStoreError(
                f"{where}: layer {ly!r} is {_describe_pool(pa)} in {src.path} and "
                f"{_describe_pool(pb)} in {tgt.path}; re-extract {tgt.path} with --pool {pa}")
        ma = (src.meta.get("layers", {}).get(ly) or {}).get("map_shape")
        mb = (tgt.meta.get("layers", {}).get(ly) or {}).get("map_shape")
        if ma and mb and list(ma) != list(mb):
            raise IncompatibleStoreError(
                f"{where}: layer {ly!r} was pooled from a {ma} map in {src.path} and a {mb} "
                f"map in {tgt.path} (different input shape); use examples of one format")
    dt_a, dt_b = a.get("dtype"), b.get("dtype")
    if dt_a and dt_b and dt_a != dt_b:
        return [f"run {run!r} was fitted on {dt_a} activations, {tgt.path} holds {dt_b} "
                "ones of the same model: labels can differ for examples near a cluster "
                "boundary"]
    return []
