"""``extract``: DeepVariant examples -> layer activations + per-example obs, in a STORE.

Whole-genome inputs hold 5-10 M examples, so extraction streams (bounded memory), keeps
input order with parallel data loading (see :mod:`probing.loader`) and is resumable: the
STORE is written through :class:`probing.store.StoreWriter`, whose commits are atomic, and
every commit also records the read :class:`~probing.loader.Cursor`. A crash, kill -9 or
Ctrl-C therefore loses at most the uncommitted tail; re-running the same command truncates
to the last commit and continues from its cursor without decoding what came before.

Storage dtypes: pooled rows (``max`` / ``mean``, and layers that are vectors already) are
float32, or ``store_dtype`` (``--store-dtype float16 | bfloat16``: half the disk; the loss
against float32 is measured in docs/performance.md). They cross from the engine as float32
and the writer rounds them to the nearest (ties to even, as numpy's / ml_dtypes' ``astype``),
refusing a value beyond float16's range rather than storing inf
(:func:`probing.store.cast_rows`). ``flatten`` rows are stored as float16: a flattened
mixed5 map is 36,864 values per example (about 150 GB per chromosome in float32), and the
activations after BN+ReLU are well inside float16's range, with ~3 significant digits,
which is more than clustering / PCA need.

Mixed precision (``dtype``): ``bf16`` runs the engine in bfloat16 (CPU or CUDA; pooled
embeddings agree with float32 to cosine > 0.999) and ``fp16`` in float16 (CUDA only), with
the softmax in float32 either way. Casting the weights once gives bit-for-bit what autocast
of the float32 model gives, without autocast's per-forward cast of each weight.
Flattened maps are converted to float16 on the device, after pooling.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

import dvtorch
from dvtorch.bundle import resolve_bundle
from dvtorch.engine import DTYPES, Engine, Result, make_engine
from dvtorch.engine.cpu_features import native_bf16
from dvtorch.errors import DvprobeError, ExampleFormatError
from dvtorch.files import bundle_fingerprint
from dvtorch.layers import layer_info
from probing.cvo import small_model_calls, small_model_flags
from probing.examples import DVExample, check_example_info, parse_example, read_example_info
from probing.loader import Batch, Cursor, ExampleBatches, RecordSample, make_loader
from probing.regions import Regions, parse_regions
from probing.schema import PROB_COLUMNS
from probing.store import (
    DEFAULT_STORE_DTYPE,
    STORE_DTYPES,
    LayerSpec,
    Store,
    StoreWriter,
    open_parted_root,
    part_states,
)
from probing.tasks import PARTS_DIR, PartClaim, Task, TaskRange, resolve_task, split_input
from probing.tfrecord import expand_spec, is_gzip, iter_records, report_skip

POOLS = ("max", "mean", "flatten")
_LOG = logging.getLogger(__name__)

#: A *long* run: an estimated LONG_RUN_MIN_EXAMPLES examples or more (minutes of CPU fp32)
#: after --limit and --sample; long fp32 runs on a CPU with native bf16 get the bf16 hint.
LONG_RUN_MIN_EXAMPLES = 16_000
#: gzipped WGS examples take ~6.5 kB each; a plain file's size is divided by its first
#: record's size instead.
GZ_BYTES_PER_EXAMPLE = 6_500

MAX_SKIP_LOCATIONS = 20  # skipped records listed by location in store.json (all are counted)
COMMIT_MAX_BYTES = 256 << 20  # commit early when this much output waits in memory


class ExtractionInterrupted(KeyboardInterrupt):
    """Ctrl-C during extraction: what was finished is committed; the message says how to resume.

    A KeyboardInterrupt subclass so that the CLI (click) turns it into exit code 130.
    """


def _log(progress: bool) -> Callable[[str], None]:
    def log(msg: str) -> None:
        if progress:
            print(msg, file=sys.stderr, flush=True)
    return log


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


def _rank_device(dev: torch.device, config: ExtractConfig) -> torch.device:
    """Under torchrun, ``--device auto`` is this rank's GPU (``LOCAL_RANK``; every rank
    on cuda:0 would share one GPU), or cuda:0 where each rank sees only its own."""
    local = os.environ.get("LOCAL_RANK", "")
    if config.device != "auto" or dev.type != "cuda" or config.task is None \
            or not local.isdigit():
        return dev
    return torch.device("cuda", int(local) % torch.cuda.device_count())


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
    every batch between processes: on 2 cores, decoding in the main process while the
    worker threads compute is faster than one loader process (docs/performance.md).
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
    """Whether a run is long enough for the bf16 hint: LONG_RUN_MIN_EXAMPLES or more examples estimated (:func:`estimate_examples`), of
    which ``fraction`` is sampled, within ``limit``. (``--regions`` cannot be estimated
    before reading; such a run, which reads and parses the whole input, is sized by it.)"""
    n = estimate_examples(files)
    if limit is not None:
        n = min(n, limit)
    return n * fraction >= LONG_RUN_MIN_EXAMPLES


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


def _stored_as(specs: list[LayerSpec], store_dtype: str) -> list[LayerSpec]:
    """``specs`` with every row but a flattened map's (always float16) in ``store_dtype``."""
    return [s if s.pool == "flatten" else replace(s, dtype=store_dtype)
            for s in specs]


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


