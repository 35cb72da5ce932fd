"""STORE layer format: today's raw memmap files against Zarr v3, on realistic activations.

    .venv/bin/python bench/bench_store_format.py --store dvprobe-demo/store
    .venv/bin/python bench/bench_store_format.py --store S --rows 20000 --repeats 1   # quick
    .venv/bin/python bench/bench_store_format.py --store S --configs memmap zarr:zstd1:c4096

Why: a genome is 5-8 million examples and the blog's six pooled layers are ~27 kB each in
float32 (~160 GB a genome). Before the STORE moves to chunked Zarr (what Dask and AnnData
read) we measure what it buys (disk) and costs (throughput) against the raw ``.bin`` files
that ``probing/store.py`` writes and ``np.memmap`` reads today.

Data: the six layers of a real STORE (``dvprobe demo``'s, by default its mixed1..mixed10)
are not random noise, but a few thousand rows are too few to measure with. So each row
written is a random row of that STORE (one draw per example, shared by its six layers)
times ``1 + sigma * N(0, 1)`` per element (``--sigma``, default 0.01): zeros stay zeros,
signs, exponents and the per-channel scale stay, and the low mantissa bits become as
random as a real extraction's, so a row is never repeated byte for byte (a plain tiling
would let zstd find whole copies and flatter every codec). The bench prints each codec's
ratio on the STORE's untouched rows beside the ratio on the generated ones, to check this.

Formats (``--configs``; default: all of these):

* ``memmap-fsync``: exactly today's ``StoreWriter.append`` for the layers: open, seek,
  write, ``fsync`` per layer and batch (the commit protocol needs the fsync);
* ``memmap``: the same without the per-batch fsync (the format alone);
* ``zarr:CODEC:LAYOUT`` with CODEC ``none``, ``zstd1``, ``zstd3``, ``lz4-shuffle`` or
  ``lz4-bitshuffle`` (blosc, clevel 5) and LAYOUT ``cR`` (chunks of R rows, full width) or
  ``sR/r`` (shards of R rows holding chunks of r rows). The writer buffers batches and
  writes whole chunks (whole shards when sharded), as zarr-python issue 3682 demands of
  one writer per part; ``:unbuffered`` writes each batch of 256 where it lands instead
  (partial chunks are read, decoded and rewritten), on at most ``--unbuffered-rows`` rows.

Measured per format: write throughput (batches of ``--batch`` rows, one writer, timing
only the writer's calls, a final fsync of every file included), disk bytes and files, a
sequential full pass of every layer by 16,384-row slices, ``--sample`` sorted random rows
of every layer (analysis fit samples), and the Dask full-pass mean over rows
(``da.from_zarr`` against ``da.from_array(np.memmap)``, and for the raw files also Dask
chunks read with one ``np.fromfile`` each, "dask pread"). Reads run ``cold`` (the files'
pages dropped from the page cache with ``posix_fadvise(DONTNEED)``, which touches no
other file) and ``warm`` (straight after); each ``--repeats`` times, the median printed.
Every read is checked against the memmap copy (same sums). The machine is shared: rerun
when quiet and compare medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from machine import cpu_model  # bench/machine.py

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from probing.demo import DEMO_LAYERS  # noqa: E402
from probing.store import open_store  # noqa: E402

SEQ_STEP = 16384
DEFAULT_CONFIGS = (
    "memmap-fsync", "memmap",
    "zarr:none:c4096", "zarr:zstd1:c4096", "zarr:zstd3:c4096",
    "zarr:lz4-shuffle:c4096", "zarr:lz4-bitshuffle:c4096",
    "zarr:none:c16384", "zarr:zstd1:c16384", "zarr:lz4-bitshuffle:c16384",
    "zarr:none:s16384/1024", "zarr:zstd1:s16384/1024", "zarr:lz4-bitshuffle:s16384/1024",
    "zarr:zstd1:c4096:unbuffered",
)


# -- machine ------------------------------------------------------------------------------


def machine() -> dict:
    import dask
    import numcodecs
    import zarr

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "zarr": zarr.__version__,
            "numcodecs": numcodecs.__version__, "dask": dask.__version__,
            "zarr_async": dict(zarr.config.get("async")),
            "zarr_threading": dict(zarr.config.get("threading")),
            "platform": platform.platform()}


# -- data ---------------------------------------------------------------------------------
@dataclass
class Source:
    """Rows of a real STORE, drawn and perturbed into as many examples as asked for."""

    base: dict[str, np.ndarray]  # layer -> [m, dim] float32 rows of the STORE
    sigma: float
    seed: int

    @classmethod
    def from_store(cls, path: Path, layers: list[str], sigma: float, seed: int) -> Source:
        store = open_store(path)
        missing = [name for name in layers if name not in store.layers]
        if missing:
            raise SystemExit(f"{path}: no layer(s) {missing}; it holds {store.layers}")
        return cls({name: np.array(store.layer(name), dtype=np.float32) for name in layers},
                   sigma, seed)

    @property
    def dims(self) -> dict[str, int]:
        return {name: a.shape[1] for name, a in self.base.items()}

    @property
    def row_bytes(self) -> int:
        return sum(self.dims.values()) * 4

    def batch(self, index: int, rows: int) -> dict[str, np.ndarray]:
        """Batch ``index`` (the same rows every call, whatever the format being written)."""
        rng = np.random.default_rng((self.seed, index))
        m = next(iter(self.base.values())).shape[0]
        pick = rng.integers(0, m, size=rows)
        out = {}
        for name, a in self.base.items():
            noise = rng.standard_normal(size=(rows, a.shape[1]), dtype=np.float32)
            out[name] = a[pick] * (1 + self.sigma * noise)
        return out

    def batches(self, n: int, size: int) -> Iterator[dict[str, np.ndarray]]:
        for i, start in enumerate(range(0, n, size)):
            yield self.batch(i, min(size, n - start))


# -- formats ------------------------------------------------------------------------------
def zarr_codecs(name: str, typesize: int = 4) -> list:
    """The compressor list of a codec name (``none`` = raw bytes); ``typesize`` is the
    element size blosc shuffles by."""
    from zarr.codecs import BloscCodec, ZstdCodec

    table = {
        "none": [],
        "zstd1": [ZstdCodec(level=1)],
        "zstd3": [ZstdCodec(level=3)],
        "lz4-shuffle": [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=typesize)],
        "lz4-bitshuffle": [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle",
                                      typesize=typesize)],
        "zstd1-bitshuffle": [BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle",
                                        typesize=typesize)],
    }
    if name not in table:
        raise SystemExit(f"unknown codec {name!r}; one of {sorted(table)}")
    return table[name]


@dataclass(frozen=True)
class Config:
    """One format to measure, parsed from ``memmap[-fsync]`` or ``zarr:CODEC:LAYOUT[:unbuffered]``."""

    name: str
    kind: str                     # memmap | zarr
    fsync_each: bool = False
    codec: str = "none"
    chunk_rows: int = 0
    shard_rows: int | None = None
    buffered: bool = True

    @classmethod
    def parse(cls, text: str) -> Config:
        if text in ("memmap", "memmap-fsync"):
            return cls(text, "memmap", fsync_each=text.endswith("fsync"))
        parts = text.split(":")
        if parts[0] != "zarr" or len(parts) not in (3, 4) or parts[3:] not in ([], ["unbuffered"]):
            raise SystemExit(f"bad config {text!r}: memmap, memmap-fsync or "
                             "zarr:CODEC:cROWS|sROWS/ROWS[:unbuffered]")
        zarr_codecs(parts[1])
        layout = parts[2]
        if layout.startswith("c"):
            chunk, shard = int(layout[1:]), None
        elif layout.startswith("s") and "/" in layout:
            shard, chunk = (int(v) for v in layout[1:].split("/"))
            if shard % chunk:
                raise SystemExit(f"{text}: the shard rows must be a multiple of the chunk rows")
        else:
            raise SystemExit(f"bad layout {layout!r} in {text!r}: cROWS or sROWS/ROWS")
        return cls(text, "zarr", codec=parts[1], chunk_rows=chunk, shard_rows=shard,
                   buffered=len(parts) == 3)

    @property
    def write_rows(self) -> int:
        """Rows of one whole write unit (a shard when sharded, else a chunk)."""
        return self.shard_rows or self.chunk_rows


class MemmapWriter:
    """Today's layer files: raw row-major float32 appended as ``StoreWriter.append`` does."""

    def __init__(self, root: Path, dims: dict[str, int], fsync_each: bool):
        self.root, self.dims, self.fsync_each, self.n = root, dims, fsync_each, 0
        root.mkdir(parents=True)
        for name in dims:
            (root / f"{name}.bin").touch()

    def append(self, batch: dict[str, np.ndarray]) -> None:
        k = len(next(iter(batch.values())))
        for name, a in batch.items():
            with open(self.root / f"{name}.bin", "r+b") as fh:
                fh.seek(self.n * self.dims[name] * 4)
                fh.write(np.ascontiguousarray(a, dtype=np.float32).tobytes())
                if self.fsync_each:
                    fh.flush()
                    os.fsync(fh.fileno())
        self.n += k

    def close(self) -> None:
        fsync_tree(self.root)

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: np.memmap(self.root / f"{name}.bin", dtype=np.float32, mode="r",
                                shape=(self.n, d)) for name, d in self.dims.items()}


