"""Streaming, ordered, resumable loading of DeepVariant examples for activation extraction.

Why this shape:

* **Bounded memory.** Examples are read record by record from (gzipped) TFRecord shards and
  leave the workers as uint8 NHWC batches; the DataLoader keeps at most
  ``prefetch_factor * workers`` batches in flight, whatever the input size.
* **Input order with parallel workers.** Every worker walks the same record sequence (shards
  in spec order, records in file order) and cuts it into the same batches of ``batch_size``
  *records*; worker ``w`` only *decodes* the batches ``b`` with ``b % W == w`` and just reads
  past the others. torch's DataLoader fetches from an IterableDataset's workers in strict
  round robin, so batches come out as 0, 1, 2, ... -- exactly the order of a single process.
  Batch boundaries count records (corrupt ones included), so they are the same in every
  worker and in a resumed run.
* **Sampling without decoding.** ``sample`` (:class:`RecordSample`) keeps a seeded,
  pseudo-random fraction of the records, chosen by a hash of each record's bytes, before
  batches are cut: batches are full batches of chosen examples, every worker agrees on them
  without parsing, and a resumed run or another shard layout chooses the same examples.
  ``regions`` (:class:`~probing.regions.Regions`) chooses by locus the same way, at the
  cost of a parse per record.
* **Resume without decoding.** A :class:`Cursor` (shard, record within shard, records read)
  marks where the next batch starts. Shards before the cursor are not opened at all; inside
  the cursor's shard the records before it are only framed (gzip + length), never parsed.
* **Errors keep their identity.** Worker exceptions are re-raised by torch as a generic
  RuntimeError, so a corrupt record travels back as data (path, record, reason) inside its
  batch and the main process raises :class:`~dvtorch.errors.ExampleFormatError` itself, in
  input order. That batch carries the records before the bad one (its cursor ends at the
  bad record), so everything before it is delivered and committed, and a rerun starts at
  the bad record itself.
* **Workers die with their parent.** On Linux each loader process asks the kernel for
  SIGKILL when its parent goes (``PR_SET_PDEATHSIG``): after a ``kill -9`` of extraction,
  torch's own check (``getppid`` every 5 s while idle) left it running up to ~10 s, holding
  its memory and open shards.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import google_crc32c
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dvtorch.errors import DvprobeError, ExampleFormatError
from probing.examples import parse_example
from probing.pileup import pileup_attributes
from probing.regions import Regions
from probing.schema import META_COLUMNS
from probing.tfrecord import ReadStats, iter_records


@dataclass(frozen=True)
class Cursor:
    """Where reading resumes: record ``record`` of shard ``shard``; ``position`` records
    (valid or corrupt) have been consumed before it in total."""

    shard: int = 0
    record: int = 0
    position: int = 0

    def to_json(self) -> dict[str, int]:
        return {"shard": self.shard, "record": self.record, "position": self.position}

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> Cursor:
        if not d:
            return cls()
        return cls(int(d["shard"]), int(d["record"]), int(d["position"]))


@dataclass(frozen=True)
class RecordSample:
    """A seeded pseudo-random ``fraction`` of the records: a record is chosen when a hash of
    its bytes falls below ``fraction`` of the hash range.

    Why a hash of the bytes, not of the position or a random draw: the same examples are
    chosen in every loader worker (which must agree on batch boundaries without talking),
    in a resumed run, and whatever shard layout the input has; and it costs one hardware
    CRC32C pass over the record (~15 us for a 150 kB WGS example) instead of a parse. The
    CRC (linear in the bytes) is put through a non-linear 32-bit mixer (MurmurHash3's
    finaliser) so that records differing in a few bytes are chosen independently.
    Identical records are chosen together.
    """

    fraction: float
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise DvprobeError(f"--sample must be a fraction in (0, 1], got {self.fraction}")
        if int(self.fraction * 2**32) == 0:
            raise DvprobeError(f"--sample {self.fraction} is below 2^-32 and would keep no "
                               "record at all")
        if not 0 <= self.seed < 2**63:
            raise DvprobeError(f"--sample-seed must be in [0, 2^63), got {self.seed}")

    def to_json(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "seed": self.seed}

    def chooses(self, record: bytes) -> bool:
        if self.fraction >= 1:
            return True
        crc = google_crc32c.extend(google_crc32c.value(self.seed.to_bytes(8, "little")), record)
        return _mix32(crc) < int(self.fraction * 2**32)


def _mix32(h: int) -> int:
    """MurmurHash3's 32-bit finaliser: every output bit depends on every input bit."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