@dataclass(frozen=True)
class ExtractConfig:
    """What to extract, from what, into where; every option of ``dvprobe extract``.

    ``examples`` is a shard spec (``name@N.gz``), glob, comma list or one file. ``limit``
    extracts the first ``limit`` records (corrupt ones count). ``sample`` extracts a
    seeded pseudo-random fraction of the records (:class:`~probing.loader.RecordSample`:
    chosen by a hash of each record, so the same ones on every rerun, resume or worker
    count); ``regions`` (like ``chr20:1-2,000,000`` or BED files: :mod:`probing.regions`)
    keeps the examples whose variant overlaps them. ``workers``: loader processes (None:
    :func:`default_workers`). ``compile``: ``torch.compile`` the CUDA engine. Commits
    happen every ``commit_interval_s`` seconds (0: after every batch), when 256 MiB of
    output is pending, on Ctrl-C and at the end. ``task`` / ``num_tasks``: extract only
    task ``task``'s block of the input into part ``task`` of ``out``
    (:mod:`probing.tasks`; ``task="auto"`` reads torchrun's or SLURM's environment).
    ``store_dtype`` (float32, float16, bfloat16): how pooled rows are stored (see the
    module docstring; ``dtype`` is how the engine computes them).
    """

    bundle: str | os.PathLike
    examples: str
    out: str | os.PathLike
    layers: Sequence[str] = ("mixed5", "mixed10")
    pool: str = "max"
    device: str = "auto"
    batch_size: int = 64
    workers: int | None = None
    dtype: str = "fp32"
    store_dtype: str = DEFAULT_STORE_DTYPE
    limit: int | None = None
    skip_corrupt: bool = False
    sample: float | None = None
    sample_seed: int = 0
    regions: Sequence[str] | None = None
    overwrite: bool = False
    compile: bool = False
    commit_interval_s: float = 15.0
    task: int | str | None = None
    num_tasks: int | None = None

    def __post_init__(self) -> None:
        layers = [self.layers] if isinstance(self.layers, str) else list(self.layers)
        object.__setattr__(self, "layers", layers)
        self.validate()
        # "auto" becomes this process's task now (torchrun / SLURM environment)
        found = resolve_task(self.task, self.num_tasks)
        if found is not None:
            object.__setattr__(self, "task", found.index)
            object.__setattr__(self, "num_tasks", found.count)

    @property
    def part(self) -> Task | None:
        """The task this config extracts (``--task I --num-tasks N``), or None: no parts."""
        return Task(int(self.task), int(self.num_tasks)) if self.task is not None else None

    def validate(self) -> None:
        """Refuse bad options with the flag's name, before anything is read."""
        if not self.layers:
            raise DvprobeError("no layers requested (--layers)")
        repeated = sorted({n for n in self.layers if self.layers.count(n) > 1})
        if repeated:
            raise DvprobeError(f"--layers names {', '.join(repeated)} more than once")
        for flag, value, allowed in (("--pool", self.pool, POOLS),
                                     ("--dtype", self.dtype, tuple(DTYPES)),
                                     ("--store-dtype", self.store_dtype, STORE_DTYPES)):
            if value not in allowed:
                raise DvprobeError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")
        for flag, value, low in (("--batch-size", self.batch_size, 1),
                                 ("--workers", self.workers, 0), ("--limit", self.limit, 1),
                                 ("--commit-every", self.commit_interval_s, 0)):
            if value is not None and value < low:
                raise DvprobeError(f"{flag} must be >= {low}, got {value}")
        if self.sample is None and self.sample_seed:
            raise DvprobeError("--sample-seed chooses which records a --sample keeps; give "
                               "--sample FRACTION too")
        if self.sample is not None:
            RecordSample(self.sample, self.sample_seed)  # refuses a bad fraction or seed


