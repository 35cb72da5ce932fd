"""``dvprobe export``: a STORE written as AnnData (``.zarr`` or ``.h5ad``) for scanpy and
rapids-singlecell.

What goes where is :mod:`probing.anndata_mapping` (``Store.to_anndata`` gives the same
object); this module opens STOREs by path and writes the files. Memory stays bounded for
``.zarr`` and ``.h5ad`` alike: the layers are dask arrays of row chunks, and anndata writes
them chunk by chunk (``.zarr`` keeps the row chunks, so dask and backed readers read rows
without the rest). The output appears atomically: it is written beside the target and
renamed into place, so a killed export leaves the old output or none.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dvtorch.files import give_default_mode, swap_in_dir, sweep_dead_writers, writer_dir
from probing.anndata_mapping import ExportConfig, ExportError, store_to_anndata
from probing.store import Store, as_store

if TYPE_CHECKING:
    import anndata

SUFFIXES = (".zarr", ".h5ad")

__all__ = ["ExportConfig", "ExportError", "to_anndata", "write_anndata"]


def to_anndata(store: Store | str | os.PathLike, layer: str | None = None,
               runs: Sequence[str] | None = None, *, lazy: bool = False,
               chunk_rows: int | None = None) -> anndata.AnnData:
    """The STORE (or the one at that path) as AnnData: ``layer`` as X (None: every layer in
    obsm), ``runs``' labels and coordinates (None: every run); see
    :mod:`probing.anndata_mapping`. ``lazy=True``: layers as dask arrays of row chunks."""
    return store_to_anndata(as_store(store), layer, runs, lazy=lazy, chunk_rows=chunk_rows)


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
