"""Scale guard: refuse fits that cannot fit in RAM and warn about slow ones, *before* starting.

The memory estimate is ``rows x features x 4 bytes x factor``; the factor counts the copies a
method makes (input + normalised copy + centred/working copies). It is deliberately coarse:
its job is to turn a 20-minute swap death into a one-line message naming the alternative
(``--fit-sample N``: fit on N rows, then apply the fitted models to all rows; or
``--backend cuml``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from dvtorch.system import usable_memory
from probing.analysis.errors import ScaleError

if TYPE_CHECKING:
    from probing.store import Store

log = logging.getLogger("dvprobe.analysis")

# Copies of the [n, d] float32 fit matrix each method holds at its peak.
MEMORY_FACTOR = {"pca": 3.0, "kmeans": 3.0, "hkmeans": 3.5, "spectral": 3.5, "hspectral": 4.0,
                 "umap": 5.0, "multilayer": 4.0}
# Rows above which a CPU fit is slow enough to deserve a warning up front.
CPU_SLOW_ROWS = {"umap": 150_000, "spectral": 500_000, "hspectral": 500_000}


def available_memory() -> int:
    """Bytes of RAM this process can use now: MemAvailable lowered to a container's or batch
    job's cgroup limit, the figure extraction sizes its batches by
    (:func:`dvtorch.system.usable_memory`, torch-free).
    """
    return usable_memory()


def estimate_bytes(n: int, d: int, method: str) -> int:
    return int(n * d * 4 * MEMORY_FACTOR.get(method, 3.0))


def check_scale(n_fit: int, d: int, method: str, backend: str, *,
                available: int | None = None, fraction: float = 0.8) -> list[str]:
    """Raise :class:`ScaleError` if the fit would not fit in RAM; return warnings logged.

    ``n_fit`` rows of ``d`` float32 features will be fitted with ``method`` on ``backend``.
    """
    avail = available_memory() if available is None else available
    where = "RAM"
    if backend == "cuml" and available is None:  # the fit's copies live on the GPU
        from probing.analysis.backends import gpu_free_bytes

        gpu = gpu_free_bytes()
        if gpu is not None and gpu < avail:
            avail, where = gpu, "GPU memory"
    need = estimate_bytes(n_fit, d, method)
    if need > fraction * avail:
        per_row = max(1, estimate_bytes(1, d, method))
        # Half of what would just pass: the factor is coarse (k-means peaked at 3.2x, not
        # 3.0x) and free memory moves, so a suggestion at the edge was itself refused.
        fit_n = max(1000, int(fraction * avail / 2 // per_row) // 1000 * 1000)
        raise ScaleError(
            f"{method} on {n_fit:,} rows x {d} features needs ~{need / 2**30:.1f} GiB, "
            f"{avail / 2**30:.1f} GiB of {where} is available: use --fit-sample {fit_n} (fit on a "
            "random subset, then apply the fitted models to every row), fewer/narrower "
            "layers, or --backend cuml on a GPU machine")
    warns = []
    slow = CPU_SLOW_ROWS.get(method)
    if backend != "cuml" and slow is not None and n_fit > slow:
        warns.append(f"{method} on {n_fit:,} rows on the CPU can take tens of minutes; "
                     f"--fit-sample {slow // 1000 * 1000} or --backend cuml is much faster")
    for w in warns:
        log.warning(w)
    return warns


def check_all_rows(n: int, out_dim: int, *, available: int | None = None,
                   fraction: float = 0.8) -> None:
    """Raise :class:`ScaleError` if the ``[n, out_dim]`` features of *every* row (computed
    after the fit, to label all rows) would not fit.

    Why apart from :func:`check_scale`: ``--fit-sample`` bounds the fit, not this matrix,
    which without PCA is as wide as the layer (5 M rows of mixed10: ~41 GB).
    """
    avail = available_memory() if available is None else available
    need = n * out_dim * 4 * 1.5  # the matrix + one chunk's working copies, generously
    if need > fraction * avail:
        raise ScaleError(
            f"the {out_dim} features of all {n:,} rows need ~{need / 2**30:.1f} GiB after the "
            f"fit, {avail / 2**30:.1f} GiB is available: reduce with PCA first (--pca 50, "
            "the default; multilayer: --layer-pca / --pca) or use narrower layers")


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
