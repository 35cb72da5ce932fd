"""The AnnData that a STORE maps to: what lets scanpy and rapids-singlecell work on
DeepVariant embeddings.

The single-cell field runs the analyses dvprobe runs (neighbours, Leiden, UMAP, marker
tests) on embeddings kept in AnnData, so one mapping opens all of its tools:

- ``obs``: the STORE's obs and annotation columns, indexed by example ``key`` (dtypes kept:
  strings stay strings, categoricals stay categorical), then each selected run's
  per-example columns as ``<run>:<column>`` (``kmeans10:cluster``), joined by key
  (``Store.run_obs``), never by position. Run labels become categoricals with string
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

Why this module sits below the store and never imports it: ``Store.to_anndata`` calls it,
and an import of anything above the store (``probing.export``, which opens paths and
writes files) would be a wrong-way import and a cycle. It uses only what
:class:`StoreLike` lists, the STORE's public reading methods.

``lazy=True`` gives the layers as dask arrays of row chunks (~16 MiB each) that read rows
only when computed: what a STORE larger than RAM needs (``probing.export.write_anndata``
writes them chunk by chunk). obs, run labels and run coordinates are read whole (the
analysis that made them held them whole too).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd

from dvtorch.errors import DvprobeError

if TYPE_CHECKING:
    import anndata

#: the run arrays that are per-example coordinates, and their AnnData (scanpy) names
COORDINATES = {"umap": "X_umap", "pca": "X_pca"}
#: store.json fields that are the extraction's journal, not provenance
JOURNAL = ("obs_parts", "cursor")
CHUNK_BYTES = 16 << 20


class RunLike(Protocol):
    """What the mapping reads of a run (``probing.store.Run``)."""

    name: str
    meta: dict
    obs: pd.DataFrame
    arrays: Mapping[str, np.ndarray]


class StoreLike(Protocol):
    """What the mapping reads of a STORE (``probing.store.Store``): its public reading side."""

    path: Path
    meta: dict
    n: int
    complete: bool
    keys: pd.Index
    obs: pd.DataFrame
    layers: list[str]
    layer_specs: dict
    runs: list[str]

    def layer(self, name: str) -> np.ndarray: ...
    def load_run(self, name: str) -> RunLike: ...
    def run_obs(self, run: RunLike) -> pd.DataFrame: ...
    def run_rows(self, run: RunLike) -> np.ndarray: ...


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


def store_to_anndata(store: StoreLike, layer: str | None = None,
                     runs: Sequence[str] | None = None, *, lazy: bool = False,
                     chunk_rows: int | None = None) -> anndata.AnnData:
    """``store`` (an open STORE) as an :class:`anndata.AnnData`, mapped as the module
    docstring says; ``lazy=True``: the layers as dask arrays of row chunks, read when
    computed. Refused with an :class:`ExportError` before any row is read: an incomplete or
    empty STORE, an unknown layer or run."""
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


# -- stages -------------------------------------------------------------------------------
def _exportable(store: StoreLike) -> StoreLike:
    """``store``, refused when it is incomplete, empty or has no keys to index rows by."""
    if not store.complete:
        raise ExportError(
            f"{store.path}: the STORE is incomplete ({store.n:,} examples committed: its "
            "extraction stopped or is still running); finish it by rerunning the same "
            "`dvprobe extract` command, then export")
    if store.n == 0:
        raise ExportError(f"{store.path}: the STORE holds no examples; nothing to export")
    store.keys  # noqa: B018  (a STORE without keys raises here, saying why)
    return store


def _selected_runs(store: StoreLike, config: ExportConfig) -> list[RunLike]:
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


def _obs(store: StoreLike, runs: list[RunLike]) -> pd.DataFrame:
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


def _coordinates(store: StoreLike, runs: list[RunLike]
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


def _chunk_rows(store: StoreLike, name: str, chunk_rows: int | None) -> int:
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


def _layer_array(store: StoreLike, name: str, lazy: bool, chunk_rows: int | None):
    """Layer ``name`` as float32 ``[n, dim]``: in memory, or a dask array of row chunks."""
    rows = store.layer(name)
    if not lazy:
        return np.array(rows, dtype=np.float32)
    import dask.array as da

    chunks = (_chunk_rows(store, name, chunk_rows), rows.shape[1])
    return da.from_array(_Float32Rows(rows), chunks=chunks, name=False,
                         meta=np.empty((0, 0), dtype=np.float32))


def _provenance(store: StoreLike, config: ExportConfig, runs: list[RunLike],
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