@dataclass
class ExtractionPlan:
    """Everything decided before the first batch: device, inputs, model, layers, meta."""

    config: ExtractConfig
    bundle: Path  # the BUNDLE directory config.bundle names (a path, or a release name)
    device: torch.device
    workers: int
    files: list[str]
    sampling: RecordSample | None
    regions: Regions | None
    long_run: bool
    model: torch.nn.Module
    shape: tuple[int, int, int]
    channels: list[int] | None
    specs: list[LayerSpec]
    meta: dict[str, Any] = field(default_factory=dict)
    dest: Path | None = None  # the directory written: out, or the task's part of it
    task: Task | None = None
    range: TaskRange | None = None  # the records the task reads (None: all)

    def loader_bounds(self, cursor: dict[str, Any] | None) -> tuple[list[str], Cursor,
                                                                     int | None]:
        """(files, start, limit) for :class:`ExampleBatches`: the whole input, or the
        task's block of it (whose read position counts from the block's start)."""
        if self.range is None:
            return self.files, Cursor.from_json(cursor), self.config.limit
        r = self.range
        start = Cursor.from_json(cursor) if cursor else Cursor(r.first_shard, r.first_record, 0)
        return self.files[:r.end_shard], start, r.records


def plan(config: ExtractConfig) -> ExtractionPlan:
    """Validate the inputs against the model and decide how to run (no row is written)."""
    sampling = RecordSample(config.sample, config.sample_seed) \
        if config.sample is not None else None
    if sampling is not None and sampling.fraction == 1:
        sampling = None  # every record: the same STORE as no --sample (and resumes as one)
    where = parse_regions(config.regions) if config.regions is not None else None
    dev = _rank_device(resolve_device(config.device), config)
    if config.dtype == "fp16" and dev.type != "cuda":
        raise DvprobeError("--dtype fp16 needs --device cuda (on a CPU, --dtype bf16 is the "
                           "fast half precision)")
    if config.compile and dev.type != "cuda":
        raise DvprobeError("--compile is for --device cuda (the CPU engine runs oneDNN's "
                           "fused kernels)")
    files = [str(f) for f in expand_spec(config.examples)]
    bundle = resolve_bundle(config.bundle)
    model = dvtorch.load(bundle, device=str(dev))
    bmeta = getattr(model, "bundle_meta", {}) or {}
    shape = tuple(int(s) for s in bmeta.get("input_shape", model.input_shape))
    channels = bmeta.get("channels")
    checked = check_inputs(files, config.examples, shape, channels)
    p = ExtractionPlan(
        config=config, bundle=bundle, device=dev,
        workers=config.workers if config.workers is not None else default_workers(dev),
        files=files, sampling=sampling, regions=where,
        long_run=is_long_run(files, config.limit, sampling.fraction if sampling else 1.0),
        model=model, shape=shape, channels=channels,
        specs=_stored_as(_layer_specs(model, shape, config.layers, config.pool),
                         config.store_dtype))
    p.meta = _store_meta(p, checked)
    if config.part is not None:
        p.task = config.part
        p.range = split_input(files, p.task, config.limit)
    return p


def _store_meta(p: ExtractionPlan, checked: dict[str, Any]) -> dict[str, Any]:
    """store.json's record of the inputs; ``inputs`` is the fingerprint a resume must match."""
    c = p.config
    inputs = {
        "bundle_sha256": bundle_fingerprint(p.bundle),
        "examples": [{"name": Path(f).name, "size": os.path.getsize(f)} for f in p.files],
        "layers": list(c.layers), "pool": c.pool, "dtype": c.dtype, "limit": c.limit,
    }
    if c.store_dtype != DEFAULT_STORE_DTYPE:  # STOREs from before --store-dtype still resume
        inputs["store_dtype"] = c.store_dtype
    if p.sampling is not None:  # only when given: STOREs from before --sample still resume
        inputs["sample"] = p.sampling.to_json()
    if p.regions is not None:  # the merged intervals' digest: the same bases, the same STORE
        inputs["regions"] = p.regions.to_json()
    meta = {
        "inputs": inputs,
        "bundle": str(p.bundle.resolve()),
        "examples_spec": c.examples,
        "shards": [str(Path(f).resolve()) for f in p.files],
        "input_shape": list(p.shape),
        "channels": list(p.channels) if p.channels is not None else None,
        "input_check": checked,
    }
    if p.regions is not None:
        meta["regions_given"] = list(p.regions.given)
    small = _small_model(p)
    if small:  # outside ``inputs``: a STORE's resume does not depend on it
        meta["small_model"] = small
    return meta