class ZarrWriter:
    """One Zarr v3 group, one array per layer; whole chunks (shards) per write when buffered."""

    def __init__(self, root: Path, dims: dict[str, int], cfg: Config):
        import zarr

        self.root, self.cfg, self.n = root, cfg, 0
        group = zarr.open_group(root, mode="w")
        self.arrays_ = {
            name: group.create_array(
                name, shape=(0, d), dtype="float32", chunks=(cfg.chunk_rows, d),
                shards=(cfg.shard_rows, d) if cfg.shard_rows else None,
                compressors=zarr_codecs(cfg.codec) or None)
            for name, d in dims.items()}
        self.pending: list[dict[str, np.ndarray]] = []
        self.pending_rows = 0

    def append(self, batch: dict[str, np.ndarray]) -> None:
        self.pending.append(batch)
        self.pending_rows += len(next(iter(batch.values())))
        if not self.cfg.buffered or self.pending_rows >= self.cfg.write_rows:
            self._flush(self.pending_rows if not self.cfg.buffered else self.cfg.write_rows)

    def _flush(self, rows: int) -> None:
        """Write the first ``rows`` pending rows at the end of every array."""
        joined = {name: np.concatenate([b[name] for b in self.pending])
                  for name in self.arrays_}
        for name, arr in self.arrays_.items():
            arr.resize((self.n + rows, arr.shape[1]))
            arr[self.n:self.n + rows] = joined[name][:rows]
        self.n += rows
        self.pending_rows -= rows
        self.pending = [{name: a[rows:] for name, a in joined.items()}] if self.pending_rows else []

    def close(self) -> None:
        if self.pending_rows:
            self._flush(self.pending_rows)
        fsync_tree(self.root)

    def arrays(self) -> dict:
        return self.arrays_


