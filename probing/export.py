"""A STORE as AnnData: what lets scanpy and rapids-singlecell work on DeepVariant embeddings.

The single-cell field runs the analyses dvprobe runs (neighbours, Leiden, UMAP, marker
tests) on embeddings kept in AnnData, so one export opens all of its tools. The mapping:

- ``obs``: the STORE's obs and annotation columns, indexed by example ``key`` (dtypes kept:
  strings stay strings, categoricals stay categorical), then each selected run's
  per-example columns as ``<run>:<column>`` (``kmeans10:cluster``), joined by key
  (:meth:`Store.run_obs`), never by position. Run labels become categoricals with string
  categories in label order, as scanpy's own ``leiden`` writes them, so that
  ``sc.pl.umap(color="kmeans10:cluster")`` colours clusters, not a gradient.
- ``X``: the chosen layer as float32 (``var_names`` ``<layer>:<i>``). With no layer chosen,
  every layer goes to ``obsm[<layer>]`` and ``X`` is absent (``n_vars`` 0): scanpy and
  rapids-singlecell take an embedding through ``use_rep=<layer>``, and an absent ``X``
  makes X-only steps (``pp.pca``, ``highly_variable_genes``) fail at once rather than
  quietly work on a copy of one layer that doubles the file.
- ``obsm``: each run's coordinates, ``X_umap`` / ``X_pca`` (the run's clustering space,
  ``arrays.npz`` ``umap`` / ``pca``) in STORE row order by key. With several runs each is
  also under ``<run>:X_umap``, and the plain key is the first run's (``uns`` says whose).
- ``uns["dvprobe"]``: the STORE's provenance (model, inputs, layers, extraction), every
  selected run's ``run.json``, and where each ``obsm`` entry came from.

Memory: :func:`write_anndata` reads the layers as dask arrays of row chunks (~16 MiB each)
and anndata writes them chunk by chunk, for ``.zarr`` and ``.h5ad`` alike, so a whole-genome
STORE exports in bounded memory; obs, run labels and run coordinates are read whole (the
analysis that made them held them whole too). The output appears atomically: it is written
next to the target and renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from dvtorch.errors import DvprobeError
from dvtorch.files import give_default_mode, swap_in_dir, sweep_dead_writers, writer_dir
from probing.store import Run, Store, as_store

if TYPE_CHECKING:
    import anndata

SUFFIXES = (".zarr", ".h5ad")
#: the run arrays that are per-example coordinates, and their AnnData (scanpy) names
COORDINATES = {"umap": "X_umap", "pca": "X_pca"}
#: store.json fields that are the extraction's journal, not provenance
JOURNAL = ("obs_parts", "cursor")
CHUNK_BYTES = 16 << 20


class ExportError(DvprobeError):
    """A STORE cannot be exported as asked (unknown layer or run, output in the way ...)."""


@dataclass(frozen=True)
class ExportConfig:
    """What goes into the AnnData: ``layer`` as X (None: every layer into obsm), ``runs``
    (None: every run; [] none), ``chunk_rows`` rows per chunk of the layer arrays (None:
    about :data:`CHUNK_BYTES` each)."""

    layer: str | None = None
    runs: Sequence[str] | None = None
    chunk_rows: int | None = None


def to_anndata(store: Store | str | os.PathLike, layer: str | None = None,
               runs: Sequence[str] | None = None, *, lazy: bool = False,
               chunk_rows: int | None = None) -> anndata.AnnData:
    """The STORE as an :class:`anndata.AnnData` (see the module docstring for the mapping).

    ``lazy=True`` gives the layers as dask arrays of row chunks instead of numpy arrays in
    memory: what a STORE larger than RAM needs, and what :func:`write_anndata` writes.
    """
    import anndata

    store = _exportable(store)
    config = ExportConfig(layer, runs, chunk_rows)
    selected = _selected_runs(store, config)
    obs = _obs(store, selected)
    coords, sources = _coordinates(store, selected)
    arrays = {name: _layer_array(store, name, lazy, config.chunk_rows)
              for name in ([layer] if layer else store.layers)}
    x = arrays.pop(layer) if layer else None
    var = pd.DataFrame(index=pd.Index([f"{layer}:{i}" for i in range(x.shape[1])] if layer
                                      else [], dtype=object))
    uns = {"dvprobe": _provenance(store, config, selected, sources)}
    return anndata.AnnData(X=x, obs=obs, var=var, obsm={**arrays, **coords}, uns=uns)


def write_anndata(store: Store | str | os.PathLike, out: str | os.PathLike,
                  layer: str | None = None, runs: Sequence[str] | None = None, *,
                  overwrite: bool = False, chunk_rows: int | None = None,
                  progress: bool = True) -> Path:
    """Write the STORE as ``out`` (``.zarr`` directory or ``.h5ad`` file), atomically and in
    bounded memory; returns ``out``. An existing ``out`` is refused unless ``overwrite``.

    A ``.zarr`` is written in anndata's zarr format setting (``anndata.settings
    .zarr_write_format``, or the ``ANNDATA_ZARR_WRITE_FORMAT`` environment variable: 2 or 3),
    with chunks of whole rows, so that dask and backed readers read rows without the rest.
    """
    out = _check_target(Path(out), overwrite)
    adata = to_anndata(store, layer, runs, lazy=True, chunk_rows=chunk_rows)
    sweep_dead_writers(out.parent)  # what an export killed before its rename left
    tmp = writer_dir(out.parent, out.name)
    try:
        give_default_mode(tmp, directory=True)
        staged = tmp / out.name
        with _progress(progress, out):
            (_write_zarr if out.suffix == ".zarr" else _write_h5ad)(adata, staged)
        if out.suffix == ".zarr":
            swap_in_dir(staged, out)  # an old export is set aside until this one is in
        else:
            os.replace(staged, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# -- what is exported ---------------------------------------------------------------------
def _exportable(store: Store | str | os.PathLike) -> Store:
    """The STORE, refused when it is incomplete, empty or has no keys to index rows by."""
    store = as_store(store)
    if not store.complete:
        raise ExportError(
            f"{store.path}: the STORE is incomplete ({store.n:,} examples committed: its "
            "extraction stopped or is still running); finish it by rerunning the same "
            "`dvprobe extract` command, then export")
    if store.n == 0:
        raise ExportError(f"{store.path}: the STORE holds no examples; nothing to export")
    store.keys  # noqa: B018  (a STORE without keys raises here, saying why)
    return store


def _selected_runs(store: Store, config: ExportConfig) -> list[Run]:
    """The runs to export, checked with the layer before any row is read."""
    if config.layer is not None and config.layer not in store.layers:
        raise ExportError(f"{store.path}: no layer {config.layer!r}; it holds "
                          f"{', '.join(store.layers)}")
    if config.chunk_rows is not None and config.chunk_rows < 1:
        raise ExportError(f"chunk_rows must be at least 1, not {config.chunk_rows}")
    have = store.runs
    names = have if config.runs is None else list(dict.fromkeys(config.runs))
    unknown = [n for n in names if n not in have]
    if unknown:
        raise ExportError(f"{store.path}: no run {', '.join(map(repr, unknown))}; its runs: "
                          f"{', '.join(have) if have else 'none'}")
    return [store.load_run(n) for n in names]


def _obs(store: Store, runs: list[Run]) -> pd.DataFrame:
    """STORE obs indexed by key, then each run's columns as ``<run>:<column>``."""
    obs = store.obs.copy()
    obs.index = pd.Index(obs.pop("key").astype(object), name="key")
    for run in runs:
        for column, values in store.run_obs(run).drop(columns="key").items():
            name = f"{run.name}:{column}"
            if name in obs.columns:
                raise ExportError(f"run {run.name!r}: its column {column!r} would be obs "
                                  f"column {name!r}, which the STORE already has")
            labels = values if pd.api.types.is_float_dtype(values) else _as_labels(values)
            obs[name] = labels.array
    return obs


