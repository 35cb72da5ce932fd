"""Scale guard: refuse fits that cannot fit in RAM and warn about slow ones, *before* starting.

What a run holds grows with its *fit sample*, not with the STORE: features are fitted from
streamed moments (a ``d x d`` covariance per layer) and every row is labelled chunk by chunk
(:mod:`probing.analysis.stream`). What remains is the clusterer's or UMAP's working copies
of the sample in the clustering space (``n_fit x out_dim``: 50 dimensions after the default
PCA, the layer's width with ``--pca 0``) and the per-row results (labels, coordinates, and a
PCA run's own ``[n, k]`` result). The estimate is ``n_fit x out_dim x 4 bytes x factor``
plus those; it is deliberately coarse: its job is to turn a 20-minute swap death into a
one-line message naming what to do.

The advice always agrees with what the next run does: a refusal suggests a ``--fit-sample``
no larger than the method's default sample (:data:`probing.analysis.sample.FIT_ROWS`), which
neither the memory check nor the slow-fit warning then objects to.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from dvtorch.system import usable_memory
from probing.analysis.errors import ScaleError
from probing.analysis.sample import default_rows
from probing.analysis.stream import ROW_CHUNK, UMAP_CHUNK

if TYPE_CHECKING:
    from probing.store import Store

log = logging.getLogger("dvprobe.analysis")

# Copies of the [n_fit, out_dim] float32 fit matrix each method holds at its peak (a PCA
# holds none: it is fitted from streamed moments).
MEMORY_FACTOR = {"pca": 0.0, "kmeans": 3.0, "hkmeans": 3.5, "spectral": 3.5, "hspectral": 4.0,
                 "umap": 5.0, "multilayer": 3.0}
#: methods whose CPU fit above their default sample is slow enough to warn about up front
SLOW_ON_CPU = ("umap", "spectral", "hspectral")
#: bytes per STORE row of what labelling every row keeps: key, labels, UMAP (generous)
PER_ROW_RESULT = 96


def available_memory() -> int:
    """Bytes of RAM this process can use now: MemAvailable lowered to a container's or batch
    job's cgroup limit, the figure extraction sizes its batches by
    (:func:`dvtorch.system.usable_memory`, torch-free).
    """
    return usable_memory()


def estimate_bytes(n: int, d: int, method: str) -> int:
    """The fit's working copies of ``n`` rows x ``d`` clustering-space features."""
    return int(n * d * 4 * MEMORY_FACTOR.get(method, 3.0))


def fixed_bytes(n_store: int, layer_dims: list[int], kept: int = 0) -> int:
    """What a run holds whatever its fit sample: the streamed fit's accumulators (``d x d``
    float64 + a chunk per layer), the per-row results, and ``kept`` features per row (a PCA
    run's result)."""
    streamed = sum(d * d * 8 * 2 + ROW_CHUNK * d * 4 * 3 for d in layer_dims)
    return int(streamed + n_store * (PER_ROW_RESULT + kept * 4))


def check_scale(n_fit: int, d: int, method: str, backend: str, *, fixed: int = 0,
                available: int | None = None, fraction: float = 0.8) -> list[str]:
    """Raise :class:`ScaleError` if the fit would not fit in RAM; return warnings logged.

    ``n_fit`` rows of ``d`` float32 clustering-space features will be fitted with
    ``method`` on ``backend``; ``fixed``: bytes held whatever ``n_fit``
    (:func:`fixed_bytes`).
    """
    avail = available_memory() if available is None else available
    where = "RAM"
    if backend == "cuml" and available is None:  # the fit's copies live on the GPU
        from probing.analysis.backends import gpu_free_bytes

        gpu = gpu_free_bytes()
        if gpu is not None and gpu < avail:
            avail, where = gpu, "GPU memory"
    need = estimate_bytes(n_fit, d, method) + fixed
    if need > fraction * avail:
        raise ScaleError(_refusal(n_fit, d, method, need, avail, where, fixed, fraction))
    warns = []
    default = default_rows(method)
    if backend != "cuml" and method in SLOW_ON_CPU and n_fit > default:
        warns.append(f"fitting {method} on {n_fit:,} rows on the CPU can take tens of minutes; "
                     f"the default (no --fit-sample) fits it on a sample of {default:,} and "
                     "applies it to every row, or use --backend cuml on a GPU machine")
    for w in warns:
        log.warning(w)
    return warns


def _refusal(n_fit: int, d: int, method: str, need: int, avail: int, where: str, fixed: int,
             fraction: float) -> str:
    what = (f"{method} on {n_fit:,} rows x {d} features needs ~{need / 2**30:.1f} GiB, "
            f"{avail / 2**30:.1f} GiB of {where} is available")
    per_row = max(1, estimate_bytes(1, d, method))
    room = fraction * avail - fixed
    # Half of what would just pass: the factor is coarse and free memory moves, so a
    # suggestion at the edge was itself refused. Never above the method's default sample,
    # so that following it draws no slow-fit warning either.
    fit_n = max(0, int(room / 2 // per_row))
    fit_n = min(fit_n // 1000 * 1000 if fit_n >= 1000 else fit_n, default_rows(method))
    if fit_n < 2:
        return (f"{what}, and the rows' results alone need most of it: use a machine with "
                "more memory, fewer/narrower layers, or --backend cuml on a GPU machine")
    narrower = " or --pca 50 (clusters in 50 PCA dimensions)" if d > 200 else ""
    return (f"{what}: use --fit-sample {fit_n} (fit on a sample, then apply the fitted "
            f"models to every row){narrower}, fewer/narrower layers, or --backend cuml on a "
            "GPU machine")


def umap_transform_note(n_rest: int, backend: str) -> str | None:
    """A warning when a CPU UMAP will transform many rows it was not fitted on: umap-learn's
    ``transform`` costs about as much per row as its fit, so at millions of rows it, not the
    fit, takes most of the run (the run logs the measured rate after the first call)."""
    if backend == "cuml" or n_rest <= default_rows("umap"):
        return None
    return (f"UMAP: {n_rest:,} rows outside its fit sample are transformed with umap-learn, "
            f"{UMAP_CHUNK:,} rows per call; on the CPU that costs about as much per row as "
            "the fit and at millions of rows takes most of the run (the rate and the time "
            "left are logged after the first call); --no-umap skips it, --backend cuml is "
            "much faster")


def partial_store_warning(store: Store) -> str | None:
    """One line saying ``store`` is a partial STORE (extraction stopped), or None.

    A partial STORE is still analysed (its committed rows are valid), but its clusters
    describe only the examples extracted so far, which a user must know before reading them.
    """
    if store.complete:
        return None
    return (f"{store.path}: partial STORE ({store.n:,} examples): extraction did not finish; "
            "results cover only these rows (rerun `dvprobe extract` with the same arguments "
            "to complete it)")


def warn_if_partial(store: Store, logger: logging.Logger) -> None:
    """Log :func:`partial_store_warning` when ``store`` is partial."""
    note = partial_store_warning(store)
    if note:
        logger.warning(note)