def fsync_tree(root: Path) -> None:
    for f in files_of(root):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def files_of(root: Path) -> list[Path]:
    return [Path(d) / f for d, _, fs in os.walk(root) for f in fs]


def drop_cache(root: Path) -> None:
    """Drop ``root``'s (clean, fsynced) pages from the page cache: a cold read of our files
    only, without touching anybody else's cache on a shared machine."""
    for f in files_of(root):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_usage(root: Path) -> tuple[int, int, int]:
    """(apparent bytes, allocated bytes, files) under ``root``."""
    fs = files_of(root)
    st = [f.stat() for f in fs]
    return sum(s.st_size for s in st), sum(s.st_blocks * 512 for s in st), len(fs)


# -- measurements -------------------------------------------------------------------------
def stored_bytes(a: np.ndarray, codec: str, chunk_rows: int = 4096) -> int:
    """Bytes ``a`` takes in a Zarr array with ``codec`` (in memory; dtype kept). Zarr has
    no bfloat16, so a bfloat16 array is stored as its bits (uint16), byte for byte."""
    import zarr

    if a.dtype.kind == "V" or a.dtype.name == "bfloat16":
        a = a.view(np.uint16)
    arr = zarr.create_array(zarr.storage.MemoryStore(), shape=a.shape, dtype=a.dtype,
                            chunks=(min(chunk_rows, len(a)), a.shape[1]),
                            compressors=zarr_codecs(codec, a.dtype.itemsize) or None)
    arr[:] = a
    return int(arr.nbytes_stored())  # chunks plus ~1 kB of metadata