def _small_model(p: ExtractionPlan) -> dict[str, Any] | None:
    """What the inputs say about DeepVariant's small model (since 1.8 it genotypes easy sites
    and writes no example for them): its call files beside the examples, and the model's
    ``flags_for_calling``. None when neither says anything."""
    calls = small_model_calls(p.files)
    flags = small_model_flags(getattr(p.model, "bundle_meta", {}) or {})
    if calls is None and not flags:
        return None
    out: dict[str, Any] = {"flags": _plain_flags(flags)} if flags else {}
    if calls is not None:
        out.update(files=[f.name for f in calls.files], called_sites=calls.called_sites,
                   summary=calls.summary())
    return out


def _plain_flags(flags: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (str, int, float, bool)) or v is None else str(v))
            for k, v in flags.items()}


def _say_before_start(p: ExtractionPlan, writer: StoreWriter,
                      log: Callable[[str], None]) -> None:
    """What the user should know before a (resumed) run starts."""
    out, n_before = p.dest, writer.n_committed
    start = p.loader_bounds(writer.meta.get("cursor"))[1]
    if writer.set_aside is not None:  # said also with --no-progress: files were moved
        _log(True)(f"{out}: annotations / runs made on the {n_before} examples committed so "
                   f"far no longer line up once extraction resumes; moved to "
                   f"{writer.set_aside} (annotate and cluster again when it completes)")
    if n_before or start.position:
        log(f"{out}: resuming after {n_before} committed examples "
            f"(shard {start.shard}, record {start.record})")
    small = p.meta.get("small_model") or {}
    if small.get("called_sites"):
        _LOG.warning("%s", small["summary"])
    on_cpu = p.device.type == "cpu"
    if p.config.dtype == "bf16" and on_cpu and native_bf16() is False:
        _LOG.warning("this CPU has neither AVX-512 BF16 nor AMX: bf16 is emulated here, "
                     "several times slower than float32; use --dtype fp32")
    if p.config.dtype == "fp32" and on_cpu and native_bf16() and p.long_run:
        log("this CPU computes bf16 natively: --dtype bf16 extracts several times faster "
            "than float32, with max-pooled embeddings at cosine >= 0.999 to float32 "
            "(docs/performance.md)")


def extract(config: ExtractConfig, *, progress: bool = True,
            on_batch: Callable[[int], None] | None = None) -> Store:
    """Run the model over ``config.examples``; store pooled ``config.layers`` + obs.

    One forward per batch (an engine, :mod:`dvtorch.engine`) gives every layer and the
    softmax (``p_hom_ref``, ``p_het``, ``p_hom_alt``, ``pred_genotype``). Rows are in input
    order whatever the loader processes. Stages: :func:`plan`, the batch loop
    (:class:`_Run`), and the final commit. A commit is one atomic store.json replace, so a
    hard crash redoes at most the batches since the last commit; re-running the same
    config resumes, and on a complete STORE says "already complete" and returns it.
    Another model / inputs / layers / pool / dtype / limit at the same ``out`` raise
    :class:`~probing.store.StoreError` unless ``overwrite``. ``on_batch(n_rows_done)`` is
    called after each batch (progress hooks, tests).
    """
    log = _log(progress)
    p = plan(config)
    if p.task is not None:
        return _extract_part(p, log, progress, on_batch)
    writer = StoreWriter.open(config.out, p.meta, p.specs, overwrite=config.overwrite)
    return _extract_into(p, writer, log, progress, on_batch)


