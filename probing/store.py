"""STORE: one directory that carries examples' metadata, layer activations and analysis runs.

Like scanpy's AnnData, one object flows through extract -> reduce/cluster -> annotate ->
enrich -> report. Row i of ``obs``, of every ``layer()`` and of ``annotations.parquet`` is
the same example, in input order: the STORE writes all three itself. A run is joined to the
STORE by example ``key``, never by position (:meth:`Store.run_rows`): a run whose keys are
not the STORE's (copied from another STORE, made before a re-extraction) is refused, while
one that holds the same examples in another order is put back in STORE order.

Layout (no pickle anywhere except UMAP models, which are hash-checked; see ``runs``)::

    STORE/
      store.json                 metadata + commit journal (n_committed, obs parts)
      obs.parquet                example metadata (written when extraction completes)
      obs/part-NNNNNNNN.parquet  per-commit obs parts while extraction runs / after a crash
      layers/<name>.bin          raw row-major [n, dim] arrays (dtype in store.json: float32,
                                 float16 or bfloat16): np.memmap
      annotations.parquet        columns added by ``dvprobe annotate`` (same rows as obs)
      runs/<run>/run.json        analysis run: parameters, backend, model hashes
      runs/<run>/obs.parquet     per-example results (cluster labels ...)
      runs/<run>/arrays.npz      coordinates and fitted models as plain arrays
      probes/<name>.json         ``dvprobe probe`` results (:mod:`probing.probe`)
      stale-<n>/                 annotations, runs and probes of a partial STORE, set aside
                                 when its extraction resumed

Crash safety: ``StoreWriter.append`` writes the layer rows and the obs part first, then
atomically replaces ``store.json`` with the new ``n_committed``. Anything beyond the last
commit is truncated away when the writer is reopened, so a crash loses at most the batch in
flight and never duplicates rows.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dvtorch.errors import DvprobeError
from dvtorch.files import (
    atomic_write_bytes,
    give_default_mode,
    sha256_bytes,
    swap_in_dir,
    sweep_dead_writers,
    writer_dir,
)
from probing.tasks import PARTS_DIR, claim_state, describe_claim, part_name, read_claim

FORMAT = "dvprobe-store"
FORMAT_VERSION = 1
_META = "store.json"


class StoreError(DvprobeError):
    """A STORE is missing, inconsistent or used in a way its contents do not allow."""


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _write_parquet_atomic(df: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def _read_meta(meta_path: Path) -> dict:
    """A STORE's ``store.json``, or a StoreError saying why it is not one (unreadable, not
    JSON, or JSON that some other program wrote)."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise StoreError(f"{meta_path}: unreadable ({e}); not a dvprobe STORE, or a damaged "
                         "one") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = (f"format {meta['format']!r}" if isinstance(meta, dict) and "format" in meta
                 else "no format")
        raise StoreError(f"{meta_path}: not written by dvprobe ({found}, not {FORMAT!r}); "
                         f"{meta_path.parent} is not a STORE and is left as it is")
    return meta


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``key: old there, new now`` for every leaf where two JSON values differ (for
    messages). Lists are compared item by item, so a changed input file is named rather
    than two lists cut to the same first 60 characters."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(old.keys() | new.keys(), key=str):
            out += _differences(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    if old == new:
        return []
    where = prefix.rstrip(".")
    whole = f"{where}: {_short(old)} there, {_short(new)} now"
    if isinstance(old, list) and isinstance(new, list) and "..." in whole:
        out = [] if len(old) == len(new) else [f"{where}: {len(old)} there, {len(new)} now"]
        for i in range(max(len(old), len(new))):
            if i >= len(new):
                out.append(f"{where}[{i}]: {_short(old[i])} there, absent now")
            elif i >= len(old):
                out.append(f"{where}[{i}]: absent there, {_short(new[i])} now")
            else:
                out += _differences(old[i], new[i], f"{where}[{i}].")
        return out
    return [whole]


def _comparable(inputs: Any) -> Any:
    """Extraction inputs as compared for resuming: the order of ``layers`` does not change
    what a STORE holds (layers are stored by name). The store dtype is recorded only when it
    is not float32 (STOREs from before ``--store-dtype`` still resume); it is compared under
    its flag's name, so that a refusal says ``--store-dtype: "float32" there, "float16"
    now``."""
    if isinstance(inputs, dict) and isinstance(inputs.get("layers"), list):
        rest = {k: v for k, v in inputs.items() if k != "store_dtype"}
        return {**rest, "layers": sorted(inputs["layers"]),
                "--store-dtype": inputs.get("store_dtype", DEFAULT_STORE_DTYPE)}
    return inputs


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value it holds, so messages say ``6``, not
    ``np.int64(6)``."""
    return value.item() if isinstance(value, np.generic) else value


#: dtypes a layer's rows may be stored in (``extract --store-dtype`` for pooled rows;
#: flattened maps are float16). bfloat16 is ``ml_dtypes``' numpy type: float32's range with
#: 8 bits of mantissa; float16 keeps 11 bits but ends at 65504.
STORE_DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_STORE_DTYPE = "float32"


def storage_dtype(name: str) -> np.dtype:
    """The numpy dtype of a stored dtype's name (``np.dtype("bfloat16")`` knows the name
    only once ml_dtypes is imported, as this module does)."""
    if name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    if name not in STORE_DTYPES:
        raise StoreError(f"unknown layer dtype {name!r}; a STORE holds "
                         f"{', '.join(STORE_DTYPES)}")
    return np.dtype(name)


def cast_rows(rows: np.ndarray, dtype: str, what: str,
              keys: Sequence[Any] | None = None) -> np.ndarray:
    """``rows`` in the stored ``dtype``, rounded to the nearest (ties to even), as numpy's
    and ml_dtypes' ``astype`` round: a half-precision STORE equals the float32 rows cast.

    A finite value that would become inf (beyond float16's 65504) is refused, naming
    ``what`` (the layer) and the example (``keys``, row-aligned): an inf poisons every
    mean, distance and PCA computed from the layer, and a clamped value would silently
    break the equality above. bfloat16 has float32's range and holds them.
    """
    target = storage_dtype(dtype)
    if rows.dtype == target:
        return np.ascontiguousarray(rows)
    with np.errstate(over="ignore"):
        out = np.ascontiguousarray(rows.astype(target))
    lost = np.isfinite(rows) & ~np.isfinite(out.astype(np.float32))
    if lost.any():
        row, col = (int(i[0]) for i in np.nonzero(lost))
        who = f"example {_plain(keys[row])!r}" if keys is not None else f"row {row}"
        raise StoreError(
            f"{what}: {int(lost.sum()):,} value(s) beyond {dtype}'s range would be stored as "
            f"inf, e.g. {float(rows[row, col]):g} (feature {col} of {who}); extract with "
            "--store-dtype bfloat16 (the same 2 bytes, float32's range) or float32")
    return out


@dataclass(frozen=True)
class LayerSpec:
    """How one captured layer is stored: row width, dtype and how it was pooled."""

    name: str
    dim: int
    dtype: str = "float32"
    pool: str | None = "max"
    map_shape: tuple[int, ...] | None = None  # the layer's [H, W, C] before pooling

    @property
    def row_bytes(self) -> int:
        """Bytes of one example's row in ``layers/<name>.bin``."""
        return self.dim * self.numpy_dtype.itemsize

    @property
    def numpy_dtype(self) -> np.dtype:
        """The dtype of the rows in ``layers/<name>.bin`` (what ``Store.layer`` gives)."""
        return storage_dtype(self.dtype)

    def to_json(self) -> dict:
        return {
            "dim": int(self.dim),
            "dtype": self.dtype,
            "pool": self.pool,
            "map_shape": list(self.map_shape) if self.map_shape else None,
        }

    @classmethod
    def from_json(cls, name: str, d: Mapping) -> LayerSpec:
        ms = d.get("map_shape")
        return cls(name, int(d["dim"]), d.get("dtype", "float32"), d.get("pool"),
                   tuple(ms) if ms else None)


class RunArrays(Mapping[str, np.ndarray]):
    """A run's ``arrays.npz``, each array read when first asked for (then kept).

    Why lazy: a report needs a run's ``umap`` and ``enrich`` its labels, while ``pca`` of
    300k rows x 768 is ~0.9 GB; reading every array of every run made ``report`` grow with
    the number of runs. The archive stays open, so a run overwritten meanwhile cannot mix
    into this one.
    """

    def __init__(self, path: Path) -> None:
        self._npz = np.load(path, allow_pickle=False)
        self._cache: dict[str, np.ndarray] = {}

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._cache:
            if key not in self._npz.files:
                raise KeyError(key)
            self._cache[key] = self._npz[key]
        return self._cache[key]

    def __contains__(self, key: object) -> bool:  # Mapping's default would read the array
        return key in self._npz.files

    def __iter__(self) -> Iterator[str]:
        return iter(self._npz.files)

    def __len__(self) -> int:
        return len(self._npz.files)

    def __del__(self) -> None:
        npz = getattr(self, "_npz", None)
        if npz is not None:
            npz.close()


def read_keyed_parquet(path: Path | pa.Table, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """A parquet file (or a table read from one) as a DataFrame whose ``key`` column stays
    in Arrow memory (``string[pyarrow]``): 2,000,000 keys take 47 MB there and 650 MB as
    Python strings, the largest thing a whole-genome analysis would otherwise hold."""
    table = path if isinstance(path, pa.Table) else pq.read_table(
        path, columns=None if columns is None else list(columns))
    at = table.column_names.index("key") if "key" in table.column_names else -1
    if at < 0 or not (pa.types.is_string(table.schema.field(at).type)
                      or pa.types.is_large_string(table.schema.field(at).type)):
        return table.to_pandas()
    key = pd.arrays.ArrowStringArray(table.column(at))
    df = table.remove_column(at).to_pandas()
    df.insert(at, "key", key)
    return df


def _in_row_order(index: pd.Index, n: int) -> bool:
    """Whether ``index`` is still ``0..n-1`` in order (cheap for the usual RangeIndex)."""
    if isinstance(index, pd.RangeIndex):
        return index.start == 0 and index.step == 1 and len(index) == n
    return len(index) == n and bool((index.to_numpy() == np.arange(n)).all())


@dataclass
class Run:
    """One analysis result: parameters, per-example columns and arrays (coords, models)."""

    name: str
    meta: dict
    obs: pd.DataFrame
    arrays: Mapping[str, np.ndarray]
    path: Path
    files: dict[str, Path] = field(default_factory=dict)

    def file_bytes(self, key: str) -> bytes:
        """Bytes of an auxiliary file, checked against the sha256 recorded when it was saved."""
        rec = self.meta.get("files", {}).get(key)
        if rec is None:
            raise StoreError(f"run {self.name!r} has no file {key!r}")
        data = (self.path / rec["path"]).read_bytes()
        if sha256_bytes(data) != rec["sha256"]:
            raise StoreError(
                f"run {self.name!r}: {rec['path']} does not match the sha256 recorded at save "
                "time; refusing to load it (it may have been modified)"
            )
        return data


class Store:
    """Read side of a STORE. Use :func:`open_store`.

    A *parted* STORE (written by ``extract --task I --num-tasks N``) reads as one: ``n``,
    ``obs`` and ``layer()`` run over its parts in part order, which is input order, while
    annotations, runs and probes live at the top level as in any STORE. It opens only when
    every part is complete, else a StoreError names the part and the command that finishes
    it (``partial_parts=True``, for ``dvprobe info``, opens it anyway, to describe it).
    """

    def __init__(self, path: str | os.PathLike, *, partial_parts: bool = False):
        self.path = Path(path)
        meta_path = self.path / _META
        if not meta_path.is_file():
            raise StoreError(f"{self.path}: not a dvprobe STORE (no {_META})")
        self.meta: dict = _read_meta(meta_path)
        #: store.json as written (a parted STORE's ``meta`` adds what its parts hold)
        self.root_meta: dict = self.meta
        self._obs: pd.DataFrame | None = None
        self._keys: pd.Index | None = None
        #: the parts of a parted STORE, in order (empty for a one-task STORE)
        self.parts: list[PartState] = []
        if "parts" in self.meta:
            self.parts = part_states(self.path, self.meta)
            if not partial_parts:
                _refuse_unfinished(self.path, self.meta, self.parts)
            self.meta = _parted_meta(self.meta, self.parts)

    # -- rows ---------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return int(self.meta.get("n_committed", 0))

    def __len__(self) -> int:
        return self.n

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete", False))

    def _base_files(self) -> list[Path]:
        """The parquet file(s) that hold the extraction's obs rows, in row order."""
        if self.parts:
            return [p.path / "obs.parquet" for p in self.parts if p.complete and p.n]
        single = self.path / "obs.parquet"
        if single.is_file():
            return [single]
        return [self.path / "obs" / p for p in self.meta.get("obs_parts", [])]

    def _base_obs(self, columns: list[str] | None = None) -> pd.DataFrame:
        """The extraction's obs rows (only ``columns``, when given: parquet reads no others)."""
        parts = [read_keyed_parquet(p, columns) for p in self._base_files()]
        df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
        if len(df) != self.n:
            raise StoreError(f"{self.path}: obs has {len(df)} rows but {self.n} are committed")
        return df.reset_index(drop=True)

    def _dtypes_on_disk(self) -> tuple[pd.Series, pd.Series]:
        """dtypes of the extraction's obs columns and of the annotation columns (those an
        extraction column shadows left out), read from the parquet footers alone."""
        def dtypes(path: Path) -> pd.Series:
            return read_keyed_parquet(pq.read_schema(path).empty_table()).dtypes

        files = self._base_files()
        base = dtypes(files[0]) if files else pd.Series(dtype=object)
        ann = self.path / "annotations.parquet"
        added = dtypes(ann) if ann.is_file() else pd.Series(dtype=object)
        return base, added[~added.index.isin(base.index)]

    def _obs_in_order(self) -> bool:
        return self._obs is not None and _in_row_order(self._obs.index, self.n)

    @property
    def obs_dtypes(self) -> pd.Series:
        """Column name -> dtype of ``obs``, without reading any rows."""
        if self._obs_in_order():
            return self._obs.dtypes
        base, added = self._dtypes_on_disk()
        return pd.concat([base, added])

    @property
    def extraction_columns(self) -> frozenset[str]:
        """The obs columns extraction wrote (read-only; ``add_obs`` refuses them), read from
        the parquet footers alone. Empty while nothing is committed."""
        return frozenset(self._dtypes_on_disk()[0].index) if self.n else frozenset()

    def read_obs(self, columns: Sequence[str]) -> pd.DataFrame:
        """Only ``columns`` of ``obs`` (in that order), reading no other column from disk.

        For callers that need a few columns of a large STORE (``probe`` reads its concepts,
        ``chrom`` and ``pos``, not every example's key and locus strings). Unknown names are
        refused with the columns there are.
        """
        columns = list(dict.fromkeys(columns))
        if not columns:
            return pd.DataFrame(index=pd.RangeIndex(self.n))
        if self._obs_in_order():
            base, added = self._obs.dtypes, pd.Series(dtype=object)
        else:
            base, added = self._dtypes_on_disk()
        missing = [c for c in columns if c not in base.index and c not in added.index]
        if missing:
            raise StoreError(f"{self.path}: obs has no column(s) {missing}; it has "
                             f"{[*base.index, *added.index]}")
        if self._obs_in_order():
            return self._obs[columns].copy()
        df = self._base_obs([c for c in columns if c in base.index])
        wanted = [c for c in columns if c in added.index]
        if wanted:
            a = pd.read_parquet(self.path / "annotations.parquet", columns=wanted)
            if len(a) != len(df):
                raise StoreError(f"{self.path / 'annotations.parquet'}: {len(a)} rows, obs has "
                                 f"{len(df)}")
            df = pd.concat([df, a], axis=1)
        return df[columns]

    @property
    def obs(self) -> pd.DataFrame:
        """Per-example metadata (+ annotation columns), one row per example in input order.

        The frame is cached. If it was reordered or cut in place (``obs.sort_values(...,
        inplace=True)`` in a notebook), it is read again: obs, annotations and layers share
        row positions, and a sorted cache gave runs scrambled keys.
        """
        if self._obs is not None and not _in_row_order(self._obs.index, self.n):
            self._obs = None
        if self._obs is None:
            df = self._base_obs()
            ann = self.path / "annotations.parquet"
            if ann.is_file():
                a = pd.read_parquet(ann)
                if len(a) != len(df):
                    raise StoreError(f"{ann}: {len(a)} rows, obs has {len(df)}")
                df = pd.concat([df, a.drop(columns=[c for c in a.columns if c in df.columns])],
                               axis=1)
            self._obs = df
        return self._obs

    def add_obs(self, columns: pd.DataFrame | pd.Series | Mapping[str, Any],
                overwrite: bool = True) -> None:
        """Add or replace annotation columns (row-aligned with ``obs``). Written atomically.

        Rows are matched by obs position, the index of ``obs``. A DataFrame or Series keeps
        its pandas meaning: one indexed by a permutation of those positions (e.g. a column of
        ``obs.sort_values(...)``) is put back in obs order by its index, not written in the
        order it happens to be in; any other index is refused rather than guessed at. Lists
        and arrays are positional, and a scalar is broadcast to every row (``{"batch": 3}``).
        Extension dtypes (nullable ``Int64``/``boolean``, ``category`` ...) are kept.
        """
        new = self._obs_columns(columns)
        odd = [c for c in new.columns if not isinstance(c, str)]
        if odd:
            raise StoreError(f"add_obs: column names must be strings (parquet), not {odd!r}")
        twice = sorted(new.columns[new.columns.duplicated()].unique())
        if twice:
            raise StoreError(f"add_obs: columns {twice} are given more than once")
        base_cols = self.extraction_columns
        clash = base_cols.intersection(new.columns)
        if clash:
            raise StoreError(f"add_obs: {sorted(clash)} are extraction columns and are read-only")
        ann_path = self.path / "annotations.parquet"
        ann = pd.read_parquet(ann_path) if ann_path.is_file() else pd.DataFrame(index=range(self.n))
        for c in new.columns:
            if c in ann.columns and not overwrite:
                raise StoreError(f"add_obs: column {c!r} exists (pass overwrite=True)")
        for c in new.columns:
            # .array, not .to_numpy(): numpy has no NA, so Int64 would turn float64, boolean
            # object and category plain strings; parquet round-trips the pandas dtypes.
            ann[c] = new[c].array
        _write_parquet_atomic(ann, ann_path)
        self._obs = None

    def _obs_columns(self, columns: pd.DataFrame | pd.Series | Mapping[str, Any]) -> pd.DataFrame:
        """``columns`` as a DataFrame indexed 0..n-1 in obs order (see :meth:`add_obs`)."""
        if isinstance(columns, pd.Series):
            if columns.name is None:
                raise StoreError("add_obs: the Series has no name; name it (it becomes the "
                                 "column name) or pass {name: series}")
            columns = columns.to_frame()
        if isinstance(columns, pd.DataFrame):
            if not len(columns.columns):
                raise StoreError("add_obs: no columns given")
            return self._in_obs_order(columns, "the DataFrame")
        if not columns:
            raise StoreError("add_obs: no columns given")
        values = {}
        for name, v in dict(columns).items():
            if isinstance(v, pd.Series):
                v = self._in_obs_order(v, f"column {name!r}").array
            elif not pd.api.types.is_scalar(v) and len(v) != self.n:
                raise StoreError(f"add_obs: column {name!r} has {len(v)} rows, the STORE has "
                                 f"{self.n}")
            values[name] = v
        # an explicit index is what lets pandas broadcast scalars to every row
        return pd.DataFrame(values, index=pd.RangeIndex(self.n))

    def _in_obs_order(self, obj: pd.DataFrame | pd.Series, what: str
                      ) -> pd.DataFrame | pd.Series:
        """``obj`` reindexed to obs positions 0..n-1, or a StoreError if its index is not
        a permutation of them (writing such rows by position would misalign them silently)."""
        idx, n = obj.index, self.n
        if idx.equals(pd.RangeIndex(len(idx))):
            if len(idx) != n:
                raise StoreError(f"add_obs: {what} has {len(idx)} rows, the STORE has {n}")
            return obj.set_axis(pd.RangeIndex(n))
        positions = pd.api.types.is_integer_dtype(idx) and not isinstance(idx, pd.MultiIndex)
        outside = idx[(idx < 0) | (idx >= n)] if positions else idx
        if len(outside):
            problem = f"has labels that are not obs positions (e.g. {_plain(outside[0])!r})"
        elif not idx.is_unique:
            problem = f"repeats rows (e.g. {_plain(idx[idx.duplicated()][0])!r})"
        elif len(idx) != n:
            missing = pd.RangeIndex(n).difference(idx)
            problem = f"covers {len(idx)} of the {n} obs rows (e.g. {missing[0]} is missing)"
        else:
            return obj.reindex(pd.RangeIndex(n))
        raise StoreError(f"add_obs: {what}'s index {problem}; rows are matched by obs position "
                         f"0..{n - 1}: index it like store.obs, or .reset_index(drop=True) if "
                         "it is in obs order already")

    # -- layers -------------------------------------------------------------------------
    @property
    def layer_specs(self) -> dict[str, LayerSpec]:
        return {k: LayerSpec.from_json(k, v) for k, v in self.meta.get("layers", {}).items()}

    @property
    def layers(self) -> list[str]:
        return list(self.meta.get("layers", {}))

    def layer(self, name: str, mmap: bool = True, *, dask: bool = False) -> Any:
        """Activations of ``name`` as ``[n, dim]`` in obs order (memory-mapped, read-only).

        A parted STORE gives a :class:`RowsView` over its parts' memory maps (numpy-like:
        ``shape``, ``m[rows]`` with ints, slices, index arrays or masks, ``np.asarray(m)``),
        or the one part's memory map. ``mmap=False`` reads every row into memory.
        Either is in the stored dtype (``layer_specs[name].dtype``: float32, or float16 /
        bfloat16 after ``extract --store-dtype``): compute on ``np.asarray(m[rows],
        dtype=np.float32)``. ``dask=True`` gives a float32 ``dask.array`` whose row chunks
        never cross a part, read chunk by chunk (by file path, so it also works on
        ``distributed`` workers).
        """
        specs = self.layer_specs
        if name not in specs:
            raise StoreError(f"{self.path}: no layer {name!r}; it holds {sorted(specs)}")
        spec = specs[name]
        files = self._layer_files(name)
        if dask:
            return _dask_rows(files, spec)
        blocks = [_map_rows(path, n, spec) for path, n in files]
        if len(blocks) == 1:
            arr = blocks[0]
        elif not blocks:
            arr = np.zeros((0, spec.dim), dtype=spec.numpy_dtype)
        else:
            arr = RowsView(blocks)
        return arr if mmap else np.array(arr)

    def _layer_files(self, name: str) -> list[tuple[Path, int]]:
        """(layer file, committed rows) of each part holding rows, in row order."""
        if self.parts:
            _refuse_unfinished(self.path, self.root_meta, self.parts)
            return [(p.path / "layers" / f"{name}.bin", p.n) for p in self.parts if p.n]
        return [(self.path / "layers" / f"{name}.bin", self.n)] if self.n else []

    # -- joins by key -------------------------------------------------------------------
    @property
    def keys(self) -> pd.Index:
        """Every example's ``key`` in row order: what runs and other STOREs are joined on.
        Read once (only that column) and kept: keys are extraction columns, never rewritten."""
        if self._keys is None:
            if "key" not in self.obs_dtypes:
                raise StoreError(f"{self.path}: obs has no 'key' column, so nothing can be "
                                 "joined to its rows (a STORE written by `dvprobe extract` "
                                 "has one)")
            self._keys = pd.Index(self.read_obs(["key"])["key"], name="key")
        return self._keys

    def align_keys(self, keys: Sequence[str] | pd.Series | pd.Index, what: str, *,
                   hint: str = "") -> np.ndarray:
        """For each row of this STORE, the position in ``keys`` of the same example.

        ``values[store.align_keys(keys, what)]`` puts anything row-aligned with ``keys`` (a
        run's labels and coordinates, another STORE's layer rows) in this STORE's row order.
        ``keys`` must name exactly this STORE's examples, in any order; otherwise a
        StoreError names ``what``, this STORE and how many keys differ, with examples (and
        ends with ``hint``, what to do about it). Keys that repeat can be joined only when
        they are the STORE's keys in its own order.

        The usual case (the STORE's keys in its order) is one vectorised comparison; any
        other order costs one hash pass over both key lists (``pd.factorize``), no Python
        loop, so it stays fast for millions of rows.
        """
        mine, theirs = self.keys, pd.Index(keys)
        if len(mine) == len(theirs) and bool((mine == theirs).all()):  # any string dtypes
            return np.arange(len(mine), dtype=np.int64)
        codes, uniques = pd.factorize(pd.concat([pd.Series(mine), pd.Series(theirs)],
                                                ignore_index=True))
        mine_codes, their_codes = codes[:len(mine)], codes[len(mine):]
        for owner, c in ((what, their_codes), ("the STORE", mine_codes)):
            counts = np.bincount(c, minlength=len(uniques))
            if counts.max(initial=0) > 1:
                raise StoreError(
                    f"{what} cannot be joined to {self.path} by key: {owner} holds key "
                    f"{_plain(uniques[int(np.argmax(counts > 1))])!r} more than once, and the "
                    "keys are not the STORE's in its own order" + (f"; {hint}" if hint else ""))
        position = np.full(len(uniques), -1, dtype=np.int64)
        position[their_codes] = np.arange(len(their_codes))
        where = position[mine_codes]
        absent = where < 0
        used = np.zeros(len(theirs), dtype=bool)
        used[where[~absent]] = True
        if absent.any() or not used.all():
            raise StoreError(_key_mismatch(what, self.path, theirs[~used], mine[absent],
                                           len(theirs), len(mine), hint))
        return where

    def run_rows(self, run: Run) -> np.ndarray:
        """For each row of this STORE, the row of ``run`` that holds the same example: runs
        are joined by ``key`` (see :meth:`align_keys`), never by position."""
        if "key" not in run.obs.columns:
            raise StoreError(f"run {run.name!r} in {self.path} has no 'key' column, so its rows "
                             "cannot be joined to the STORE's; rerun the analysis that wrote it")
        return self.align_keys(run.obs["key"], f"run {run.name!r}",
                               hint="was it made on another STORE, or before this one was "
                                    "extracted again? Rerun the analysis on this STORE")

    def run_obs(self, run: Run) -> pd.DataFrame:
        """``run.obs`` with one row per STORE row, in STORE row order (joined by key)."""
        rows = self.run_rows(run)
        in_order = len(rows) == 0 or bool((rows == np.arange(len(rows))).all())
        obs = run.obs if in_order else run.obs.iloc[rows]
        return obs.reset_index(drop=True)

    # -- runs ---------------------------------------------------------------------------
    @property
    def runs(self) -> list[str]:
        d = self.path / "runs"
        if not d.is_dir():
            return []
        # a dot name is a run being written (or left by a killed writer), never a run
        return sorted(p.name for p in d.iterdir()
                      if not p.name.startswith(".") and (p / "run.json").is_file())

    def save_run(
        self,
        name: str,
        *,
        meta: Mapping[str, Any],
        obs: pd.DataFrame | None = None,
        arrays: Mapping[str, np.ndarray] | None = None,
        files: Mapping[str, bytes] | None = None,
    ) -> Run:
        """Write (or replace) run ``name`` atomically: a crash leaves the old run or the new one.

        ``obs`` has one row per example. Its ``key`` column is what joins the run to the
        STORE later (:meth:`run_rows`): keys that are not this STORE's are refused now, and an
        ``obs`` without them gets the STORE's, since it was made from the STORE's rows in
        their order. ``files`` are opaque blobs (e.g. a pickled UMAP model): their sha256 is
        recorded in run.json and checked by :meth:`Run.file_bytes` before anyone loads them.
        """
        if not name or "/" in name or name.startswith("."):
            raise StoreError(f"invalid run name {name!r}")
        if obs is not None:
            obs = self._keyed(name, obs)
        runs_dir = self.path / "runs"
        runs_dir.mkdir(exist_ok=True)
        sweep_dead_writers(runs_dir)  # what a run saved by a killed process left behind
        tmp = writer_dir(runs_dir, name)
        try:
            give_default_mode(tmp, directory=True)
            meta = dict(meta)
            if obs is not None:
                obs.reset_index(drop=True).to_parquet(tmp / "obs.parquet", index=False)
            if arrays:
                np.savez(tmp / "arrays.npz", **{k: np.asarray(v) for k, v in arrays.items()})
            recs = {}
            for key, data in (files or {}).items():
                fname = f"{key}.bin"
                (tmp / fname).write_bytes(data)
                recs[key] = {"path": fname, "sha256": sha256_bytes(data)}
            meta["files"] = recs
            meta["name"] = name
            (tmp / "run.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
            swap_in_dir(tmp, runs_dir / name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.load_run(name)

    def _keyed(self, name: str, obs: pd.DataFrame) -> pd.DataFrame:
        """A run's ``obs`` with this STORE's keys (checked, or added as its first column)."""
        if len(obs) != self.n:
            raise StoreError(f"run {name!r}: obs has {len(obs)} rows, the STORE has {self.n}")
        if "key" in obs.columns:
            self.align_keys(obs["key"], f"run {name!r}")
            return obs
        if "key" not in self.obs_dtypes:
            return obs  # a STORE without keys (not made by extract): nothing to add
        keyed = obs.reset_index(drop=True)
        keyed.insert(0, "key", self.keys.array)
        return keyed

    def load_run(self, name: str) -> Run:
        p = self.path / "runs" / name
        if not (p / "run.json").is_file():
            raise StoreError(f"{self.path}: no run {name!r}; runs: {self.runs}")
        try:
            meta = json.loads((p / "run.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise StoreError(f"{p / 'run.json'}: unreadable ({e}); rerun the analysis that "
                             f"wrote run {name!r}") from e
        obs = read_keyed_parquet(p / "obs.parquet") if (p / "obs.parquet").is_file() else pd.DataFrame()
        npz = p / "arrays.npz"
        arrays: Mapping[str, np.ndarray] = RunArrays(npz) if npz.is_file() else {}
        return Run(name, meta, obs, arrays, p)

    def to_anndata(self, layer: str | None = None, runs: Sequence[str] | None = None, *,
                   lazy: bool = False) -> Any:
        """This STORE as AnnData for scanpy: ``layer`` as X (else every layer in obsm), the
        runs' labels as obs columns and coordinates as obsm (:mod:`probing.anndata_mapping`)."""
        from probing.anndata_mapping import store_to_anndata
        return store_to_anndata(self, layer, runs, lazy=lazy)

    def __repr__(self) -> str:
        state = "complete" if self.complete else "partial"
        return f"Store({str(self.path)!r}, n={self.n}, {state}, layers={self.layers}, runs={self.runs})"


# -- parted STOREs (``extract --task I --num-tasks N``) -----------------------------------


@dataclass(frozen=True)
class PartState:
    """One part of a parted STORE, from its metadata: ``state`` is ``missing`` (never
    started), ``partial`` (started, not finished), ``complete`` or ``damaged``."""

    index: int
    count: int
    path: Path
    state: str
    n: int = 0
    meta: dict | None = None
    #: who claimed it (``probing.tasks.read_claim``), unless that process is known gone
    writer: dict | None = None

    @property
    def complete(self) -> bool:
        return self.state == "complete"

    @property
    def name(self) -> str:
        return self.path.name


def part_states(root: Path, meta: Mapping[str, Any]) -> list[PartState]:
    """Every part of the parted STORE at ``root`` (whose store.json is ``meta``), in order."""
    count = int(meta["parts"]["count"])
    out = []
    for i in range(count):
        path = root / PARTS_DIR / part_name(i, count)
        claim = read_claim(claim_path(path))
        writer = claim if claim_state(claim) in ("live", "unknown") else None
        if not (path / _META).is_file():
            out.append(PartState(i, count, path, "missing", writer=writer))
            continue
        try:
            pm = _read_meta(path / _META)
        except StoreError:
            out.append(PartState(i, count, path, "damaged", writer=writer))
            continue
        state = "complete" if pm.get("complete") else "partial"
        out.append(PartState(i, count, path, state, int(pm.get("n_committed", 0)), pm, writer))
    return out


def claim_path(part: Path) -> Path:
    """The claim file of the part at ``part`` (beside it: the part may not exist yet)."""
    return part.with_name(part.name + ".claim")


def finish_command(meta: Mapping[str, Any], index: int,
                   root: str | os.PathLike | None = None) -> str:
    """The command that (re)runs task ``index`` of a parted STORE, as store.json records it,
    writing into ``root`` (where the STORE is now: it may have moved, or be mounted
    elsewhere on this node, since its first task ran)."""
    template = meta.get("task_command")
    if not template:
        count = meta.get("parts", {}).get("count")
        return (f"the extraction that wrote it, with task {index} of {count} "
                "(the same inputs and options)")
    argv = [str(t).replace("{task}", str(index)) for t in template]
    if root is not None and "--out" in argv[:-1]:
        argv[argv.index("--out") + 1] = os.path.abspath(root)
    return shlex.join(argv)


def _refuse_unfinished(root: Path, meta: Mapping[str, Any], parts: list[PartState]) -> None:
    """A StoreError naming the first part that is not complete and how to finish it."""
    bad = [p for p in parts if not p.complete]
    if not bad:
        return
    p = bad[0]
    said = {"missing": "missing (its task has not run)",
            "partial": f"partial ({p.n:,} examples committed)",
            "damaged": f"damaged (its {_META} is unreadable)"}[p.state]
    others = (f"; {len(bad) - 1} more part(s) are not complete either "
              f"({', '.join(str(q.index) for q in bad[1:6])}{', ...' if len(bad) > 6 else ''})"
              if len(bad) > 1 else "")
    finish = f"finish it with: {finish_command(meta, p.index, root)}"
    if p.writer is not None and claim_state(p.writer) == "live":
        how = f"{describe_claim(p.writer)} is writing it: wait for it to finish"
    elif p.writer is not None:  # another machine's claim: only it can tell if it runs
        how = (f"it is claimed by {describe_claim(p.writer)}; if that process is gone, "
               f"delete {claim_path(p.path)} and {finish}")
    else:
        how = finish
    raise StoreError(f"{root}: part {p.index} of {p.count} ({PARTS_DIR}/{p.name}) is "
                     f"{said}{others}; {how}")


def _parted_meta(root: dict, parts: list[PartState]) -> dict:
    """A parted STORE's metadata as one STORE's: store.json plus the rows, skips and
    extraction summaries of its parts."""
    metas = [p.meta for p in parts if p.meta is not None]
    first: list[dict] = []
    for m in metas:
        first += (m.get("skipped") or {}).get("first", [])
    runs = [m["extraction"] for m in metas if m.get("extraction")]
    extraction = None
    if runs and len(runs) == len(parts):
        extraction = {**runs[0], "n": sum(int(r.get("n", 0)) for r in runs),
                      "n_this_run": sum(int(r.get("n_this_run", 0)) for r in runs),
                      "seconds": max(float(r.get("seconds") or 0) for r in runs),
                      "examples_per_s": round(sum(float(r.get("examples_per_s") or 0)
                                                  for r in runs), 2),
                      "parts": len(runs)}
    return {**root,
            "n_committed": sum(p.n for p in parts),
            "complete": all(p.complete for p in parts),
            "skipped": {"count": sum(int((m.get("skipped") or {}).get("count", 0))
                                     for m in metas), "first": first[:20]},
            **({"extraction": extraction} if extraction else {})}


def open_parted_root(path: str | os.PathLike, meta: Mapping[str, Any],
                     layers: list[LayerSpec], count: int) -> dict:
    """Create the top-level store.json of a STORE written by ``count`` tasks, or check that
    the one there describes the same extraction (inputs, layers, number of tasks).

    Every task calls this; the first creates it (atomically: it is linked into place, so two
    tasks starting together agree on one), the others compare. A difference is refused,
    naming it: parts of two extractions must never make one STORE.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise StoreError(f"{path} is a file, not a STORE directory; choose another --out")
    full = {**meta, "format": FORMAT, "format_version": FORMAT_VERSION,
            "parts": {"count": int(count)},
            "layers": {s.name: s.to_json() for s in layers}}
    meta_path = path / _META
    if not meta_path.is_file():
        path.mkdir(parents=True, exist_ok=True)
        # hidden names: the temp files of tasks creating store.json at this moment
        odd = [p.name for p in path.iterdir()
               if p.name != PARTS_DIR and not p.name.startswith(".")]
        if odd:
            raise StoreError(f"{path} exists and is not a STORE (it holds {odd[:3]}); "
                             "refusing to write into it; choose another --out")
        tmp = path / f".{_META}.{os.getpid()}.new"
        atomic_write_json(tmp, full)
        try:
            os.link(tmp, meta_path)
            return full
        except FileExistsError:
            pass  # another task created it meanwhile: compare with that one
        finally:
            tmp.unlink(missing_ok=True)
    old = _read_meta(meta_path)
    if "parts" not in old:
        raise StoreError(f"{path} holds a one-task extraction, not one split into tasks; "
                         "choose another --out, or remove it to extract there with --task")
    differ = (_differences(_comparable(old.get("inputs")),
                           _comparable(json.loads(json.dumps(meta.get("inputs")))), "")
              or _differences(old.get("layers"), full["layers"], "layers.")
              or _differences(old["parts"].get("count"), int(count), "tasks"))
    if differ:
        raise StoreError(
            f"{path} holds the parts of a different extraction ("
            + "; ".join(differ[:4]) + (f"; {len(differ) - 4} more" if len(differ) > 4 else "")
            + "); every task must be given the same inputs and --num-tasks. Choose another "
            "--out, or remove that STORE to start it again")
    return old


def _map_rows(path: Path, n: int, spec: LayerSpec) -> np.ndarray:
    """The first ``n`` rows of a layer file, memory-mapped read-only."""
    _check_layer_file(path, n, spec.row_bytes)
    try:
        return np.memmap(path, dtype=spec.numpy_dtype, mode="r", shape=(n, spec.dim))
    except OSError as e:  # ENOMEM under `ulimit -v`, as on many HPC clusters
        raise StoreError(
            f"{path}: cannot memory-map {n:,} x {spec.dim} rows ({e.strerror or e}); "
            "a memory map needs virtual address space the size of the file: raise "
            "`ulimit -v` or analyse with --fit-sample") from e


class RowsView:
    """Rows of several ``[n_i, dim]`` arrays read as one ``[sum n_i, dim]`` array.

    Why a view and not one file: a parted STORE's parts are written by separate tasks and
    are never merged, yet analysis code indexes a layer like a numpy array (``m[rows]``
    with slices, sorted or unsorted index arrays, masks; ``np.asarray(m)``). Each read
    touches only the parts its rows are in, and returns a new array (read-only input is
    never handed out for writing).
    """

    def __init__(self, blocks: Sequence[np.ndarray]):
        self.blocks = list(blocks)
        dims = {b.shape[1:] for b in self.blocks}
        if len(dims) != 1 or len({b.dtype for b in self.blocks}) != 1:
            raise StoreError("RowsView: parts differ in row shape or dtype")
        self.offsets = np.cumsum([0] + [len(b) for b in self.blocks])
        self.dtype = self.blocks[0].dtype
        self.shape = (int(self.offsets[-1]), *self.blocks[0].shape[1:])
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.concatenate(self.blocks, axis=0)
        return out if dtype is None else out.astype(dtype, copy=False)

    def __iter__(self) -> Iterator[np.ndarray]:
        for b in self.blocks:
            yield from (np.array(row) for row in b)

    def __getitem__(self, key: Any) -> np.ndarray:
        rest: tuple = ()
        if isinstance(key, tuple):
            key, rest = (key[0] if key else slice(None)), key[1:]
        rows = self._rows(key)
        if not rest:
            return rows
        return rows[rest] if rows.ndim == self.ndim - 1 else rows[(slice(None), *rest)]

    def _rows(self, key: Any) -> np.ndarray:
        n = self.shape[0]
        if key is Ellipsis:
            key = slice(None)
        if isinstance(key, (int, np.integer)):
            i = int(key) + (n if key < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"row {int(key)} is out of bounds for {n} rows")
            b = int(np.searchsorted(self.offsets, i, side="right")) - 1
            return np.array(self.blocks[b][i - self.offsets[b]])
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                return self._take(np.arange(start, stop, step))
            pieces = [b[max(start - lo, 0):max(min(stop, hi) - lo, 0)]
                      for b, lo, hi in zip(self.blocks, self.offsets[:-1], self.offsets[1:],
                                           strict=True)
                      if start < hi and stop > lo]
            if not pieces:
                return np.empty((0, *self.shape[1:]), dtype=self.dtype)
            return np.concatenate(pieces, axis=0)
        idx = np.asarray(key)
        if idx.dtype == bool:
            if idx.shape != (n,):
                raise IndexError(f"boolean index of shape {idx.shape} for {n} rows")
            return self._take(np.flatnonzero(idx))
        if not np.issubdtype(idx.dtype, np.integer):
            raise IndexError(f"rows must be ints, slices, integer arrays or masks, not {key!r}")
        return self._take(idx)

    def _take(self, idx: np.ndarray) -> np.ndarray:
        n = self.shape[0]
        flat = idx.reshape(-1).astype(np.int64)
        flat = np.where(flat < 0, flat + n, flat)
        if flat.size and (flat.min() < 0 or flat.max() >= n):
            raise IndexError(f"row index out of bounds for {n} rows")
        out = np.empty((flat.size, *self.shape[1:]), dtype=self.dtype)
        owner = np.searchsorted(self.offsets, flat, side="right") - 1
        for b in np.unique(owner):
            here = owner == b
            out[here] = self.blocks[b][flat[here] - self.offsets[b]]
        return out.reshape(*idx.shape, *self.shape[1:])

    def __repr__(self) -> str:
        return f"RowsView(shape={self.shape}, dtype={self.dtype}, parts={len(self.blocks)})"


class _RowFile:
    """One layer file as a lazily opened float32 array for dask: it pickles as its path, so
    a ``distributed`` worker opens the file itself instead of being sent its rows. Rows
    stored in half precision are widened as each chunk is read."""

    def __init__(self, path: Path, n: int, spec: LayerSpec):
        self.path, self.spec = str(path), spec
        self.shape = (n, spec.dim)
        self.dtype = np.dtype(np.float32)
        self.ndim = 2

    def __getitem__(self, key: Any) -> np.ndarray:
        block = self._read_block(key)
        if block is not None:
            return block
        rows = np.memmap(self.path, dtype=self.spec.numpy_dtype, mode="r", shape=self.shape)
        return np.array(rows[key], dtype=np.float32)

    def _read_block(self, key: Any) -> np.ndarray | None:
        """A contiguous row range (how dask asks for a chunk) read with one ``np.fromfile``:
        several times faster than through a memory map's page faults (docs/performance.md,
        "STORE layer format and store dtype"). None for any other kind of index."""
        if not (isinstance(key, tuple) and len(key) == 2
                and all(isinstance(k, slice) for k in key)):
            return None
        start, stop, step = key[0].indices(self.shape[0])
        if step != 1:
            return None
        n = max(0, stop - start)
        dtype = self.spec.numpy_dtype
        flat = np.fromfile(self.path, dtype=dtype, count=n * self.shape[1],
                           offset=start * self.shape[1] * dtype.itemsize)
        return np.asarray(flat.reshape(n, self.shape[1])[:, key[1]], dtype=np.float32)

    def __dask_tokenize__(self) -> tuple:
        st = os.stat(self.path)
        return (self.path, st.st_size, st.st_mtime_ns, self.shape, self.spec.dtype)


#: rows per dask chunk: about this many bytes of float32 (dask's own default chunk size)
DASK_CHUNK_BYTES = 128 << 20


def _dask_rows(files: list[tuple[Path, int]], spec: LayerSpec) -> Any:
    """A float32 ``dask.array`` over the layer files, row chunks of ~DASK_CHUNK_BYTES that
    never cross a part (one file per task: chunk-aligned with the writers).

    float32 whatever the stored dtype: a dask array is for computing, and dask's reductions
    and dask-ml's estimators accumulate in the array's dtype (a bfloat16 sum of a million
    rows keeps 8 bits of mantissa); the memory map (``layer()``) keeps the stored dtype.
    """
    import dask.array as da

    rows = max(1, DASK_CHUNK_BYTES // (spec.dim * np.dtype(np.float32).itemsize))
    arrays = []
    for path, n in files:
        _check_layer_file(path, n, spec.row_bytes)
        arrays.append(da.from_array(_RowFile(path, n, spec), chunks=(rows, spec.dim),
                                    meta=np.empty((0, spec.dim), dtype=np.float32)))
    if not arrays:
        return da.zeros((0, spec.dim), dtype=np.float32)
    return arrays[0] if len(arrays) == 1 else da.concatenate(arrays, axis=0)


def open_store(path: str | os.PathLike) -> Store:
    """Open a STORE written by ``dvprobe extract`` (complete, or partial after a crash)."""
    return Store(path)


def as_store(store: Store | str | os.PathLike) -> Store:
    """``store`` itself, or the STORE at that path: every API that takes a STORE takes either."""
    return store if isinstance(store, Store) else Store(store)


def _key_mismatch(what: str, store: Path, extra: pd.Index, missing: pd.Index, n_theirs: int,
                  n_mine: int, hint: str) -> str:
    """Why ``what`` (a run, another STORE) cannot be joined to ``store`` by key."""
    def some(keys: pd.Index) -> str:
        shown = ", ".join(repr(_plain(k)) for k in keys[:3])
        return f" (e.g. {shown}{', ...' if len(keys) > 3 else ''})" if len(keys) else ""

    return (f"{what} does not hold the examples of STORE {store}: {len(extra):,} of its "
            f"{n_theirs:,} keys are not in the STORE{some(extra)}, and {len(missing):,} of "
            f"the STORE's {n_mine:,} keys are not in it{some(missing)} (rows are joined by "
            "key)" + (f"; {hint}" if hint else ""))


def _check_layer_file(path: Path, n: int, rowbytes: int) -> None:
    """Refuse a layer file that holds fewer than the ``n`` committed rows."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise StoreError(f"{path}: missing or unreadable ({e.strerror or e}) although "
                         f"store.json commits {n} rows: the STORE is damaged; rerun the "
                         "extraction with --overwrite") from e
    if size < n * rowbytes:
        raise StoreError(f"{path}: holds {size // rowbytes} complete rows but store.json "
                         f"commits {n}: the file was cut short and the STORE is damaged; "
                         "rerun the extraction with --overwrite")


def write_rows(path: Path, offset: int, rows: np.ndarray) -> None:
    """Write ``rows`` at byte ``offset`` of a layer file and flush them to disk."""
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(rows.tobytes())
        fh.flush()
        os.fsync(fh.fileno())


class StoreWriter:
    """Append-only, crash-safe writer used by extraction.

    ``StoreWriter.open(path, meta, layers)`` creates a STORE or reopens one for resuming (the
    fingerprint in ``meta['inputs']`` must match, so a resumed run cannot mix two inputs).
    """

    def __init__(self, path: Path, meta: dict):
        self.path = path
        self.meta = meta
        self.specs = {k: LayerSpec.from_json(k, v) for k, v in meta["layers"].items()}
        #: where annotations / runs of the partial STORE were moved when extraction resumed
        self.set_aside: Path | None = None

    def _set_aside_analyses(self) -> None:
        """Move annotations, runs and probes made on a partial STORE out of the way of a resumed
        extraction: they cover its first ``n_committed`` rows only, and would otherwise make
        every later command refuse the grown STORE (rows no longer line up). Kept, not
        deleted, under ``STORE/stale-<n>/``."""
        found = [p for p in (self.path / "annotations.parquet", self.path / "runs",
                             self.path / "probes")
                 if p.exists() and not (p.is_dir() and not any(p.iterdir()))]
        if not found:
            return
        dest = self.path / f"stale-{self.n_committed}"
        n = 1
        while dest.exists():
            n += 1
            dest = self.path / f"stale-{self.n_committed}.{n}"
        dest.mkdir()
        for p in found:
            os.replace(p, dest / p.name)
        self.set_aside = dest

    @classmethod
    def open(cls, path: str | os.PathLike, meta: Mapping[str, Any],
             layers: list[LayerSpec], *, overwrite: bool = False) -> StoreWriter:
        path = Path(path)
        meta_path = path / _META
        if path.exists() and not path.is_dir():
            raise StoreError(f"{path} is a file, not a STORE directory; choose another --out")
        if meta_path.is_file():
            # Also with overwrite: a store.json some other program wrote does not make its
            # directory ours to delete.
            old = _read_meta(meta_path)
            if overwrite:
                shutil.rmtree(path)
            elif "parts" in old:
                raise StoreError(
                    f"{path} holds an extraction split into {old['parts'].get('count')} "
                    "tasks; extract into it with --task I --num-tasks "
                    f"{old['parts'].get('count')}, or pass --overwrite to replace it")
            else:
                return cls._reopen(path, old, meta, layers)
        if path.exists() and any(path.iterdir()):
            raise StoreError(f"{path} exists and is not a STORE; refusing to write into it")
        (path / "layers").mkdir(parents=True, exist_ok=True)
        (path / "obs").mkdir(exist_ok=True)
        full = dict(meta)
        full.update(format=FORMAT, format_version=FORMAT_VERSION, n_committed=0, obs_parts=[],
                    complete=False, layers={s.name: s.to_json() for s in layers})
        for s in layers:
            (path / "layers" / f"{s.name}.bin").touch()
        atomic_write_json(meta_path, full)
        return cls(path, full)

    @classmethod
    def _reopen(cls, path: Path, old: dict, meta: Mapping[str, Any],
                layers: list[LayerSpec]) -> StoreWriter:
        """The STORE at ``path`` (whose ``store.json`` is ``old``) for resuming the same
        extraction, tidied to its last commit; refused, saying how, if it holds another."""
        # what the user asked for differently; else how the layers are stored
        differ = _differences(_comparable(old.get("inputs")),
                              _comparable(json.loads(json.dumps(meta.get("inputs")))),
                              "") or _differences(
            old.get("layers"), {s.name: s.to_json() for s in layers}, "layers.")
        if differ:
            raise StoreError(
                f"{path} already holds a different extraction ("
                + "; ".join(differ[:4]) + (f"; {len(differ) - 4} more" if len(differ) > 4
                                           else "")
                + "); pass --overwrite to replace it or choose another --out"
            )
        w = cls(path, old)
        w._truncate_to_commit()
        if not w.complete:
            w._set_aside_analyses()
        return w

    @property
    def n_committed(self) -> int:
        return int(self.meta["n_committed"])

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    def _truncate_to_commit(self) -> None:
        """Drop whatever a crash left beyond the last commit; refuse a STORE that holds
        less than it committed (a layer file cut short or deleted: resuming would append
        after a gap)."""
        n = self.n_committed
        for s in self.specs.values():
            f = self.path / "layers" / f"{s.name}.bin"
            _check_layer_file(f, n, s.row_bytes)
            if f.stat().st_size > n * s.row_bytes:  # else untouched: a rerun of a complete
                with open(f, "r+b") as fh:         # (maybe read-only) STORE writes nothing
                    fh.truncate(n * s.row_bytes)
        keep = set(self.meta["obs_parts"])
        for p in (self.path / "obs").glob("*.parquet"):
            if p.name not in keep:
                p.unlink()
        for p in (self.path / "obs").glob(".*.parquet.tmp"):  # a write cut short (disk full)
            p.unlink()

    def append(self, obs: pd.DataFrame, layers: Mapping[str, np.ndarray],
               meta_fields: Mapping[str, Any] | None = None) -> None:
        """Commit one batch: its obs rows and one row per example for every layer.

        ``meta_fields`` (e.g. extraction's read cursor and skip counts) are written in the
        same atomic ``store.json`` replace as ``n_committed``, so they can never disagree with
        the committed rows after a crash.
        """
        if self.complete:
            raise StoreError(f"{self.path} is complete; nothing can be appended")
        k = len(obs)
        if set(layers) != set(self.specs):
            raise StoreError(f"append: layers {sorted(layers)} != {sorted(self.specs)}")
        n = self.n_committed
        keys = obs["key"].to_numpy() if "key" in obs.columns else None
        stored = {}
        for name, arr in layers.items():  # every layer checked before any row is written
            s = self.specs[name]
            a = np.asarray(arr)
            if a.shape != (k, s.dim):
                raise StoreError(f"append: {name} has shape {a.shape}, expected {(k, s.dim)}")
            stored[name] = cast_rows(a, s.dtype, f"layer {name}", keys)
        for name, a in stored.items():
            s = self.specs[name]
            write_rows(self.path / "layers" / f"{name}.bin", n * s.row_bytes, a)
        part = f"part-{len(self.meta['obs_parts']):08d}.parquet"
        _write_parquet_atomic(obs.reset_index(drop=True), self.path / "obs" / part)
        meta = dict(self.meta)
        meta["obs_parts"] = [*self.meta["obs_parts"], part]
        meta["n_committed"] = n + k
        meta.update(meta_fields or {})
        atomic_write_json(self.path / _META, meta)
        self.meta = meta

    def discard(self) -> None:
        """Remove this STORE (an extraction that committed nothing): the files extraction
        writes, then the directory if nothing else is in it."""
        for s in self.specs.values():
            (self.path / "layers" / f"{s.name}.bin").unlink(missing_ok=True)
        shutil.rmtree(self.path / "obs", ignore_errors=True)
        (self.path / _META).unlink(missing_ok=True)
        for d in (self.path / "layers", self.path):
            with contextlib.suppress(OSError):
                d.rmdir()

    def update_meta(self, **fields: Any) -> None:
        meta = dict(self.meta)
        meta.update(fields)
        atomic_write_json(self.path / _META, meta)
        self.meta = meta

    def finalize(self, **fields: Any) -> Store:
        """Compact obs parts into obs.parquet and mark the STORE complete."""
        parts = [self.path / "obs" / p for p in self.meta["obs_parts"]]
        df = (pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
              if parts else pd.DataFrame())
        _write_parquet_atomic(df, self.path / "obs.parquet")
        self.update_meta(complete=True, obs_parts=[], **fields)
        shutil.rmtree(self.path / "obs", ignore_errors=True)
        return Store(self.path)