def codec_check(source: Source, codecs: list[str]) -> list[dict]:
    """Each codec's ratio on the STORE's own rows and on as many generated rows."""
    m = next(iter(source.base.values())).shape[0]
    made = source.batch(10**6, m)
    out = []
    for codec in codecs:
        raw = sum(a.nbytes for a in source.base.values())
        real = sum(stored_bytes(a, codec) for a in source.base.values())
        gen = sum(stored_bytes(a, codec) for a in made.values())
        out.append({"codec": codec, "ratio_store_rows": round(raw / real, 3),
                    "ratio_generated_rows": round(raw / gen, 3)})
    return out


def write(cfg: Config, source: Source, root: Path, rows: int, batch: int):
    """Write ``rows`` rows; seconds spent in the writer (data generation excluded)."""
    writer = (MemmapWriter(root, source.dims, cfg.fsync_each) if cfg.kind == "memmap"
              else ZarrWriter(root, source.dims, cfg))
    spent = 0.0
    sums = dict.fromkeys(source.dims, 0.0)
    for b in source.batches(rows, batch):
        for name, a in b.items():
            sums[name] += float(a.sum(dtype=np.float64))
        t = time.perf_counter()
        writer.append(b)
        spent += time.perf_counter() - t
    t = time.perf_counter()
    writer.close()
    spent += time.perf_counter() - t
    return writer, spent, sums


def open_arrays(cfg: Config, root: Path, dims: dict[str, int], n: int) -> dict:
    if cfg.kind == "memmap":
        return {name: np.memmap(root / f"{name}.bin", dtype=np.float32, mode="r",
                                shape=(n, d)) for name, d in dims.items()}
    import zarr

    return {name: zarr.open_array(root / name, mode="r") for name in dims}


def sequential(arrays: dict, n: int) -> tuple[float, dict[str, float]]:
    """A full pass of every layer by row slices: seconds reading, and each layer's sum."""
    spent, sums = 0.0, {}
    for name, arr in arrays.items():
        total = 0.0
        for s in range(0, n, SEQ_STEP):
            t = time.perf_counter()
            block = np.array(arr[s:s + SEQ_STEP])
            spent += time.perf_counter() - t
            total += float(block.sum(dtype=np.float64))
        sums[name] = total
    return spent, sums


def random_rows(arrays: dict, idx: np.ndarray, kind: str) -> tuple[float, dict[str, float]]:
    """``idx`` (sorted) rows of every layer, as analysis draws a fit sample."""
    spent, sums = 0.0, {}
    for name, arr in arrays.items():
        t = time.perf_counter()
        block = np.asarray(arr[idx]) if kind == "memmap" else arr.oindex[idx, :]
        spent += time.perf_counter() - t
        sums[name] = float(block.sum(dtype=np.float64))
    return spent, sums