def _extract_into(p: ExtractionPlan, writer: StoreWriter, log: Callable[[str], None],
                  progress: bool, on_batch: Callable[[int], None] | None) -> Store:
    """Resume or start the extraction ``writer`` holds, through to its final commit."""
    p.dest = writer.path
    if writer.complete:
        log(f"{p.dest}: already complete ({writer.n_committed} examples); nothing to do "
            "(pass --overwrite to redo it)")
        return Store(p.dest)
    _say_before_start(p, writer, log)
    c = p.config
    engine = make_engine(p.model, [s.name for s in p.specs], c.pool, device=p.device,
                         dtype=c.dtype, batch_size=c.batch_size, compile=c.compile, log=log)
    with _disk_full_said(p.dest):
        run = _Run(p, writer, engine, progress, on_batch)
        run.loop()
        return _finish(run, log)


def _extract_part(p: ExtractionPlan, log: Callable[[str], None], progress: bool,
                  on_batch: Callable[[int], None] | None) -> Store:
    """Task ``p.task``'s block of the input into its part of ``out``: the top-level
    store.json is created or checked first, then the part is claimed (one writer per part)
    and written like any STORE (resumable, atomic commits). Returns the part."""
    c, task = p.config, p.task
    root = Path(c.out)
    open_parted_root(root, {**p.meta, "task_command": command_line(c, task="{task}")},
                     p.specs, task.count)
    part = root / PARTS_DIR / task.part
    with PartClaim.take(part.with_name(part.name + ".claim"),
                        f"{root}: part {task.index} of {task.count}"):
        writer = StoreWriter.open(part, _part_meta(p), p.specs, overwrite=c.overwrite)
        store = _extract_into(p, writer, log, progress, on_batch)
    states = part_states(root, Store(root, partial_parts=True).root_meta)
    done = sum(s.complete for s in states)
    log(f"{root}: all {task.count} parts complete; it opens as one STORE" if done == task.count
        else f"{root}: {done} of {task.count} parts complete")
    return store


def _part_meta(p: ExtractionPlan) -> dict[str, Any]:
    """A part's store.json record: the extraction's, with the task in the fingerprint (a
    part resumes only as the same task of the same split) and the records it reads."""
    task = {"index": p.task.index, "count": p.task.count}
    return {**p.meta, "inputs": {**p.meta["inputs"], "task": task},
            "task": {**task, "range": p.range.to_json()}}


def command_line(config: ExtractConfig, *, task: int | str | None = None,
                 num_tasks: int | None = None, run_options: bool = False) -> list[str]:
    """``dvprobe extract ...`` for ``config`` as argv: what a task's part needs to be
    (re)made the same (model, inputs, layers, pooling, dtype, choices), with absolute
    paths; ``run_options`` adds how to run (device, batch, workers, commits).
    ``task`` may be a placeholder such as ``"{task}"``."""
    c = config
    bundle = str(c.bundle)
    argv = ["dvprobe", "extract", os.path.abspath(bundle) if os.path.exists(bundle) else bundle,
            ",".join(os.path.abspath(os.path.expanduser(f)) for f in c.examples.split(",")),
            "--out", os.path.abspath(c.out), "--layers", ",".join(c.layers),
            "--pool", c.pool, "--dtype", c.dtype]
    if c.store_dtype != DEFAULT_STORE_DTYPE:
        argv += ["--store-dtype", c.store_dtype]
    if c.limit is not None:
        argv += ["--limit", str(c.limit)]
    if c.sample is not None:
        argv += ["--sample", repr(c.sample), "--sample-seed", str(c.sample_seed)]
    for r in c.regions or []:
        argv += ["--regions", os.path.abspath(r) if os.path.isfile(r) else r]
    if c.skip_corrupt:
        argv.append("--skip-corrupt")
    if run_options:
        argv += ["--device", c.device, "--batch-size", str(c.batch_size),
                 "--commit-every", repr(c.commit_interval_s)]
        if c.workers is not None:
            argv += ["--workers", str(c.workers)]
        if c.compile:
            argv.append("--compile")
    task = c.task if task is None else task
    if task is not None:
        argv += ["--task", str(task), "--num-tasks", str(num_tasks or c.num_tasks)]
    return argv


class DiskFullError(DvprobeError):
    """The disk filled up while a STORE was written: what is committed is kept."""


