"""``extract``: DeepVariant examples -> layer activations + per-example obs, in a STORE.

Whole-genome inputs hold 5-10 M examples, so extraction streams (bounded memory), keeps
input order with parallel data loading (see :mod:`probing.loader`) and is resumable: the
STORE is written through :class:`probing.store.StoreWriter`, whose commits are atomic, and
every commit also records the read :class:`~probing.loader.Cursor`. A crash, kill -9 or
Ctrl-C therefore loses at most the uncommitted tail; re-running the same command truncates
to the last commit and continues from its cursor without decoding what came before.

Storage dtypes: pooled rows (``max`` / ``mean``) are float32. ``flatten`` rows are stored as
float16: a flattened mixed5 map is 36,864 values per example (~150 GB per chromosome in
float32), and the activations after BN+ReLU are well inside float16's range, with ~3
significant digits, which is more than clustering / PCA need.

Mixed precision (``dtype``): ``bf16`` loads the model in bfloat16 (CPU or CUDA; pooled
embeddings agree with float32 to cosine > 0.999) and ``fp16`` in float16 (CUDA only), with the
softmax in float32 either way. A model cast gives bit-for-bit what autocast of the float32
model gives (every weight autocast would cast is cast once; pooled rows and probabilities
compared), without autocast's per-forward cast of each weight: inference tensors are never
in its cache. Activations are converted to the storage dtype on the device, after pooling.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

import dvtorch
from dvtorch import graph as dvgraph
from dvtorch import memory, parallel
from dvtorch.allocator import reuse_freed_memory
from dvtorch.cpu import native_bf16
from dvtorch.errors import DvprobeError, ExampleFormatError
from dvtorch.files import sha256_file
from dvtorch.hooks import capture
from dvtorch.layers import layer_info
from probing.examples import DVExample, check_example_info, parse_example, read_example_info
from probing.loader import Batch, Cursor, ExampleBatches, RecordSample, make_loader
from probing.regions import Regions, parse_regions
from probing.store import LayerSpec, Store, StoreWriter
from probing.tfrecord import expand_spec, is_gzip, iter_records, report_skip

POOLS = ("max", "mean", "flatten")
_LOG = logging.getLogger(__name__)

#: A *long* run: an estimated LONG_RUN_MIN_EXAMPLES examples or more (minutes of CPU fp32)
#: after --limit and --sample. Long CPU runs get the bf16 hint, and ``auto`` runs them with
#: the graph engine: its 1.5-3 s start-up is repaid after ~6-7k examples (6-7 % faster in
#: fp32 at ~165 ex/s, 25-30 % in bf16 at ~500 ex/s; README, Performance).
LONG_RUN_MIN_EXAMPLES = 16_000
#: gzipped WGS examples take ~6.5 kB each (100 MB ~ 16k examples); a plain file's size is
#: divided by its first record's size instead (~155 kB for 100x221x7).
GZ_BYTES_PER_EXAMPLE = 6_500

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: ``eager``: the model's own forward with capture hooks (every device).
#: ``graph``: CPU only, the forward traced and run by oneDNN Graph (dvtorch.graph), checked
#: against ``eager`` on its first calls of each batch shape; faster once started.
#: ``auto`` (the default): ``graph`` for a long fp32 / bf16 CPU run where oneDNN Graph is
#: available (:func:`choose_engine`), ``eager`` otherwise.
ENGINES = ("auto", "eager", "graph")
PROB_COLUMNS = ("p_hom_ref", "p_het", "p_hom_alt")
MAX_SKIP_LOCATIONS = 20  # skipped records listed by location in store.json (all are counted)
COMMIT_MAX_BYTES = 256 << 20  # commit early when this much output waits in memory
_PACKED_BATCH = 32  # batch size dvtorch.load pre-packs oneDNN weights for


class ExtractionInterrupted(KeyboardInterrupt):
    """Ctrl-C during extraction: what was finished is committed; the message says how to resume.

    A KeyboardInterrupt subclass so that the CLI (click) turns it into exit code 130.
    """


def _log(progress: bool) -> Callable[[str], None]:
    def log(msg: str) -> None:
        if progress:
            print(msg, file=sys.stderr, flush=True)
    return log


def _cudnn_flags(dev: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """cuDNN settings for a CUDA extraction, restored afterwards (a no-op elsewhere).

    ``benchmark``: every batch has the same shape, so cuDNN's kernel search pays once.
    ``allow_tf32=False`` for fp32: PyTorch runs cuDNN convolutions in TF32 by default
    (~1e-3 relative), which a STORE that says float32 must not silently be.
    """
    if dev.type != "cuda":
        return contextlib.nullcontext()
    c = torch.backends.cudnn
    return c.flags(enabled=c.enabled, benchmark=True, deterministic=c.deterministic,
                   allow_tf32=dtype != "fp32")


def estimate_total(end: Cursor, sizes: list[int]) -> int | None:
    """Records in the whole input, estimated from the shards read to the end so far.

    Why: the progress bar of a whole-genome run (hours, gzip shards whose record counts are
    unknown without reading them) should show a total and an ETA once one shard is done;
    shards of one make_examples run hold records of similar size.
    """
    done_bytes = sum(sizes[: end.shard])
    if end.shard == 0 or done_bytes == 0:
        return None
    records_done = end.position - end.record  # records of the shards before this one
    return round(records_done * sum(sizes) / done_bytes)


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; refuse cuda when torch cannot see a GPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise DvprobeError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DvprobeError(f"--device {device} requested but torch sees no CUDA device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DvprobeError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA "
                           f"device(s), numbered from 0")
    return dev


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers(dev: torch.device) -> int:
    """Loader processes when ``--workers`` is not given.

    CUDA: up to 4 (leaving a core for the main process), so decoding keeps up with the GPU.
    CPU: 1 when a core is free beyond torch's compute threads, else 0. Without a free core
    a loader process takes its CPU from the compute threads anyway and adds the transfer of
    every batch between processes: measured on 2 cores, decoding in the main process while
    the worker threads compute (0.2 ms per example) is 6-7% faster in fp32 and bf16 than
    one loader process (with batches split across the threads: ~3% fp32, ~10% bf16).
    """
    cpus = _usable_cpus()
    if dev.type == "cuda":
        return max(1, min(4, cpus - 1))
    return 1 if cpus > torch.get_num_threads() else 0


def estimate_examples(files: Sequence[str]) -> int:
    """Examples in ``files``, estimated without reading them: a gzip file's size over
    GZ_BYTES_PER_EXAMPLE, a plain file's over its first record's framed size."""
    total = 0.0
    for f in files:
        size = os.path.getsize(f)
        if size == 0:
            continue
        if is_gzip(f):
            total += size / GZ_BYTES_PER_EXAMPLE
            continue
        with open(f, "rb") as fh:
            head = fh.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else 0
        total += size / (length + 16) if 0 < length < size else 1
    return round(total)


def is_long_run(files: Sequence[str], limit: int | None, fraction: float = 1.0) -> bool:
    """Whether a run is long enough for the graph engine's start-up and the bf16 hint to
    pay: LONG_RUN_MIN_EXAMPLES or more examples estimated (:func:`estimate_examples`), of
    which ``fraction`` is sampled, within ``limit``. (``--regions`` cannot be estimated
    before reading; such a run, which reads and parses the whole input, is sized by it.)"""
    n = estimate_examples(files)
    if limit is not None:
        n = min(n, limit)
    return n * fraction >= LONG_RUN_MIN_EXAMPLES


def choose_engine(engine: str, dev: torch.device, dtype: str, long_run: bool) -> str:
    """The engine a run uses: ``auto`` is ``graph`` where it is measured faster overall (a
    long fp32 / bf16 CPU run, oneDNN Graph in this torch), ``eager`` everywhere else.

    Why not always ``graph`` on a CPU: it starts 2-3 s slower (trace, first calls, checks),
    which a short run never earns back. An explicit ``graph`` that cannot run is refused
    rather than quietly replaced, so a user who asked for it learns why.
    """
    if engine not in ENGINES:
        raise DvprobeError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "auto":
        fits = dev.type == "cpu" and dtype in ("fp32", "bf16") and long_run
        return "graph" if fits and dvgraph.available() else "eager"
    if engine == "graph":
        if dev.type != "cpu":
            raise DvprobeError(f"--engine graph runs on the CPU only, not {dev.type} "
                               "(use --engine eager or auto there)")
        if not dvgraph.available():
            raise DvprobeError("--engine graph needs oneDNN Graph (TorchScript with oneDNN), "
                               "which this torch build lacks; use --engine eager or auto")
    return engine


def _chose_none(sampling: RecordSample | None, where: Regions | None) -> str:
    """Why a run whose --sample / --regions kept no record extracted nothing."""
    said = []
    if where is not None:
        said.append(f"--regions {' '.join(where.given)} ({where.n_intervals} interval(s))")
    if sampling is not None:
        said.append(f"--sample {sampling.fraction} (seed {sampling.seed})")
    advice = [a for a, given in (("check the regions' contigs and coordinates", where),
                                 ("sample a larger fraction", sampling)) if given is not None]
    return f"{' with '.join(said)} kept none of its records; {' or '.join(advice)}"


def bundle_fingerprint(bundle: str | os.PathLike) -> str:
    """sha256 of bundle.json, which records the weights' sha256 (``dvtorch.load`` refuses
    weights that do not match it), so it identifies the model exactly without rehashing
    ~100 MB of weights."""
    p = Path(bundle) / "bundle.json"
    return sha256_file(p) if p.is_file() else ""


def check_inputs(files: Sequence[str], spec: str, shape: tuple[int, int, int],
                 channels: Sequence[int] | None) -> dict[str, Any]:
    """Refuse examples whose shape / channels differ from the model's, before any work.

    Uses example_info.json when make_examples wrote one; otherwise the first record's
    ``image/shape`` (channels cannot be checked then -- DeepVariant's call_variants has the
    same fallback). Returns what was checked, for store.json.
    """
    info = read_example_info(spec)
    if info is not None:
        check_example_info(info, shape=tuple(shape), channels=list(channels) if channels
                           else None)
        return {"source": "example_info.json", "shape": list(info.get("shape", [])),
                "channels": list(info.get("channels", []))}
    for path in files:
        first = _first_example(path)
        if first is None:
            continue
        rec, ex = first
        got = tuple(int(s) for s in ex.image.shape)
        if got != tuple(shape):
            raise ExampleFormatError(
                path, rec, f"examples have image shape {list(got)} but the model expects "
                f"{list(shape)} (no example_info.json found next to the examples, so "
                "channels could not be compared)")
        return {"source": "first record", "shape": list(got), "channels": None}
    return {"source": "none (no readable record)", "shape": None, "channels": None}


def _first_example(path: str) -> tuple[int, DVExample] | None:
    """The first record of ``path`` that reads and parses, with its index; None if none
    does before the file ends or its framing breaks. Damaged records are left for the
    extraction itself to report, or to skip under ``--skip-corrupt``: nothing is said here.
    """
    try:
        for rec, payload in iter_records(path):
            try:
                return rec, parse_example(payload, path=path, record=rec, expected_shape=None)
            except ExampleFormatError:
                continue
    except ExampleFormatError:
        pass
    return None


def _layer_specs(model: torch.nn.Module, shape: tuple[int, int, int], layers: Sequence[str],
                 pool: str) -> list[LayerSpec]:
    infos = layer_info(model, shape, list(layers))
    specs = []
    for li in infos:
        vector = len(li.shape_hwc) == 1
        if pool == "flatten" and not vector:
            specs.append(LayerSpec(li.name, li.flat_dim, "float16", "flatten", li.shape_hwc))
        else:
            specs.append(LayerSpec(li.name, li.channels, "float32",
                                   None if vector else pool, li.shape_hwc))
    return specs


def _obs_frame(batch: Batch, probs: np.ndarray) -> pd.DataFrame:
    cols: dict[str, Any] = {}
    pileup = {}
    for k, v in batch.obs.items():
        if k in ("label", "sequencing_type"):
            cols[k] = pd.array(np.where(v < 0, None, v).tolist(), dtype="Int64")
        elif k in ("depth", "mean_mapq", "frac_low_mapq", "mean_baseq", "alt_fraction",
                   "alt_strand_balance") or k not in _META_ORDER:
            pileup[k] = v
        else:
            cols[k] = v
    for i, name in enumerate(PROB_COLUMNS):
        cols[name] = probs[:, i].astype(np.float32)
    cols["pred_genotype"] = probs.argmax(axis=1).astype(np.int8)
    cols.update(pileup)
    return pd.DataFrame(cols)


_META_ORDER = ("key", "shard", "record", "chrom", "pos", "end", "ref", "alt",
               "alt_allele_indices", "locus", "variant_type", "label", "sequencing_type")


class _Pending:
    """Finished batches waiting for the next commit (output in host memory)."""

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self.clear()

    def clear(self) -> None:
        self.obs: list[pd.DataFrame] = []
        self.layers: dict[str, list[np.ndarray]] = {n: [] for n in self.names}
        self.skipped: list[dict[str, Any]] = []
        self.end: Cursor | None = None
        self.nbytes = 0
        self.batches = 0

    def add(self, obs: pd.DataFrame, layers: dict[str, np.ndarray], batch: Batch) -> None:
        self.obs.append(obs)
        for n in self.names:
            self.layers[n].append(layers[n])
            self.nbytes += layers[n].nbytes
        self.skipped.extend(batch.skipped)
        self.end = batch.end
        self.batches += 1


def _commit(writer: StoreWriter, pending: _Pending) -> None:
    if pending.end is None:
        return
    meta = writer.meta
    skipped = dict(meta.get("skipped") or {"count": 0, "first": []})
    if pending.skipped:
        first = list(skipped["first"])
        first.extend(pending.skipped[: max(0, MAX_SKIP_LOCATIONS - len(first))])
        skipped = {"count": int(skipped["count"]) + len(pending.skipped), "first": first}
    fields = {"cursor": pending.end.to_json(), "skipped": skipped}
    obs = pd.concat(pending.obs, ignore_index=True) if pending.obs else pd.DataFrame()
    if len(obs) == 0:
        writer.update_meta(**fields)  # only corrupt records: advance the cursor atomically
    else:
        layers = {n: np.concatenate(v, axis=0) for n, v in pending.layers.items()}
        writer.append(obs, layers, meta_fields=fields)
    pending.clear()


@contextlib.contextmanager
def _defer_sigint():
    """Hold Ctrl-C while a commit is written, so a commit is never half-done by us.

    (A kill -9 can still interrupt it; StoreWriter's atomic store.json covers that.)
    """
    got: list[Any] = []
    try:
        old = signal.signal(signal.SIGINT, lambda *a: got.append(a))
    except ValueError:  # not the main thread: signals cannot be handled here anyway
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if got:
            raise KeyboardInterrupt


_Result = tuple[torch.Tensor, dict[str, torch.Tensor]]


def _whole_batch_depth(model: torch.nn.Module, dev: torch.device,
                       graph_engine: dvgraph.GraphForward | None, batch_size: int,
                       shape: tuple[int, int, int], log: Callable[[str], None]) -> int:
    """How many whole batches run at once on worker threads (see :func:`_forward`); 0 to
    split each batch across the compute threads or run it in this thread instead.

    Whole batches need ``depth`` batches' worth of activation memory, so they are only
    used where that fits (:func:`dvtorch.memory.whole_batches_fit`); a run that cannot
    says so in one line, with what would fit.
    """
    if dev.type != "cpu":
        return 0
    depth = graph_engine.depth if graph_engine is not None \
        else parallel.whole_batch_depth(model.modules())
    if depth < 2:
        return 0
    element_size = next(model.parameters()).element_size()
    available = memory.available_bytes()
    fits, need = memory.whole_batches_fit(depth, batch_size, shape, element_size, available)
    if fits:
        return depth
    room = "unknown" if available is None else f"{available / 1e9:.1f} GB"
    largest = memory.largest_batch_that_fits(depth, shape, element_size, available)
    log(f"each batch is split across the {depth} compute threads: {depth} whole batches of "
        f"{batch_size} at once would need ~{need / 1e9:.1f} GB of activations, more than "
        f"{memory.IN_FLIGHT_SHARE:.0%} of the memory available ({room})"
        + (f"; --batch-size {largest} or less would fit (faster)" if largest >= 1 else ""))
    return 0


@contextlib.contextmanager
def _forward(model: torch.nn.Module, names: Sequence[str], pool: str,
             graph_engine: dvgraph.GraphForward | None, depth: int
             ) -> Iterator[tuple[Callable[[torch.Tensor], Callable[[], _Result]], int]]:
    """``(start, ahead)`` for one extraction run: ``start(pixels)`` launches a batch and
    returns a getter of its ``(probs, {layer: pooled})``; ``ahead`` batches may be started
    before the oldest one's result is taken.

    With ``depth`` > 0 (CPU, two or more compute threads, memory to spare: see
    :func:`_whole_batch_depth`) either engine runs whole batches on ``depth`` worker
    threads (one compute thread each), one more batch queued, so a core that finishes
    never waits for the loader or for the other core. Otherwise each batch runs in this
    thread (on CPU split across the compute threads), one batch ahead (on CUDA the host
    work of a batch overlaps the device's forward of the next; on CPU that is just
    ordering). The eager model's capture hooks stay on for the whole run; results are
    taken in input order.
    """
    if graph_engine is not None:
        if depth:
            yield (lambda x: graph_engine.submit(x).result), depth + 1
        else:
            def start_split(x: torch.Tensor) -> Callable[[], _Result]:
                result = graph_engine(x)
                return lambda: result

            yield start_split, 1
        return
    with capture(model, names, pool=pool) as acts:
        def taken(probs: torch.Tensor) -> _Result:
            out = {n: acts[n] for n in names}
            acts.clear()
            return probs, out

        if depth:
            def start_on_worker(x: torch.Tensor) -> Callable[[], _Result]:
                probs = parallel.submit_whole(model, x, depth)
                return lambda: taken(probs())

            yield start_on_worker, depth + 1
            return

        def start_here(x: torch.Tensor) -> Callable[[], _Result]:
            result = taken(model(x))
            return lambda: result

        yield start_here, 1


def extract(
    bundle: str | os.PathLike,
    examples: str,
    out: str | os.PathLike,
    *,
    layers: Sequence[str] = ("mixed5", "mixed10"),
    pool: str = "max",
    device: str = "auto",
    batch_size: int = 64,
    workers: int | None = None,
    dtype: str = "fp32",
    limit: int | None = None,
    skip_corrupt: bool = False,
    sample: float | None = None,
    sample_seed: int = 0,
    regions: Sequence[str] | None = None,
    overwrite: bool = False,
    engine: str = "auto",
    progress: bool = True,
    commit_interval_s: float = 15.0,
    on_batch: Callable[[int], None] | None = None,
) -> Store:
    """Run the model over ``examples`` and store pooled activations of ``layers`` + obs.

    ``examples`` is a shard spec (``name@N.gz``), glob, comma list or one file. One forward
    per batch fills every layer (forward hooks) and the softmax gives ``p_hom_ref``,
    ``p_het``, ``p_hom_alt`` and ``pred_genotype``. Rows are in input order whatever
    ``workers`` is (None: :func:`default_workers`). ``limit`` extracts the first ``limit``
    records (corrupt ones count). ``engine="graph"`` (CPU, fp32 / bf16) runs the forward as a
    oneDNN Graph program (:mod:`dvtorch.graph`), which falls back to ``"eager"`` with a
    warning if its first outputs for a batch shape differ from the eager forward's;
    ``"auto"`` picks it for long CPU runs (:func:`choose_engine`). ``sample`` extracts a
    seeded pseudo-random fraction of the records (:class:`~probing.loader.RecordSample`:
    chosen by a hash of each record, so the same ones on every rerun, resume or worker
    count); every record is still read, only the chosen ones are decoded and run.
    ``regions`` (regions like ``chr20:1-2,000,000`` or BED files: :mod:`probing.regions`)
    keeps the examples whose variant overlaps them.

    Commits happen every ``commit_interval_s`` seconds (0: after every batch), when 256 MiB
    of output is pending, on Ctrl-C and at the end; a commit is one atomic store.json
    replace, so a hard crash redoes at most the batches since the last commit.
    ``on_batch(n_rows_done)`` is called after each batch (progress hooks, tests).

    Re-running with the same arguments resumes; on a complete STORE it prints "already
    complete" and returns it. Different model / inputs / layers / pool / dtype / limit at
    the same ``out`` raise :class:`~probing.store.StoreError` unless ``overwrite``.
    """
    log = _log(progress)
    layers = [layers] if isinstance(layers, str) else list(layers)
    if not layers:
        raise DvprobeError("no layers requested (--layers)")
    if len(set(layers)) != len(layers):
        raise DvprobeError(f"duplicate layers in {layers}")
    if pool not in POOLS:
        raise DvprobeError(f"--pool must be one of {', '.join(POOLS)}, got {pool!r}")
    if dtype not in DTYPES:
        raise DvprobeError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if engine not in ENGINES:
        raise DvprobeError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if batch_size < 1:
        raise DvprobeError(f"--batch-size must be >= 1, got {batch_size}")
    if workers is not None and workers < 0:
        raise DvprobeError(f"--workers must be >= 0, got {workers}")
    if limit is not None and limit < 1:
        raise DvprobeError(f"--limit must be >= 1, got {limit}")
    if sample is None and sample_seed:
        raise DvprobeError("--sample-seed chooses which records a --sample keeps; give "
                           "--sample FRACTION too")
    sampling = RecordSample(sample, sample_seed) if sample is not None else None
    if sampling is not None and sampling.fraction == 1:
        sampling = None  # every record: the same STORE as no --sample (and resumes as one)
    where = parse_regions(regions) if regions is not None else None
    dev = resolve_device(device)
    if workers is None:
        workers = default_workers(dev)
    if dtype == "fp16" and dev.type != "cuda":
        raise DvprobeError("--dtype fp16 needs --device cuda (on a CPU, --dtype bf16 is the fast "
                           "half precision)")
    files = [str(f) for f in expand_spec(examples)]
    long_run = is_long_run(files, limit, sampling.fraction if sampling else 1.0)
    requested_engine = engine
    engine = choose_engine(engine, dev, dtype, long_run)

    if dtype == "bf16" and dev.type == "cpu" and native_bf16() is False:
        _LOG.warning("this CPU has neither AVX-512 BF16 nor AMX: bf16 is emulated here, "
                     "several times slower than float32 (3.5x measured); use --dtype fp32")

    if dev.type == "cpu":
        # glibc would otherwise page-fault every forward's activations back in (~5% fp32).
        reuse_freed_memory()
    # bf16 / fp16: the model itself in that dtype (dvtorch.load casts inputs on entry, keeps
    # the softmax in float32): the same numbers as autocast (module docstring), with weights
    # cast / pre-packed once instead of on every forward.
    half = DTYPES[dtype] if dtype != "fp32" else None
    model = dvtorch.load(bundle, device=str(dev), dtype=half)
    if dev.type == "cpu" and batch_size != _PACKED_BATCH:
        # oneDNN weights are pre-packed for one batch size; repack for ours (idempotent).
        dvtorch.optimize_for_inference(model, dtype=half, batch_size=batch_size)
    if dev.type == "cuda":
        # NHWC input is permuted to a channels_last NCHW view; channels_last weights let
        # cuDNN run NHWC kernels without layout conversions.
        model = model.to(memory_format=torch.channels_last)
    bmeta = getattr(model, "bundle_meta", {}) or {}
    shape = tuple(int(s) for s in bmeta.get("input_shape", model.input_shape))
    channels = bmeta.get("channels")
    checked = check_inputs(files, examples, shape, channels)
    specs = _layer_specs(model, shape, layers, pool)

    inputs = {
        "bundle_sha256": bundle_fingerprint(bundle),
        "examples": [{"name": Path(f).name, "size": os.path.getsize(f)} for f in files],
        "layers": layers,
        "pool": pool,
        "dtype": dtype,
        "limit": limit,
    }
    if sampling is not None:  # only when given: STOREs from before --sample still resume
        inputs["sample"] = sampling.to_json()
    if where is not None:  # the merged intervals' digest: the same bases, the same STORE
        inputs["regions"] = where.to_json()
    meta = {
        "inputs": inputs,
        "bundle": str(Path(bundle).resolve()),
        "examples_spec": examples,
        "shards": [str(Path(f).resolve()) for f in files],
        "input_shape": list(shape),
        "channels": list(channels) if channels is not None else None,
        "input_check": checked,
    }
    if where is not None:
        meta["regions_given"] = list(where.given)
    writer = StoreWriter.open(out, meta, specs, overwrite=overwrite)
    if writer.complete:
        log(f"{out}: already complete ({writer.n_committed} examples); nothing to do "
            "(pass --overwrite to redo it)")
        return Store(out)
    start = Cursor.from_json(writer.meta.get("cursor"))
    n_before = writer.n_committed
    if writer.set_aside is not None:  # said also with --no-progress: files were moved
        _log(True)(f"{out}: annotations / runs made on the {n_before} examples committed so far no "
            f"longer line up once extraction resumes; moved to {writer.set_aside} (annotate "
            "and cluster again when it completes)")
    if n_before or start.position:
        log(f"{out}: resuming after {n_before} committed examples "
            f"(shard {start.shard}, record {start.record})")

    if dtype == "fp32" and dev.type == "cpu" and native_bf16() and long_run:
        log("this CPU computes bf16 natively: --dtype bf16 extracts ~2x (AVX-512 BF16) to "
            "~3x (AMX) faster than float32 (max-pooled mixed5 cosine >= 0.9997 to float32; "
            "README, Performance)")
    if requested_engine == "auto" and engine == "graph":
        log("engine: graph (a long CPU run: oneDNN Graph, checked against the eager forward on "
            "its first batches; measured 6-7% faster in fp32, 25-30% in bf16 once started; "
            "--engine eager for PyTorch's own forward)")
    dataset = ExampleBatches(files, batch_size=batch_size, shape=shape, channels=channels,
                             start=start, limit=limit, skip_corrupt=skip_corrupt,
                             sample=sampling, regions=where)
    loader = make_loader(dataset, workers=workers, pin_memory=dev.type == "cuda")
    names = [s.name for s in specs]
    store_dtypes = {s.name: getattr(torch, s.dtype) for s in specs}
    graph_engine = dvgraph.GraphForward(model, names, pool) if engine == "graph" else None
    depth = _whole_batch_depth(model, dev, graph_engine, batch_size, shape, log)
    pending = _Pending(names)
    bar = None
    sizes = [os.path.getsize(f) for f in files]
    if progress:
        from tqdm.auto import tqdm

        # with --sample, --limit counts records read, not examples: no exact total then
        bar = tqdm(total=limit if sampling is None and where is None else None,
                   initial=n_before, unit="ex",
                   dynamic_ncols=True, desc="extract", file=sys.stderr, smoothing=0.1)
    t_start = time.perf_counter()
    t_wait = 0.0
    last_commit = t_start
    n_new = 0
    in_flight: collections.deque[tuple[Batch, Callable[[], _Result]]] = collections.deque()

    def finish(batch: Batch, result: Callable[[], _Result]) -> None:
        """Host side of a batch whose forward has been launched: copy, build obs, queue."""
        nonlocal n_new, last_commit
        probs_dev, acts_dev = result()
        probs = probs_dev.float().cpu().numpy()
        # Converted on the device: a flattened layer crosses to the host as float16, half the
        # bytes (torch and numpy both round to nearest even: the same values).
        arrs = {n: acts_dev[n].to(store_dtypes[n]).cpu().numpy() for n in names}
        obs = _obs_frame(batch, probs)
        with _defer_sigint():  # a batch is queued whole or not at all
            pending.add(obs, arrs, batch)
            n_new += batch.n
        if bar is not None:
            if limit is None and where is None and len(sizes) > 1:
                total = estimate_total(batch.end, sizes)
                if total is not None:
                    total = round(total * (sampling.fraction if sampling else 1.0))
                    bar.total = max(total, bar.n + batch.n)
                bar.set_postfix_str(f"shard {min(batch.end.shard + 1, len(sizes))}/"
                                    f"{len(sizes)}", refresh=False)
            bar.update(batch.n)
        now = time.perf_counter()
        if now - last_commit >= commit_interval_s or pending.nbytes >= COMMIT_MAX_BYTES:
            with _defer_sigint():
                _commit(writer, pending)
            last_commit = time.perf_counter()
        if on_batch is not None:
            on_batch(n_before + n_new)

    it = iter(loader)
    try:
        with torch.inference_mode(), _cudnn_flags(dev, dtype), \
                _forward(model, names, pool, graph_engine, depth) as (start_batch, ahead):

            def finish_all_but(keep: int) -> None:
                while len(in_flight) > keep:
                    finish(*in_flight.popleft())

            while True:
                t0 = time.perf_counter()
                batch = next(it, None)
                t_wait += time.perf_counter() - t0
                if batch is None:
                    break
                for skip in batch.skipped:  # here, once, in input order, whoever decoded it
                    report_skip(skip["file"], skip["record"], skip["reason"])
                if batch.n == 0:
                    # Every record of this batch was corrupt and skipped, or its first
                    # record is bad: the cursor moves on to where it ends.
                    finish_all_but(0)
                    with _defer_sigint():
                        pending.skipped.extend(batch.skipped)
                        pending.end = batch.end
                else:
                    # Raw uint8 into the model, which scales the pixels itself (exactly
                    # like dvtorch.preprocess): on CPU inside each compute thread,
                    # straight into the model's dtype; on CUDA after a 4x smaller
                    # host-to-device copy. Batches are finished in input order.
                    in_flight.append((batch, start_batch(batch.images.to(dev,
                                                                         non_blocking=True))))
                    finish_all_but(ahead)
                if batch.error is not None:
                    # A bad record: keep and commit everything before it, then report.
                    finish_all_but(0)
                    with _defer_sigint():
                        _commit(writer, pending)
                    batch.raise_error()
            finish_all_but(0)
        with _defer_sigint():
            _commit(writer, pending)
    except KeyboardInterrupt:
        # Abandon the batch in flight; commit the finished ones; say how to resume.
        with contextlib.suppress(Exception):
            del it
        with _defer_sigint():
            _commit(writer, pending)
        if bar is not None:
            bar.close()
        msg = (f"interrupted: {writer.n_committed} examples are committed in {out}; run the "
               "same command again to resume from there")
        log(msg)
        raise ExtractionInterrupted(msg) from None
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t_start
    skipped = writer.meta.get("skipped") or {"count": 0, "first": []}
    if writer.n_committed == 0:
        # An empty STORE only fails later ("the STORE has no examples"); say it now, and
        # leave no empty STORE behind to be resumed or mistaken for a result.
        writer.discard()
        first = skipped["first"][0] if skipped["first"] else None
        if sampling is not None or where is not None:  # what the user chose kept nothing
            why = _chose_none(sampling, where) + (
                f" ({skipped['count']} corrupt record(s) skipped as well)" if first else "")
        elif first:
            why = (f"every record read was corrupt and skipped ({skipped['count']}; first: "
                   f"{first['file']}, record {first['record']}: {first['reason']})")
        else:
            why = "it holds no records"
        raise DvprobeError(f"{examples}: nothing to extract: {why}; no STORE was written")
    summary = {
        "n": writer.n_committed,
        "n_this_run": n_new,
        "seconds": round(elapsed, 3),
        "examples_per_s": round(n_new / elapsed, 2) if elapsed > 0 else None,
        "data_loading_share": round(t_wait / elapsed, 4) if elapsed > 0 else None,
        "device": str(dev),
        "batch_size": batch_size,
        "workers": workers,
        "engine": engine,
        "engine_requested": requested_engine,
        "torch": torch.__version__,
    }
    if graph_engine is not None and graph_engine.fallback_reason is not None:
        summary["engine_fallback"] = graph_engine.fallback_reason
    store = writer.finalize(skipped=skipped, extraction=summary)
    log(f"extracted {summary['n']} examples ({n_new} this run) in {elapsed:.1f} s: "
        f"{summary['examples_per_s']} ex/s, data loading {100 * t_wait / max(elapsed, 1e-9):.0f}% "
        f"of wall time" + (f"; skipped {skipped['count']} corrupt records"
                           if skipped["count"] else "") + f" -> {out}"
        + (f" (engine graph fell back to eager: {summary['engine_fallback']})"
           if "engine_fallback" in summary else ""))
    return store