def dask_mean(arrays: dict, cfg: Config) -> tuple[float, dict[str, float]]:
    """Dask's mean over rows of every layer (threads), from Zarr or from the memmap."""
    import dask.array as da

    t = time.perf_counter()
    sums = {}
    for name, arr in arrays.items():
        if cfg.kind == "memmap":
            d = da.from_array(arr, chunks=(SEQ_STEP, arr.shape[1]))
        else:
            d = da.from_zarr(arr, chunks=(cfg.write_rows, arr.shape[1]))
        sums[name] = float(d.mean(axis=0, dtype=np.float64).compute(scheduler="threads").sum()
                           * arr.shape[0])
    return time.perf_counter() - t, sums


def dask_pread_mean(root: Path, dims: dict[str, int], n: int) -> tuple[float, dict]:
    """The same mean from the raw files, each Dask chunk read with ``np.fromfile`` (one
    read call) instead of sliced out of a memory map (a page fault per 4 kB page)."""
    import dask
    import dask.array as da

    def read(path: Path, start: int, rows: int, dim: int) -> np.ndarray:
        return np.fromfile(path, dtype=np.float32, count=rows * dim,
                           offset=start * dim * 4).reshape(rows, dim)

    t = time.perf_counter()
    sums = {}
    for name, dim in dims.items():
        path = root / f"{name}.bin"
        blocks = [da.from_delayed(dask.delayed(read)(path, s, min(SEQ_STEP, n - s), dim),
                                  shape=(min(SEQ_STEP, n - s), dim), dtype=np.float32)
                  for s in range(0, n, SEQ_STEP)]
        d = da.concatenate(blocks)
        sums[name] = float(d.mean(axis=0, dtype=np.float64).compute(scheduler="threads").sum()
                           * n)
    return time.perf_counter() - t, sums


def check(what: str, got: dict[str, float], want: dict[str, float]) -> None:
    for name, v in want.items():
        if not np.isclose(got[name], v, rtol=1e-7, atol=1e-3):
            raise SystemExit(f"{what}: layer {name} sums to {got[name]!r}, expected {v!r}")


def median_of(repeats: int, root: Path, cold: bool, measure: Callable[[], tuple]) -> tuple:
    """Median seconds of ``measure`` over ``repeats`` runs, and its last result."""
    times, result = [], None
    for _ in range(repeats):
        if cold:
            drop_cache(root)
        spent, result = measure()
        times.append(spent)
    return statistics.median(times), result


def measure(cfg: Config, source: Source, root: Path, args) -> dict:
    """Every figure of one format; its files are removed afterwards."""
    rows = min(args.rows, args.unbuffered_rows) if not cfg.buffered else args.rows
    writer, spent, want = write(cfg, source, root, rows, args.batch)
    apparent, allocated, files = disk_usage(root)
    mb = rows * source.row_bytes / 1e6
    out = {"config": cfg.name, "rows": rows, "write_s": round(spent, 2),
           "write_rows_s": round(rows / spent), "write_MB_s": round(mb / spent),
           "disk_bytes": apparent, "disk_allocated": allocated, "files": files,
           "ratio": round(rows * source.row_bytes / apparent, 3),
           "bytes_per_row": round(apparent / rows)}
    if cfg.buffered:
        arrays = open_arrays(cfg, root, source.dims, rows)
        rng = np.random.default_rng(args.seed)
        idx = np.sort(rng.choice(rows, size=min(args.sample, rows), replace=False))
        for temp in ("cold", "warm"):
            t, got = median_of(args.repeats, root, temp == "cold",
                               lambda: sequential(arrays, rows))
            check(f"{cfg.name} sequential", got, want)
            out[f"seq_{temp}_rows_s"] = round(rows / t)
            t, got = median_of(args.repeats, root, temp == "cold",
                               lambda: random_rows(arrays, idx, cfg.kind))
            args.sample_sums = getattr(args, "sample_sums", None) or got
            check(f"{cfg.name} random rows", got, args.sample_sums)
            out[f"rand_{temp}_rows_s"] = round(len(idx) / t)
        t, got = median_of(args.repeats, root, True, lambda: dask_mean(arrays, cfg))
        check(f"{cfg.name} dask mean", got, want)
        out["dask_cold_rows_s"] = round(rows / t)
        if cfg.kind == "memmap":
            t, got = median_of(args.repeats, root, True,
                               lambda: dask_pread_mean(root, source.dims, rows))
            check(f"{cfg.name} dask pread mean", got, want)
            out["dask_pread_cold_rows_s"] = round(rows / t)
    del writer
    shutil.rmtree(root)
    return out