@contextlib.contextmanager
def _disk_full_said(where: Path) -> Iterator[None]:
    """A full disk (or quota) while writing ``where`` as one line, not a traceback: the
    commit it cut short is undone when the same command is rerun, so it resumes there."""
    try:
        yield
    except OSError as e:
        # pyarrow's write errors carry the reason in the message only
        if e.errno not in (errno.ENOSPC, errno.EDQUOT) and not any(
                why in str(e) for why in ("No space left", "Disk quota exceeded")):
            raise
        try:
            free = f"{shutil.disk_usage(where).free:,} bytes free"
        except OSError:
            free = "free space unknown"
        raise DiskFullError(
            f"{where}: disk full while writing ({e.strerror or e}; {free} there); every "
            "commit before it is kept: free some space or raise the quota, then rerun the "
            "same command to resume") from None


class _Run:
    """The batch loop of one extraction: batches in flight, pending output, commits."""

    def __init__(self, p: ExtractionPlan, writer: StoreWriter, engine: Engine,
                 progress: bool, on_batch: Callable[[int], None] | None):
        self.p, self.writer, self.engine, self.on_batch = p, writer, engine, on_batch
        self.pending = _Pending([s.name for s in p.specs])
        # Flattened maps cross to the host as float16 (converted on the device: half the
        # bytes); other rows as float32, which the writer rounds to the store dtype after
        # checking the range (probing.store.cast_rows).
        self.host_dtypes = {s.name: torch.float16 if s.pool == "flatten" else torch.float32
                            for s in p.specs}
        self.n_before = writer.n_committed
        self.n_new = 0
        self.t_wait = 0.0
        self.t_start = self.last_commit = time.perf_counter()
        self.bar = _progress_bar(p, self.n_before) if progress else None
        self.sizes = [os.path.getsize(f) for f in p.files]
        self.in_flight: collections.deque[tuple[Batch, Callable[[], Result]]] = \
            collections.deque()

    def loop(self) -> None:
        """Every batch of the input through the engine, committed; Ctrl-C commits too."""
        c = self.p.config
        files, start, limit = self.p.loader_bounds(self.writer.meta.get("cursor"))
        dataset = ExampleBatches(files, batch_size=c.batch_size, shape=self.p.shape,
                                 channels=self.p.channels, start=start, limit=limit,
                                 skip_corrupt=c.skip_corrupt, sample=self.p.sampling,
                                 regions=self.p.regions)
        it = iter(make_loader(dataset, workers=self.p.workers,
                              pin_memory=self.p.device.type == "cuda"))
        try:
            for batch in self._batches(it):
                self._take(batch)
            self._finish_all_but(0)
            self._commit()
        except KeyboardInterrupt:
            with contextlib.suppress(Exception):
                del it  # abandon the batch in flight; commit the finished ones
            self._commit()
            msg = (f"interrupted: {self.writer.n_committed} examples are committed in "
                   f"{self.p.dest}; run the same command again to resume from there")
            if self.bar is not None:
                self.bar.close()
                _log(True)(msg)
            raise ExtractionInterrupted(msg) from None
        finally:
            if self.bar is not None:
                self.bar.close()

    def _batches(self, it: Iterator[Batch]) -> Iterator[Batch]:
        """The loader's batches, timing how long the loop waits for each."""
        while True:
            t0 = time.perf_counter()
            batch = next(it, None)
            self.t_wait += time.perf_counter() - t0
            if batch is None:
                return
            yield batch

    def _take(self, batch: Batch) -> None:
        """Start a batch's forward (or record its skips); a bad record commits what came
        before it, then raises."""
        for skip in batch.skipped:  # here, once, in input order, whoever decoded it
            report_skip(skip["file"], skip["record"], skip["reason"])
        if batch.n == 0:
            # Every record of this batch was corrupt and skipped, or its first record is
            # bad: the cursor moves on to where it ends.
            self._finish_all_but(0)
            with _defer_sigint():
                self.pending.skipped.extend(batch.skipped)
                self.pending.end = batch.end
        else:
            # Raw uint8 pixels: the engine scales them (exactly like dvtorch.preprocess).
            pixels = batch.images.to(self.p.device, non_blocking=True)
            self.in_flight.append((batch, self.engine.submit(pixels)))
            self._finish_all_but(self.engine.ahead)
        if batch.error is not None:
            self._finish_all_but(0)
            self._commit()
            batch.raise_error()

    def _finish_all_but(self, keep: int) -> None:
        while len(self.in_flight) > keep:
            self._finish(*self.in_flight.popleft())

    def _finish(self, batch: Batch, result: Callable[[], Result]) -> None:
        """Host side of a started batch: copy, build obs, queue, commit when due."""
        probs_dev, acts_dev = result()
        probs = probs_dev.float().cpu().numpy()
        # Converted on the device: a flattened layer crosses to the host as float16.
        arrs = {n: acts_dev[n].to(dt).cpu().numpy() for n, dt in self.host_dtypes.items()}
        obs = _obs_frame(batch, probs)
        with _defer_sigint():  # a batch is queued whole or not at all
            self.pending.add(obs, arrs, batch)
            self.n_new += batch.n
        self._advance_bar(batch)
        now = time.perf_counter()
        if now - self.last_commit >= self.p.config.commit_interval_s \
                or self.pending.nbytes >= COMMIT_MAX_BYTES:
            self._commit()
            self.last_commit = time.perf_counter()
        if self.on_batch is not None:
            self.on_batch(self.n_before + self.n_new)

    def _advance_bar(self, batch: Batch) -> None:
        if self.bar is None:
            return
        c = self.p.config
        if c.limit is None and self.p.regions is None and len(self.sizes) > 1 \
                and self.p.task is None:
            total = estimate_total(batch.end, self.sizes)
            if total is not None:
                fraction = self.p.sampling.fraction if self.p.sampling else 1.0
                self.bar.total = max(round(total * fraction), self.bar.n + batch.n)
            self.bar.set_postfix_str(f"shard {min(batch.end.shard + 1, len(self.sizes))}/"
                                     f"{len(self.sizes)}", refresh=False)
        self.bar.update(batch.n)

    def _commit(self) -> None:
        with _defer_sigint():
            _commit(self.writer, self.pending)


