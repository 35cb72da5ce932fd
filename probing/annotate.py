"""Annotate a STORE's examples with genomic intervals and truth sets (boolean obs columns).

The blog's concepts were found by *labelling examples after the fact*: UCSC RepeatMasker
LINEs, GIAB stratifications (low mappability, segdups) and the GIAB mosaic truth set. Each
function here turns one such file into one boolean column written with ``Store.add_obs``,
row-aligned with ``obs``, so enrichment and the report can use it like any other attribute.

Coordinates (the usual source of silent off-by-one errors):

* examples: ``pos`` = ``Variant.start`` (0-based), ``end`` = ``Variant.end`` (exclusive);
  ``by="variant"`` tests ``[pos, end)``, ``by="locus"`` the whole pileup window
  ``[pos - half, pos + half + 1)`` (half = 110 for width 221: column c covers ``pos-110+c``).
* BED / GIAB stratifications / UCSC ``rmsk.txt``: 0-based half-open, used as is.
* RepeatMasker ``.out``: 1-based inclusive -> ``[begin - 1, end)``.
* VCF: ``POS`` 1-based -> ``POS - 1``, matched to ``pos`` (both are the first REF base).

Overlap is computed per chromosome on *merged* intervals with ``numpy.searchsorted`` (the
merged ends are sorted, so the first interval ending after the query start is the only
candidate), i.e. O((n + m) log m) with no Python loop over examples or pairs. Indexed
(tabix) files are read only over the chromosomes the STORE holds.

``chr20`` vs ``20`` naming: when a file's chromosome names do not meet the STORE's but do
after adding/removing a ``chr`` prefix (and ``M``/``MT``), they are renamed and a warning
says so; when nothing matches at all, annotation refuses (an all-False column would look
like a finding).
"""

from __future__ import annotations

import gzip
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dvtorch.errors import DvprobeError
from probing.store import Store, open_store

log = logging.getLogger(__name__)

DEFAULT_HALF_WIDTH = 110  # (221 - 1) / 2: DeepVariant WGS pileup width


class AnnotationError(DvprobeError):
    """An annotation file is malformed or cannot be matched to the STORE."""


@dataclass
class AnnotationResult:
    """What one annotation did: the column written and counts a user should sanity-check."""

    column: str
    source: str
    n_examples: int
    n_true: int
    n_records: int  # intervals / VCF records read (after filters)
    matched: int  # VCF: records that matched >= 1 example; intervals: examples overlapping
    unmatched: int  # VCF: records matching no example; intervals: examples not overlapping
    renamed: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.source.startswith("vcf"):
            body = (f"{self.matched}/{self.n_records} VCF records matched an example, "
                    f"{self.unmatched} unmatched; {self.n_true}/{self.n_examples} examples True")
        else:
            body = (f"{self.n_true}/{self.n_examples} examples overlap "
                    f"{self.n_records} intervals")
        return f"{self.column}: {body}"


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def _has_tabix_index(path: Path) -> bool:
    return any(Path(str(path) + s).is_file() for s in (".tbi", ".csi"))


def _iter_lines(path: Path, chroms: Iterable[str] | None) -> Iterator[tuple[str, str]]:
    """Yield ``(where, line)`` for data lines; ``where`` names file and line for errors.

    A bgzipped file with a tabix index is queried only for ``chroms`` (each spelled as the
    index spells it); anything else is streamed from the first line.
    """
    if not path.is_file():
        raise AnnotationError(f"{path}: no such file")
    if chroms is not None and _is_gzip(path) and _has_tabix_index(path):
        import pysam

        try:
            tbx = pysam.TabixFile(str(path))
        except (OSError, ValueError) as exc:
            raise AnnotationError(f"{path}: cannot open tabix index: {exc}") from None
        with tbx:
            present = set(tbx.contigs)
            for c in chroms:
                if c not in present:
                    continue
                for i, line in enumerate(tbx.fetch(c)):
                    yield f"{path}: {c} record {i + 1}", line
        return
    opener = gzip.open if _is_gzip(path) else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
            for i, line in enumerate(fh, start=1):
                yield f"{path}, line {i}", line.rstrip("\n\r")
    except (OSError, EOFError) as exc:
        raise AnnotationError(f"{path}: cannot read: {exc}") from None


