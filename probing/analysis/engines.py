"""Which backend a run uses: an in-process one (:mod:`probing.analysis.backends`) or one
whose row passes run on Dask (:mod:`probing.analysis.dask_backend`,
:mod:`probing.analysis.dask_cuda`). Kept apart from ``backends`` so that the Dask modules,
which build on the in-process backends, are imported only when asked for."""

from __future__ import annotations

import logging

from probing.analysis.backends import DASK_BACKENDS, Backend, get_backend

log = logging.getLogger("dvprobe.analysis")


def get_engine(name: str = "auto", scheduler: str | None = None) -> Backend:
    """``auto|cuml|sklearn|dask|dask-cuda`` as a backend instance; ``scheduler``: a Dask
    scheduler address (``dask`` / ``dask-cuda``; None starts a local cluster per run)."""
    if name not in DASK_BACKENDS:
        return get_backend(name, scheduler)
    where = scheduler or f"a Local{'CUDA' if name == 'dask-cuda' else ''}Cluster for the run"
    log.info("backend %s (%s)", name, where)
    if name == "dask":
        from probing.analysis.dask_backend import DaskBackend

        return DaskBackend(scheduler)
    from probing.analysis.dask_cuda import DaskCudaBackend

    return DaskCudaBackend(scheduler)