def _progress_bar(p: ExtractionPlan, initial: int) -> Any:
    from tqdm.auto import tqdm

    # with --sample / --regions, --limit counts records read, not examples: no exact total
    exact = p.sampling is None and p.regions is None
    total = p.config.limit if p.range is None else p.range.records
    desc = "extract" if p.task is None else f"extract {p.task.index}/{p.task.count}"
    return tqdm(total=total if exact else None, initial=initial, unit="ex",
                dynamic_ncols=True, desc=desc, file=sys.stderr, smoothing=0.1)


def _finish(run: _Run, log: Callable[[str], None]) -> Store:
    """The final commit: refuse an empty result, record the run, say what was done."""
    p, writer = run.p, run.writer
    elapsed = time.perf_counter() - run.t_start
    skipped = writer.meta.get("skipped") or {"count": 0, "first": []}
    if writer.n_committed == 0 and p.task is None:  # a task's block may well keep none
        # An empty STORE only fails later ("the STORE has no examples"); say it now, and
        # leave no empty STORE behind to be resumed or mistaken for a result.
        writer.discard()
        raise DvprobeError(f"{p.config.examples}: nothing to extract: "
                           f"{_why_empty(p, skipped)}; no STORE was written")
    summary = {
        "n": writer.n_committed,
        "n_this_run": run.n_new,
        "seconds": round(elapsed, 3),
        "examples_per_s": round(run.n_new / elapsed, 2) if elapsed > 0 else None,
        "data_loading_share": round(run.t_wait / elapsed, 4) if elapsed > 0 else None,
        "device": str(p.device),
        "batch_size": p.config.batch_size,
        "workers": p.workers,
        **run.engine.describe(),
        "torch": torch.__version__,
    }
    store = writer.finalize(skipped=skipped, extraction=summary)
    log(f"extracted {summary['n']} examples ({run.n_new} this run) in {elapsed:.1f} s: "
        f"{summary['examples_per_s']} ex/s, data loading "
        f"{100 * run.t_wait / max(elapsed, 1e-9):.0f}% of wall time"
        + (f"; skipped {skipped['count']} corrupt records" if skipped["count"] else "")
        + f" -> {p.dest}")
    return store


def _why_empty(p: ExtractionPlan, skipped: dict[str, Any]) -> str:
    first = skipped["first"][0] if skipped["first"] else None
    if p.sampling is not None or p.regions is not None:  # what the user chose kept nothing
        return _chose_none(p.sampling, p.regions) + (
            f" ({skipped['count']} corrupt record(s) skipped as well)" if first else "")
    if first:
        return (f"every record read was corrupt and skipped ({skipped['count']}; first: "
                f"{first['file']}, record {first['record']}: {first['reason']})")
    return "it holds no records"