def _tabix_contigs(path: Path) -> list[str] | None:
    if not (_is_gzip(path) and _has_tabix_index(path)):
        return None
    import pysam

    try:
        with pysam.TabixFile(str(path)) as tbx:
            return list(tbx.contigs)
    except (OSError, ValueError):
        return None


def _int(text: str, where: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise AnnotationError(f"{where}: {what} {text!r} is not an integer") from None


@dataclass
class Intervals:
    """Half-open intervals per chromosome (raw, not yet merged)."""

    chrom: list[str] = field(default_factory=list)
    start: list[int] = field(default_factory=list)
    end: list[int] = field(default_factory=list)

    def add(self, chrom: str, start: int, end: int, where: str) -> None:
        if start < 0 or end < start:
            raise AnnotationError(f"{where}: invalid interval {chrom}:{start}-{end} "
                                  "(needs 0 <= start <= end)")
        self.chrom.append(chrom)
        self.start.append(start)
        self.end.append(end)

    def __len__(self) -> int:
        return len(self.chrom)


def read_bed(path: str | os.PathLike, chroms: Iterable[str] | None = None) -> Intervals:
    """BED / GIAB stratification (0-based half-open, extra columns ignored)."""
    path = Path(path)
    out = Intervals()
    for where, line in _iter_lines(path, chroms):
        if not line.strip() or line.startswith(("#", "track", "browser")):
            continue
        f = line.split("\t")
        if len(f) < 3:
            f = line.split()
        if len(f) < 3:
            raise AnnotationError(f"{where}: a BED line needs chrom, start, end; got {line!r}")
        out.add(f[0], _int(f[1], where, "start"), _int(f[2], where, "end"), where)
    return out


def _repeat_match(rclass: str, rfamily: str, classes: set[str] | None,
                  families: set[str] | None) -> bool:
    return (classes is None or rclass in classes) and (families is None or rfamily in families)


def read_rmsk(path: str | os.PathLike, *, repeat_class: Sequence[str] | None = None,
              repeat_family: Sequence[str] | None = None,
              chroms: Iterable[str] | None = None) -> Intervals:
    """UCSC ``rmsk.txt(.gz)`` (17 columns, or 16 without ``bin``) or RepeatMasker ``.out``.

    The format is detected from the first data line: RepeatMasker ``.out`` lines are
    whitespace-separated with ``class/family`` in field 11 and 1-based inclusive
    coordinates; UCSC lines are tab-separated and 0-based half-open.
    """
    path = Path(path)
    classes = set(repeat_class) if repeat_class else None
    families = set(repeat_family) if repeat_family else None
    out = Intervals()
    fmt: str | None = None
    for where, line in _iter_lines(path, chroms):
        if not line.strip() or line.startswith("#"):
            continue
        if fmt is None:
            head = line.split()
            if head and head[0] in ("SW", "score"):
                fmt = "out"
                continue
            fmt = "ucsc" if "\t" in line else "out"
        if fmt == "out":
            f = line.split()
            if not f or f[0] in ("SW", "score"):
                continue
            if len(f) < 11:
                raise AnnotationError(f"{where}: RepeatMasker .out line has {len(f)} fields, "
                                      f"expected >= 15: {line!r}")
            rclass, _, rfamily = f[10].partition("/")
            if not _repeat_match(rclass, rfamily, classes, families):
                continue
            b, e = _int(f[5], where, "query begin"), _int(f[6], where, "query end")
            if b < 1:
                raise AnnotationError(f"{where}: .out coordinates are 1-based; begin {b} < 1")
            out.add(f[4], b - 1, e, where)
        else:
            f = line.split("\t")
            if len(f) == 17:
                f = f[1:]  # drop UCSC's bin column
            if len(f) != 16:
                raise AnnotationError(f"{where}: UCSC rmsk line has {len(f)} tab-separated "
                                      f"columns, expected 17 (or 16 without bin)")
            if not _repeat_match(f[10], f[11], classes, families):
                continue
            out.add(f[4], _int(f[5], where, "genoStart"), _int(f[6], where, "genoEnd"), where)
    return out


@dataclass
class VcfRecords:
    chrom: list[str] = field(default_factory=list)
    pos0: list[int] = field(default_factory=list)
    ref: list[str] = field(default_factory=list)
    alts: list[tuple[str, ...]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.chrom)


def read_vcf(path: str | os.PathLike, chroms: Iterable[str] | None = None) -> VcfRecords:
    """CHROM/POS/REF/ALT of a VCF(.gz); POS converted to 0-based."""
    path = Path(path)
    out = VcfRecords()
    for where, line in _iter_lines(path, chroms):
        if not line or line.startswith("#"):
            continue
        f = line.split("\t", 5)
        if len(f) < 5:
            raise AnnotationError(f"{where}: a VCF record needs >= 5 tab-separated columns")
        pos = _int(f[1], where, "POS")
        if pos < 1:
            raise AnnotationError(f"{where}: VCF POS is 1-based; got {pos}")
        out.chrom.append(f[0])
        out.pos0.append(pos - 1)
        out.ref.append(f[3].upper())
        out.alts.append(tuple(a.upper() for a in f[4].split(",")))
    return out


# --------------------------------------------------------------------------------------
# Chromosome names
# --------------------------------------------------------------------------------------


def _alt_name(c: str) -> str:
    if c.startswith("chr"):
        base = c[3:]
        return "MT" if base == "M" else base
    return "chrM" if c == "MT" else f"chr{c}"


def reconcile_chroms(file_chroms: Iterable[str], store_chroms: Iterable[str],
                     source: str) -> tuple[dict[str, str], list[str]]:
    """Map file chromosome names onto the STORE's (``chr20`` <-> ``20``) when needed.

    Returns ``(mapping file name -> store name, warnings)``. Names already shared are kept;
    only when the file has *no* name in common with the STORE but does after toggling the
    ``chr`` prefix is everything renamed (a half-matching file is left alone: it is more
    likely a different assembly than a naming convention).
    """
    fc, sc = set(file_chroms), set(store_chroms)
    if not fc or fc & sc:
        return {}, []
    mapping = {c: _alt_name(c) for c in fc if _alt_name(c) in sc}
    if not mapping:
        raise AnnotationError(
            f"{source}: no chromosome name in common with the STORE (file: "
            f"{sorted(fc)[:5]}..., STORE: {sorted(sc)[:5]}...); wrong assembly or file?")
    ex = next(iter(sorted(mapping.items())))
    return mapping, [f"{source}: chromosome names renamed to the STORE's convention "
                     f"({ex[0]} -> {ex[1]}, {len(mapping)} names)"]


def _query_names(path: Path, store_chroms: set[str]) -> list[str]:
    """Chromosome names to fetch from an indexed file (the STORE's, as the file spells them)."""
    contigs = _tabix_contigs(path)
    if contigs is None:
        return sorted(store_chroms)
    mapping, _ = reconcile_chroms(contigs, store_chroms, str(path)) if contigs else ({}, [])
    inv = {v: k for k, v in mapping.items()}
    return sorted(inv.get(c, c) for c in store_chroms)


# --------------------------------------------------------------------------------------
# Overlap
# --------------------------------------------------------------------------------------


def merge_intervals(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Union of half-open intervals as sorted disjoint ``(starts, ends)`` (ends sorted too)."""
    if len(starts) == 0:
        return starts.astype(np.int64), ends.astype(np.int64)
    order = np.lexsort((ends, starts))
    s, e = starts[order].astype(np.int64), ends[order].astype(np.int64)
    run_end = np.maximum.accumulate(e)
    # A new block starts where an interval begins after everything before it has ended.
    new = np.empty(len(s), dtype=bool)
    new[0] = True
    new[1:] = s[1:] > run_end[:-1]
    idx = np.flatnonzero(new)
    last = np.r_[idx[1:] - 1, len(s) - 1]
    return s[idx], run_end[last]


def overlaps(qstart: np.ndarray, qend: np.ndarray, mstart: np.ndarray,
             mend: np.ndarray) -> np.ndarray:
    """Whether each half-open query ``[qstart, qend)`` intersects the merged intervals.

    ``[a, b)`` and ``[s, e)`` intersect iff ``s < b`` and ``e > a``. Merged intervals are
    disjoint and sorted, so ``i`` = first with ``e > a`` (searchsorted on the sorted ends)
    is the only one that can satisfy ``s < b`` with the smallest start.
    """
    if len(mstart) == 0:
        return np.zeros(len(qstart), dtype=bool)
    i = np.searchsorted(mend, qstart, side="right")
    ok = i < len(mstart)
    hit = np.zeros(len(qstart), dtype=bool)
    hit[ok] = mstart[i[ok]] < qend[ok]
    return hit


def _query_window(store: Store, obs: pd.DataFrame, by: str) -> tuple[np.ndarray, np.ndarray]:
    pos = obs["pos"].to_numpy(np.int64)
    if by == "variant":
        end = obs["end"].to_numpy(np.int64)
        return pos, np.maximum(end, pos + 1)
    if by == "locus":
        shape = store.meta.get("input_shape")
        half = (int(shape[1]) - 1) // 2 if shape else DEFAULT_HALF_WIDTH
        return pos - half, pos + half + 1
    raise AnnotationError(f"by must be 'variant' or 'locus', got {by!r}")


def _as_store(store: Store | str | os.PathLike) -> Store:
    return store if isinstance(store, Store) else open_store(store)


def _require_obs(store: Store, cols: Sequence[str]) -> pd.DataFrame:
    obs = store.obs
    missing = [c for c in cols if c not in obs.columns]
    if missing:
        raise AnnotationError(f"{store.path}: obs lacks {missing} (was it written by extract?)")
    return obs


def _check_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\-]*", name):
        raise AnnotationError(f"column name {name!r}: use letters, digits, _ . - "
                              "(starting with a letter or _)")
    return name


def _annotate_intervals(store: Store, iv: Intervals, column: str, by: str,
                        source: str) -> AnnotationResult:
    obs = _require_obs(store, ["chrom", "pos", "end"])
    qs, qe = _query_window(store, obs, by)
    chrom_obs = obs["chrom"].astype(str).to_numpy()
    mapping, warns = reconcile_chroms(set(iv.chrom), set(chrom_obs), source)
    if len(iv) == 0:
        warns.append(f"{source}: no intervals (after filters); {column} is all False")
    fchrom = np.array([mapping.get(c, c) for c in iv.chrom], dtype=object)
    starts = np.asarray(iv.start, dtype=np.int64)
    ends = np.asarray(iv.end, dtype=np.int64)
    hit = np.zeros(len(obs), dtype=bool)
    for c in np.unique(chrom_obs):
        rows = np.flatnonzero(chrom_obs == c)
        sel = fchrom == c
        ms, me = merge_intervals(starts[sel], ends[sel])
        hit[rows] = overlaps(qs[rows], qe[rows], ms, me)
    store.add_obs({column: hit})
    n_true = int(hit.sum())
    for w in warns:
        log.warning(w)
    return AnnotationResult(column, source, len(obs), n_true, len(iv), n_true,
                            len(obs) - n_true, mapping, warns)


def annotate_bed(store: Store | str | os.PathLike, path: str | os.PathLike,
                 name: str | None = None, by: str = "variant") -> AnnotationResult:
    """Boolean column: does the example's variant (or pileup window) overlap the BED?

    Works for any BED(.gz), including GIAB stratification files. ``name`` defaults to the
    file stem without ``.bed``/``.gz`` (e.g. ``GRCh38_segdups``).
    """
    store = _as_store(store)
    path = Path(path)
    column = _check_name(name or re.sub(r"(\.bed)?(\.b?gz)?$", "", path.name))
    chroms = _query_names(path, set(store.obs["chrom"].astype(str)))
    iv = read_bed(path, chroms)
    return _annotate_intervals(store, iv, column, by, f"bed {path}")


def annotate_rmsk(store: Store | str | os.PathLike, path: str | os.PathLike,
                  name: str | None = None, by: str = "variant",
                  repeat_class: Sequence[str] | None = None,
                  repeat_family: Sequence[str] | None = None) -> AnnotationResult:
    """Boolean column from RepeatMasker (UCSC rmsk.txt or .out), filtered by class/family.

    The default column name is ``rmsk_<class>[_<family>]`` (``rmsk_LINE``, ``rmsk_LINE_L1``,
    ``rmsk_L1`` for a family alone, ``rmsk`` for every repeat).
    """
    store = _as_store(store)
    path = Path(path)
    if name is None:
        parts = ["rmsk", *(["+".join(repeat_class)] if repeat_class else []),
                 *(["+".join(repeat_family)] if repeat_family else [])]
        name = "_".join(parts).replace("+", "_").replace("?", "")
    column = _check_name(name)
    chroms = _query_names(path, set(store.obs["chrom"].astype(str)))
    iv = read_rmsk(path, repeat_class=repeat_class, repeat_family=repeat_family, chroms=chroms)
    return _annotate_intervals(store, iv, column, by, f"rmsk {path}")


def annotate_vcf(store: Store | str | os.PathLike, path: str | os.PathLike,
                 name: str | None = None, match_alleles: bool = False) -> AnnotationResult:
    """Boolean column: is the example's variant in the VCF (same chrom and start)?

    With ``match_alleles`` REF must be equal and one of the example's *selected* alt alleles
    (``alt_allele_indices``) must be among the record's ALTs; without it a position match
    suffices (so a multi-allelic site's examples all match).
    """
    store = _as_store(store)
    path = Path(path)
    column = _check_name(name or re.sub(r"(\.vcf)?(\.b?gz)?$", "", path.name))
    obs = _require_obs(store, ["chrom", "pos", "ref", "alt", "alt_allele_indices"])
    chrom_obs = obs["chrom"].astype(str).to_numpy()
    chroms = _query_names(path, set(chrom_obs))
    rec = read_vcf(path, chroms)
    source = f"vcf {path}"
    mapping, warns = reconcile_chroms(set(rec.chrom), set(chrom_obs), source)
    if len(rec) == 0:
        warns.append(f"{source}: no records; {column} is all False")

    # Join on (chrom, pos) via a merge of two small frames (vectorised, no pair loops).
    ex = pd.DataFrame({"chrom": chrom_obs, "pos": obs["pos"].to_numpy(np.int64),
                       "row": np.arange(len(obs))})
    vr = pd.DataFrame({"chrom": [mapping.get(c, c) for c in rec.chrom],
                       "pos": np.asarray(rec.pos0, dtype=np.int64),
                       "rec": np.arange(len(rec))})
    m = ex.merge(vr, on=["chrom", "pos"], how="inner")
    if match_alleles and len(m):
        ref = obs["ref"].astype(str).str.upper().to_numpy()
        alts = obs["alt"].astype(str).str.upper().to_numpy()
        aai = obs["alt_allele_indices"].astype(str).to_numpy()
        keep = np.zeros(len(m), dtype=bool)
        for j, (row, r) in enumerate(zip(m["row"].to_numpy(), m["rec"].to_numpy(),
                                         strict=True)):
            if ref[row] != rec.ref[r]:
                continue
            ea = alts[row].split(",")
            sel = [ea[int(i)] for i in aai[row].split(",") if i != "" and int(i) < len(ea)]
            keep[j] = bool(set(sel) & set(rec.alts[r]))
        m = m[keep]
    hit = np.zeros(len(obs), dtype=bool)
    hit[m["row"].to_numpy()] = True
    store.add_obs({column: hit})
    matched = int(m["rec"].nunique())
    for w in warns:
        log.warning(w)
    return AnnotationResult(column, source, len(obs), int(hit.sum()), len(rec), matched,
                            len(rec) - matched, mapping, warns)