COLUMNS = (("config", "format"), ("write_rows_s", "write rows/s"), ("write_MB_s", "MB/s"),
           ("bytes_per_row", "B/row"), ("ratio", "ratio"), ("files", "files"),
           ("seq_cold_rows_s", "seq cold"), ("seq_warm_rows_s", "seq warm"),
           ("rand_cold_rows_s", "rand cold"), ("rand_warm_rows_s", "rand warm"),
           ("dask_cold_rows_s", "dask cold"),
           ("dask_pread_cold_rows_s", "dask pread cold"))


def print_table(rows: list[dict]) -> None:
    print("| " + " | ".join(h for _, h in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for r in rows:
        cells = [r.get(k, "") for k, _ in COLUMNS]
        print("| " + " | ".join(f"{c:,}" if isinstance(c, int) else str(c) for c in cells)
              + " |", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, required=True,
                    help="a STORE with the layers (dvprobe demo's: OUT/store)")
    ap.add_argument("--layers", nargs="+", default=list(DEMO_LAYERS))
    ap.add_argument("--rows", type=int, default=100_000, help="rows written per format")
    ap.add_argument("--batch", type=int, default=256, help="rows per append (extraction's)")
    ap.add_argument("--sample", type=int, default=50_000, help="random rows read")
    ap.add_argument("--unbuffered-rows", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=3, help="reads per figure (median)")
    ap.add_argument("--sigma", type=float, default=0.01, help="relative noise per element")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS))
    ap.add_argument("--workdir", type=Path, default=None, help="where files are written "
                    "(default: a temporary directory, removed afterwards)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)
    configs = [Config.parse(c) for c in args.configs]
    info = machine()
    print(json.dumps(info))
    source = Source.from_store(args.store, args.layers, args.sigma, args.seed)
    m = next(iter(source.base.values())).shape[0]
    print(f"source: {args.store}, {m:,} rows; layers {source.dims}; {source.row_bytes:,} "
          f"bytes a row in float32; {args.rows:,} rows written per format in batches of "
          f"{args.batch}; sigma {args.sigma}; {args.sample:,} random rows; "
          f"{args.repeats} repeat(s), median", flush=True)
    codecs = sorted({c.codec for c in configs if c.kind == "zarr"} - {"none"})
    ratios = codec_check(source, codecs)
    for r in ratios:
        print(f"codec {r['codec']}: ratio {r['ratio_store_rows']} on the STORE's rows, "
              f"{r['ratio_generated_rows']} on generated rows", flush=True)
    import dask.array as da

    da.ones((8, 8), chunks=4).mean().compute(scheduler="threads")  # one-time start-up cost
    work = Path(tempfile.mkdtemp(prefix="bench-store-format-", dir=args.workdir))
    results = []
    try:
        for i, cfg in enumerate(configs):
            results.append(measure(cfg, source, work / f"f{i}", args))
            print(json.dumps(results[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\nrows/s (reads: median of the repeats; rand = random rows read per second)")
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "args": {
            k: str(v) for k, v in vars(args).items() if k != "sample_sums"},
            "codec_check": ratios, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