@dataclass
class Batch:
    """One decoded batch. With ``error`` set: the records before the bad one (maybe none),
    ``end`` at the bad record, and the error to report once they are committed.

    ``images`` is uint8 ``[n, H, W, C]`` (NHWC, as DeepVariant stores it); ``obs`` holds the
    per-example columns of :data:`META_COLUMNS` plus the pileup attributes; ``skipped`` lists
    corrupt records dropped under ``skip_corrupt``; ``end`` is the cursor just after the
    batch's last record, i.e. where a resumed run starts once this batch is committed.
    """

    index: int
    images: torch.Tensor
    obs: dict[str, np.ndarray]
    skipped: list[dict[str, Any]]
    end: Cursor
    decode_seconds: float = 0.0
    error: tuple[str, int | None, str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.images.shape[0])

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True): page-locked images make H2D copies async."""
        if self.images.numel():
            self.images = self.images.pin_memory()
        return self

    def raise_error(self) -> None:
        if self.error is not None:
            path, record, reason = self.error
            raise ExampleFormatError(path, record, reason)


class _Corrupt:
    """Marker for a record that failed its CRC / framing / parse check."""

    __slots__ = ("path", "record", "reason")

    def __init__(self, path: str, record: int | None, reason: str):
        self.path, self.record, self.reason = path, record, reason


#: (shard index, record index, payload or corrupt marker, records read before it)
_Item = tuple[int, int, "bytes | _Corrupt", int]


class ExampleBatches(IterableDataset):
    """Ordered batches of examples from ``files`` starting at ``start`` (see module doc).

    ``limit`` caps the total number of records read *from the beginning of the input*
    (resumed runs count what was read before), so ``--limit N`` means the first N records.
    ``sample`` and ``regions`` keep only the records they choose (corrupt ones are kept, to
    be reported); ``limit`` still counts every record read.
    """

    def __init__(
        self,
        files: Sequence[str],
        *,
        batch_size: int,
        shape: tuple[int, int, int],
        channels: Sequence[int] | None,
        start: Cursor = Cursor(),
        limit: int | None = None,
        skip_corrupt: bool = False,
        sample: RecordSample | None = None,
        regions: Regions | None = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise DvprobeError(f"batch size must be >= 1, got {batch_size}")
        self.files = [str(f) for f in files]
        self.batch_size = int(batch_size)
        self.shape = tuple(int(s) for s in shape)
        self.channels = list(channels) if channels is not None else None
        self.start = start
        self.limit = limit
        self.skip_corrupt = skip_corrupt
        self.sample = sample
        self.regions = regions

    # -- record sequence (identical in every worker) -------------------------------------
    def _records(self, where: list[int]) -> Iterator[tuple[int, int, bytes | _Corrupt]]:
        """Yield (shard index, record index, payload or _Corrupt) from the start cursor on.

        ``iter_records`` reports records skipped under ``skip_corrupt`` through ReadStats
        rather than yielding them; they are re-inserted here at their place in the
        sequence, because batch boundaries count every record. ``where[0]`` is kept at the
        shard being read, so a reading error can be placed.
        """
        for si in range(self.start.shard, len(self.files)):
            where[0] = si
            path = self.files[si]
            first = self.start.record if si == self.start.shard else 0
            stats = ReadStats(report=False)  # extraction reports each skip once
            seen = 0
            for rec, payload in iter_records(path, skip_corrupt=self.skip_corrupt, start=first,
                                             stats=stats):
                while seen < len(stats.skipped):
                    yield from self._corrupt(si, stats.skipped[seen], first)
                    seen += 1
                yield si, rec, payload
            while seen < len(stats.skipped):
                yield from self._corrupt(si, stats.skipped[seen], first)
                seen += 1

    @staticmethod
    def _corrupt(si: int, skip: tuple[str, int, str],
                 first: int) -> Iterator[tuple[int, int, _Corrupt]]:
        path, rec, reason = skip
        if rec >= first:  # skips before the resume point were counted by the earlier run
            yield si, rec, _Corrupt(path, rec, reason)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        B = self.batch_size
        pos = self.start.position
        if self.limit is not None and pos >= self.limit:
            return
        b = 0
        taken = 0  # records in the current batch
        cut = pos  # records read when the last batch was cut
        items: list[_Item] = []
        where = [self.start.shard]
        it = self._records(where)
        while True:
            try:
                nxt = next(it, None)
            except DvprobeError as exc:
                # Framing / CRC error without skip_corrupt. Whoever owns the bad record's
                # batch reports it first (round robin is in input order), together with
                # the records before it in that batch; other workers report it in their
                # next slot, which comes later and is never reached.
                bad = Cursor(where[0], getattr(exc, "record", None) or 0, pos)
                mine = b % nw == wid
                b += (wid - b) % nw  # this worker's slot at or after the bad record's batch
                yield self._decode(b, items if mine else [], bad, error=exc)
                return
            if nxt is None:
                break
            si, rec, payload = nxt
            pos += 1
            if isinstance(payload, _Corrupt) or (
                    (self.sample is None or self.sample.chooses(payload))
                    and (self.regions is None or self.regions.chooses(payload))):
                if b % nw == wid:
                    items.append((si, rec, payload, pos - 1))  # pos: records before it
                taken += 1
            done = self.limit is not None and pos >= self.limit
            # At the end, records passed over since the last batch still end one (maybe
            # empty), so the committed cursor counts every record read (info's "of N read").
            if taken == B or (done and pos > cut):
                if b % nw == wid:
                    yield self._decode(b, items, Cursor(si, rec + 1, pos))
                items, taken, b, cut = [], 0, b + 1, pos
            if done:
                return
        if pos > cut and b % nw == wid:
            last_shard = len(self.files) - 1
            yield self._decode(b, items, Cursor(last_shard + 1, 0, pos))

    # -- decoding (only for this worker's batches) ---------------------------------------
    def _decode(self, b: int, items: list[_Item], end: Cursor,
                error: BaseException | None = None) -> Batch:
        """Batch ``b`` from ``items`` (ending at cursor ``end``).

        ``error`` (the records end in a reading error) and a record that fails to parse
        without ``skip_corrupt`` both give a batch of the records *before* the bad one,
        ending at the bad record, with the error attached: extraction keeps those rows,
        commits, then reports, so a rerun resumes exactly at the bad record.
        """
        t0 = time.perf_counter()
        H, W, C = self.shape
        images = np.empty((len(items), H, W, C), dtype=np.uint8)
        cols: dict[str, list] = {c: [] for c in META_COLUMNS}
        skipped: list[dict[str, Any]] = []
        n = 0
        for si, rec, payload, position in items:
            if isinstance(payload, _Corrupt):
                skipped.append({"file": payload.path, "record": payload.record,
                                "reason": payload.reason})
                continue
            try:
                ex = parse_example(payload, path=self.files[si], record=rec,
                                   expected_shape=self.shape)
            except DvprobeError as exc:
                if not self.skip_corrupt:
                    error = exc
                    end = Cursor(si, rec, position)
                    break
                skipped.append({"file": self.files[si], "record": rec,
                                "reason": str(getattr(exc, "reason", exc))})
                continue
            images[n] = ex.image
            n += 1
            cols["key"].append(ex.key)
            cols["shard"].append(si)
            cols["record"].append(rec)
            cols["chrom"].append(ex.chrom)
            cols["pos"].append(ex.start)
            cols["end"].append(ex.end)
            cols["ref"].append(ex.ref)
            cols["alt"].append(",".join(ex.alts))
            cols["alt_allele_indices"].append(",".join(str(i) for i in ex.alt_allele_indices))
            cols["locus"].append(ex.locus)
            cols["variant_type"].append(ex.variant_type)
            cols["label"].append(ex.label)
            cols["sequencing_type"].append(ex.sequencing_type)
        images = images[:n]
        obs = _columns(cols)
        if self.channels is not None:
            for k, v in pileup_attributes(images, self.channels).items():
                obs[k] = np.asarray(v)
        batch = Batch(b, torch.from_numpy(images), obs, skipped, end,
                      decode_seconds=time.perf_counter() - t0)
        if error is not None:
            batch.error = (str(getattr(error, "path", "?")), getattr(error, "record", None),
                           str(getattr(error, "reason", error)))
        return batch


def _columns(cols: dict[str, list]) -> dict[str, np.ndarray]:
    """Typed numpy columns. Optional features (``label`` of calling examples,
    ``sequencing_type``) travel as -1 for "absent" and become nullable Int64 in obs."""
    out: dict[str, np.ndarray] = {}
    for k, v in cols.items():
        if k in ("shard",):
            out[k] = np.asarray(v, dtype=np.int32)
        elif k in ("record", "pos", "end"):
            out[k] = np.asarray(v, dtype=np.int64)
        elif k == "variant_type":
            out[k] = np.asarray(v, dtype=np.int8)
        elif k in ("label", "sequencing_type"):  # optional features: -1 = absent
            out[k] = np.asarray([-1 if x is None else int(x) for x in v], dtype=np.int64)
        else:
            out[k] = np.asarray(v, dtype=object)
    return out


def _identity(x: Any) -> Any:
    return x


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: on Linux, have the kernel SIGKILL this worker as soon
    as the process that started it dies; elsewhere (or if prctl fails) do nothing and rely
    on torch's own, slower check.

    Why SIGKILL: a worker only reads shards and owns nothing to clean up, and a forked
    worker inherits its parent's Python signal handlers, which a SIGTERM would run.
    The parent may already have died before the request was made (the kernel then never
    sends the signal), so the worker checks afterwards that it still has the parent that
    started it. Note the kernel acts when the *thread* that started the worker ends: iterate
    the loader from a thread that outlives the iteration (extraction iterates in its caller's
    thread).
    """
    if not sys.platform.startswith("linux"):
        return
    parent = multiprocessing.parent_process()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return
    if parent is not None and os.getppid() != parent.pid:
        os.kill(os.getpid(), signal.SIGKILL)


def make_loader(dataset: ExampleBatches, *, workers: int, pin_memory: bool,
                prefetch_factor: int = 2) -> DataLoader:
    """DataLoader over pre-batched items: in-order round robin, bounded prefetch; worker
    processes end with the process that iterates it (:func:`die_with_parent`)."""
    kw: dict[str, Any] = {}
    if workers > 0:
        kw.update(prefetch_factor=prefetch_factor, persistent_workers=False,
                  worker_init_fn=die_with_parent)
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      collate_fn=_identity, in_order=True, **kw)