def _as_labels(values: pd.Series) -> pd.Series:
    """Run labels (cluster ids, hierarchy nodes) as a categorical with string categories in
    label order, missing labels kept missing: how scanpy stores clusterings."""
    cat = pd.Categorical(values.astype(object).where(values.notna(), None))
    return pd.Series(cat.rename_categories([str(c) for c in cat.categories]))


def _coordinates(store: Store, runs: list[Run]
                 ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """obsm coordinates by key, and for each obsm name the ``<run>:<array>`` it holds."""
    found = [(run, array) for array in COORDINATES for run in runs if array in run.arrays]
    obsm: dict[str, np.ndarray] = {}
    sources: dict[str, str] = {}
    for run, array in found:
        values = np.asarray(run.arrays[array])[store.run_rows(run)]
        several = sum(a == array for _, a in found) > 1
        names = [COORDINATES[array]] if COORDINATES[array] not in obsm else []
        names += [f"{run.name}:{COORDINATES[array]}"] if several else []
        for name in names:
            obsm[name] = values
            sources[name] = f"{run.name}:{array}"
    return obsm, sources


def _chunk_rows(store: Store, name: str, chunk_rows: int | None) -> int:
    if chunk_rows is not None:
        return min(chunk_rows, store.n)
    row_bytes = store.layer_specs[name].dim * np.dtype(np.float32).itemsize
    return max(1, min(store.n, CHUNK_BYTES // max(row_bytes, 1)))


class _Float32Rows:
    """A layer as dask reads it: only the rows asked for, as float32.

    Why not hand dask the layer itself: ``da.from_array`` slices a numpy array (a memmap is
    one) into all its chunks at once, which reads the whole layer into memory.
    """

    def __init__(self, rows) -> None:
        self.rows = rows
        self.shape = tuple(rows.shape)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(np.float32)

    def __getitem__(self, index) -> np.ndarray:
        return np.asarray(self.rows[index], dtype=np.float32)


def _layer_array(store: Store, name: str, lazy: bool, chunk_rows: int | None):
    """Layer ``name`` as float32 ``[n, dim]``: in memory, or a dask array of row chunks."""
    rows = store.layer(name)
    if not lazy:
        return np.array(rows, dtype=np.float32)
    import dask.array as da

    chunks = (_chunk_rows(store, name, chunk_rows), rows.shape[1])
    return da.from_array(_Float32Rows(rows), chunks=chunks, name=False,
                         meta=np.empty((0, 0), dtype=np.float32))


def _provenance(store: Store, config: ExportConfig, runs: list[Run],
                sources: dict[str, str]) -> dict[str, Any]:
    """``uns["dvprobe"]``: how the STORE was made, its runs' parameters, what went where."""
    meta = {k: v for k, v in store.meta.items() if k not in JOURNAL}
    return _uns_value({
        "format": "dvprobe-anndata", "format_version": 1,
        "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "store_path": str(store.path),
        "X": config.layer or "",
        "obsm_layers": [] if config.layer else store.layers,
        "obsm_sources": sources,
        "store": meta,
        "runs": {run.name: run.meta for run in runs},
    })


def _uns_value(value: Any) -> Any:
    """``value`` (JSON data) as AnnData can write it in ``uns``: dicts stay dicts, lists of
    one scalar type become arrays; what AnnData cannot hold faithfully (empty, mixed or
    nested lists, keys with a slash) becomes its JSON text."""
    if isinstance(value, dict):
        if all(isinstance(k, str) and k and "/" not in k for k in value):
            return {k: _uns_value(v) for k, v in value.items()}
        return json.dumps(value, sort_keys=True)
    if isinstance(value, (list, tuple)):
        kinds = {type(v) for v in value}
        if len(kinds) == 1 and kinds <= {str, int, float, bool}:
            return np.asarray(value)
        return json.dumps(value)
    return value


# -- writing ------------------------------------------------------------------------------
def _check_target(out: Path, overwrite: bool) -> Path:
    """``out`` if it can be written: a known suffix, a directory to put it in, and nothing
    there unless ``overwrite`` (and then of the kind the suffix writes)."""
    if out.suffix not in SUFFIXES:
        raise ExportError(f"{out}: the AnnData output must end in .zarr or .h5ad")
    if not out.parent.is_dir():
        raise ExportError(f"{out}: its directory {out.parent} does not exist")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise ExportError(f"{out} exists; pass --overwrite to replace it")
        if out.suffix == ".h5ad" and out.is_dir():
            raise ExportError(f"{out} is a directory; refusing to replace it with a file")
    return out


def _dask_chunks_callback(func, store, elem_name, elem, dataset_kwargs, iospec):
    """anndata write callback: a dask array's zarr chunks are its own row chunks, so that
    every chunk is written whole by one task (zarr chunks shared by two writers lose data:
    zarr-python issue 3682)."""
    if hasattr(elem, "dask") and hasattr(elem, "chunksize"):
        dataset_kwargs = {**dataset_kwargs, "chunks": elem.chunksize}
    func(store, elem_name, elem, dataset_kwargs=dataset_kwargs)


def _write_zarr(adata: anndata.AnnData, path: Path) -> None:
    import anndata
    import zarr

    group = zarr.open_group(path, mode="w",
                            zarr_format=anndata.settings.zarr_write_format)
    # no shards (zarr v3): each chunk of rows is one file, written whole by one task
    with anndata.settings.override(allow_write_nullable_strings=True,
                                   auto_shard_zarr_v3=False):
        anndata.experimental.write_dispatched(group, "/", adata,
                                              callback=_dask_chunks_callback)
    with warnings.catch_warnings():  # v3: "not part of the spec"; anndata reads it, as
        warnings.filterwarnings("ignore", "Consolidated metadata")  # its own writer does
        zarr.consolidate_metadata(group.store)


def _write_h5ad(adata: anndata.AnnData, path: Path) -> None:
    import anndata
    import h5py

    with h5py.File(path, "w") as f, anndata.settings.override(
            allow_write_nullable_strings=True):
        anndata.io.write_elem(f, "/", adata)


def _progress(enabled: bool, out: Path) -> contextlib.AbstractContextManager:
    """A progress bar over the row chunks anndata writes (dask tasks), or nothing."""
    if not enabled:
        return contextlib.nullcontext()
    from tqdm import tqdm
    from tqdm.dask import TqdmCallback

    return TqdmCallback(desc=f"export {out.name}", unit="chunk", tqdm_class=tqdm, leave=False)
