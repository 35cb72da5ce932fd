"""Annotate a STORE's examples with genomic intervals and truth sets (boolean obs columns),
and with DeepVariant's own call_variants probabilities (:class:`Cvo`, joined by key).

The blog's concepts were found by *labelling examples after the fact*: UCSC RepeatMasker
LINEs, GIAB stratifications (low mappability, segdups) and the GIAB mosaic truth set. Each
source here turns one such file into one boolean column written with ``Store.add_obs``,
row-aligned with ``obs``, so enrichment and the report can use it like any other attribute.
:func:`annotate` is the one entry: ``annotate(store, [Bed(path), RepeatMasker(path,
repeat_class=["LINE"]), Vcf(path)])`` checks every source and column name, then writes.

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

``chr20`` vs ``20`` naming is reconciled *per contig*: a file contig the STORE lacks but
whose ``chr``-toggled name (``M`` <-> ``MT``) it holds is renamed (with a warning), so a file
mixing both conventions loses nothing; records on contigs the STORE lacks under either name
are counted as unplaced and reported. When nothing matches at all, annotation refuses (an
all-False column would look like a finding).
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
from probing.examples import alternate_contig_name
from probing.schema import PROB_COLUMNS
from probing.store import Store, as_store

log = logging.getLogger(__name__)

DEFAULT_HALF_WIDTH = 110  # (221 - 1) / 2: DeepVariant WGS pileup width


class AnnotationError(DvprobeError):
    """An annotation file is malformed or cannot be matched to the STORE."""


#: per-example columns analysis runs write (their values win over obs in enrich/report, so
#: an annotation with one of these names would be shadowed and make them fail)
RUN_COLUMNS = ("key", "cluster", "level1", "level2", "node")


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
    unplaced: int = 0  # records / intervals on contigs the STORE lacks under either name
    detail: str = ""  # what else a user should read (a CVO source: agreement with the STORE)

    def summary(self) -> str:
        """One line with the counts a user should sanity-check (unplaced ones included, since
        they are the silent loss a naming mismatch causes)."""
        if self.source.startswith("cvo"):
            return (f"{self.column}: {self.n_true}/{self.n_examples} examples have "
                    f"DeepVariant's probabilities; {self.unmatched} of {self.n_records} "
                    f"call_variants records match no example{self.detail}")
        if self.source.startswith("vcf"):
            body = (f"{self.matched}/{self.n_records} VCF records matched an example, "
                    f"{self.unmatched} unmatched; {self.n_true}/{self.n_examples} examples True")
            what = "records"
        else:
            body = (f"{self.n_true}/{self.n_examples} examples overlap "
                    f"{self.n_records} intervals")
            what = "intervals"
        if self.unplaced:
            body += (f" ({self.unplaced} {what if self.unplaced != 1 else what[:-1]} on "
                     "contigs not in the STORE)")
        return f"{self.column}: {body}"


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def _has_tabix_index(path: Path) -> bool:
    return any(Path(str(path) + s).is_file() for s in (".tbi", ".csi"))


class StaleIndexError(AnnotationError):
    """A tabix index that does not describe its file (the file was rewritten after indexing)."""


_REBUILD = {"vcf": "tabix -f -p vcf", "bed": "tabix -f -p bed",
            "rmsk": "tabix -f -s 6 -b 7 -e 8 -0 (UCSC rmsk.txt with bin)"}


def _iter_lines(path: Path, chroms: Iterable[str] | None,
                preset: str = "bed") -> Iterator[tuple[str, str]]:
    """Yield ``(where, line)`` for data lines; ``where`` names file and line for errors.

    A bgzipped file with a tabix index is queried only for ``chroms`` (each spelled as the
    index spells it); anything else is streamed from the first line. An index that no longer
    matches its file makes pysam fail mid-iteration ("iteration failed"); that is reported
    as a stale index with the command that rebuilds it (``preset``: vcf | bed | rmsk).
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
                try:
                    for i, line in enumerate(tbx.fetch(c)):
                        yield f"{path}: {c} record {i + 1}", line
                except (OSError, ValueError) as exc:
                    raise StaleIndexError(
                        f"{path}: its tabix index is out of date or does not match the file "
                        f"({exc} reading {c}); rebuild it with "
                        f"`{_REBUILD.get(preset, _REBUILD['bed'])} {path}`") from None
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
    for where, line in _iter_lines(path, chroms, "bed"):
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
    seen_classes: set[str] = set()
    seen_families: set[str] = set()
    for where, line in _iter_lines(path, chroms, "rmsk"):
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
            seen_classes.add(rclass)
            seen_families.add(rfamily)
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
            seen_classes.add(f[10])
            seen_families.add(f[11])
            if not _repeat_match(f[10], f[11], classes, families):
                continue
            out.add(f[4], _int(f[5], where, "genoStart"), _int(f[6], where, "genoEnd"), where)
    _check_repeat_names(path, "--repeat-class", classes, seen_classes)
    _check_repeat_names(path, "--repeat-family", families, seen_families)
    return out


def _check_repeat_names(path: Path, option: str, wanted: set[str] | None,
                        seen: set[str]) -> None:
    """Refuse a class/family the file never names: a typo (``line`` for ``LINE``) would
    otherwise write an all-False column that reads as "no example is in a LINE"."""
    if not wanted or not seen:
        return
    unknown = sorted(wanted - seen)
    if not unknown:
        return
    by_fold = {v.casefold(): v for v in seen}
    hints = [f"{u!r} -> {by_fold[u.casefold()]!r}" for u in unknown if u.casefold() in by_fold]
    hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
    raise AnnotationError(f"{path}: {option} {', '.join(map(repr, unknown))} not in the file"
                          f"{hint}; present: {', '.join(sorted(seen))}")


@dataclass
class VcfRecords:
    chrom: list[str] = field(default_factory=list)
    pos0: list[int] = field(default_factory=list)
    ref: list[str] = field(default_factory=list)
    alts: list[tuple[str, ...]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.chrom)


def _check_vcf_header(path: Path) -> None:
    """Refuse a file that is not a VCF (a BED given to ``--vcf`` would silently match
    nothing): its header must have ``##fileformat=VCF`` or the ``#CHROM`` line."""
    if not path.is_file():
        raise AnnotationError(f"{path}: no such file")
    opener = gzip.open if _is_gzip(path) else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(("##fileformat=VCF", "#CHROM")):
                    return
                if line.strip() and not line.startswith("#"):
                    break
    except (OSError, EOFError) as exc:
        raise AnnotationError(f"{path}: cannot read: {exc}") from None
    raise AnnotationError(f"{path}: not a VCF (no '##fileformat=VCF' or '#CHROM' header line)")


def read_vcf(path: str | os.PathLike, chroms: Iterable[str] | None = None) -> VcfRecords:
    """CHROM/POS/REF/ALT of a VCF(.gz); POS converted to 0-based."""
    path = Path(path)
    _check_vcf_header(path)
    out = VcfRecords()
    for where, line in _iter_lines(path, chroms, "vcf"):
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


def reconcile_chroms(file_chroms: Iterable[str], store_chroms: Iterable[str],
                     source: str) -> tuple[dict[str, str], list[str]]:
    """Map file chromosome names onto the STORE's (``chr20`` <-> ``20``), contig by contig.

    Returns ``(mapping file name -> store name, warnings)``. A name the STORE holds is kept;
    one it lacks is renamed when its ``chr``-toggled form is a STORE name. Deciding per
    contig (not for the whole file) matters because files mixing conventions exist, and an
    all-or-nothing rename silently dropped every interval of the other convention. When no
    contig can be placed at all, annotation refuses: an all-False column looks like a finding.
    """
    fc, sc = set(file_chroms), set(store_chroms)
    if not fc:
        return {}, []
    mapping = {c: alternate_contig_name(c) for c in fc if c not in sc and alternate_contig_name(c) in sc}
    if not (fc & sc) and not mapping:
        raise AnnotationError(
            f"{source}: no chromosome name in common with the STORE (file: "
            f"{sorted(fc)[:5]}..., STORE: {sorted(sc)[:5]}...); wrong assembly or file?")
    if not mapping:
        return {}, []
    ex = next(iter(sorted(mapping.items())))
    return mapping, [f"{source}: chromosome names renamed to the STORE's convention "
                     f"({ex[0]} -> {ex[1]}, {len(mapping)} names)"]


def _count_unplaced(chroms: np.ndarray, chrom_obs: np.ndarray, source: str, what: str,
                    warns: list[str]) -> int:
    """Records / intervals on contigs (already reconciled) the STORE does not hold: counted,
    and named in a warning appended to ``warns``."""
    off = chroms[~np.isin(chroms, np.unique(chrom_obs))] if len(chroms) else chroms
    n = len(off)
    if n:
        names = sorted(set(off))
        more = ", ..." if len(names) > 5 else ""
        what = what if n != 1 else what.rstrip("s")
        warns.append(f"{source}: {n} {what} on contigs not in the STORE under either naming "
                     f"({', '.join(names[:5])}{more}); they annotate nothing")
    return n


def _query_names(path: Path, store_chroms: set[str]) -> list[str]:
    """Chromosome names to fetch from an indexed file: each STORE contig as the file spells
    it (per contig, so a file mixing ``20`` and ``chr21`` is read over both)."""
    contigs = _tabix_contigs(path)
    if contigs is None:
        return sorted(store_chroms)
    present = set(contigs)
    if present and not any(c in present or alternate_contig_name(c) in present for c in store_chroms):
        reconcile_chroms(present, store_chroms, str(path))  # raises: nothing in common
    out = set()
    for c in store_chroms:  # as the file spells it: its own name first, else the other one
        alt = alternate_contig_name(c)
        out.add(alt if c not in present and alt in present else c)
    return sorted(out)


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


def _require_examples(store: Store, path: Path) -> None:
    """An empty STORE (extraction committed nothing yet) has no obs columns to match on;
    say so instead of failing on a missing ``chrom`` column."""
    if store.n == 0:
        raise AnnotationError(f"{store.path}: the STORE has no examples yet (0 committed); "
                              f"nothing to annotate with {path}")


def _require_obs(store: Store, cols: Sequence[str], optional: Sequence[str] = ()) -> pd.DataFrame:
    """Only the obs columns an annotation matches on (plus those of ``optional`` the STORE
    has): a whole-genome STORE's every key and allele string would take gigabytes."""
    have = store.obs_dtypes.index
    missing = [c for c in cols if c not in have]
    if missing:
        raise AnnotationError(f"{store.path}: obs lacks {missing} (was it written by extract?)")
    return store.read_obs([*cols, *(c for c in optional if c in have)])


def default_name(kind: str, path: str | os.PathLike,
                 repeat_class: Sequence[str] | None = None,
                 repeat_family: Sequence[str] | None = None) -> str:
    """The column an annotation writes without ``--name`` (BED/VCF: file stem; rmsk:
    ``rmsk_<class>[_<family>]``), so a command can check all its names before writing."""
    name = Path(path).name
    if kind == "bed":
        return re.sub(r"(\.bed)?(\.b?gz)?$", "", name)
    if kind == "vcf":
        return re.sub(r"(\.vcf)?(\.b?gz)?$", "", name)
    parts = ["rmsk", *(["+".join(repeat_class)] if repeat_class else []),
             *(["+".join(repeat_family)] if repeat_family else [])]
    return "_".join(parts).replace("+", "_").replace("?", "")


def check_name(store: Store, name: str, *, overwrite: bool = False,
               from_file: str | os.PathLike | None = None) -> str:
    """Refuse a column name that would corrupt the STORE's meaning or lose data.

    * not a plain identifier-like name (``from_file``: it came from that file's name);
    * an extraction column (read-only) or a column analysis runs write per example
      (``cluster`` ...): a run's column shadows it, so enrich/report would fail on it forever;
    * an existing annotation column, unless ``overwrite`` (re-annotating silently replaced
      a column a user may have built other results on).
    """
    origin = (f" (taken from the file name {Path(from_file).name!r}; set one with --name)"
              if from_file is not None else "")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\-]*", name):
        raise AnnotationError(f"column name {name!r}{origin}: use letters, digits, _ . - "
                              "(starting with a letter or _)")
    if name in RUN_COLUMNS:
        raise AnnotationError(f"column name {name!r}{origin}: reserved for analysis runs' "
                              "per-example columns; choose another --name")
    if name in store.extraction_columns:
        raise AnnotationError(f"column name {name!r}{origin}: an extraction column of "
                              f"{store.path} (read-only); choose another --name")
    if not overwrite and name in store.obs_dtypes.index:
        raise AnnotationError(f"column {name!r} already exists in {store.path}; pass "
                              "--overwrite to replace it, or choose another --name")
    return name


def _annotate_intervals(store: Store, obs: pd.DataFrame, iv: Intervals, column: str, by: str,
                        source: str) -> AnnotationResult:
    qs, qe = _query_window(store, obs, by)
    chrom_obs = obs["chrom"].astype(str).to_numpy()
    mapping, warns = reconcile_chroms(set(iv.chrom), set(chrom_obs), source)
    if len(iv) == 0:
        warns.append(f"{source}: no intervals (after filters); {column} is all False")
    fchrom = np.array([mapping.get(c, c) for c in iv.chrom], dtype=object)
    unplaced = _count_unplaced(fchrom, chrom_obs, source, "intervals", warns)
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
                            len(obs) - n_true, mapping, warns, unplaced)


def _interval_obs(store: Store) -> tuple[pd.DataFrame, set[str]]:
    """The obs columns an interval annotation matches on, read once, and the chromosome
    names among them (which an indexed file is queried for)."""
    obs = _require_obs(store, ["chrom", "pos", "end"])
    return obs, set(obs["chrom"].astype(str).unique())


def _write_bed(store: Store, src: Bed, column: str) -> AnnotationResult:
    path = Path(src.path)
    obs, chroms = _interval_obs(store)
    iv = read_bed(path, _query_names(path, chroms))
    return _annotate_intervals(store, obs, iv, column, src.by, f"bed {path}")


def _write_rmsk(store: Store, src: RepeatMasker, column: str) -> AnnotationResult:
    path = Path(src.path)
    obs, chroms = _interval_obs(store)
    iv = read_rmsk(path, repeat_class=src.repeat_class, repeat_family=src.repeat_family,
                   chroms=_query_names(path, chroms))
    return _annotate_intervals(store, obs, iv, column, src.by, f"rmsk {path}")


def _write_vcf(store: Store, src: Vcf, column: str) -> AnnotationResult:
    path = Path(src.path)
    obs = _require_obs(store, ["chrom", "pos", "ref", "alt", "alt_allele_indices"])
    chrom_obs = obs["chrom"].astype(str).to_numpy()
    rec = read_vcf(path, _query_names(path, set(chrom_obs)))
    source = f"vcf {path}"
    mapping, warns = reconcile_chroms(set(rec.chrom), set(chrom_obs), source)
    if len(rec) == 0:
        warns.append(f"{source}: no records; {column} is all False")
    rchrom = np.array([mapping.get(c, c) for c in rec.chrom], dtype=object)
    rpos = np.asarray(rec.pos0, dtype=np.int64)
    unplaced = _count_unplaced(rchrom, chrom_obs, source, "records", warns)
    if src.by == "locus":
        hit, matched = _vcf_by_locus(store, obs, chrom_obs, rchrom, rpos)
    else:
        hit, matched = _vcf_by_site(obs, chrom_obs, rchrom, rpos, rec, src.match_alleles)
    if len(rec) and matched == 0:
        warns.append(f"{source}: none of {len(rec)} records matched an example; "
                     f"{column} is all False (wrong file, assembly or coordinates?)")
    store.add_obs({column: hit})
    for w in warns:
        log.warning(w)
    return AnnotationResult(column, source, len(obs), int(hit.sum()), len(rec), matched,
                            len(rec) - matched, mapping, warns, unplaced)


def _cvo_by_key(table: pd.DataFrame, source: str) -> pd.DataFrame:
    """``table`` with one row per key. The same example scored twice (a shard given twice)
    is one row; two different scores for one key are refused: which is DeepVariant's?"""
    twice = table["key"].duplicated(keep=False)
    if not twice.any():
        return table
    dup = table[twice]
    if dup.drop_duplicates(["key", *PROB_COLUMNS]).key.duplicated().any():
        key = dup.key.iat[0]
        raise AnnotationError(f"{source}: key {key!r} has call_variants records with "
                              "different probabilities; give one run's output")
    return table.drop_duplicates("key")


def _agreement(obs: pd.DataFrame, probs: np.ndarray, called: np.ndarray,
               found: np.ndarray) -> str:
    """How the STORE's own model compares with DeepVariant's on the joined examples."""
    if not found.any() or not set(PROB_COLUMNS) <= set(obs.columns):
        return ""
    mine = obs[list(PROB_COLUMNS)].to_numpy(np.float64)[found]
    gap = float(np.nanmax(np.abs(mine - probs[found])))
    text = f"; max |p - DeepVariant's p| = {gap:.3g}"
    if "pred_genotype" in obs.columns:
        same = int((obs["pred_genotype"].to_numpy()[found] == called[found]).sum())
        text += f", same genotype on {same}/{int(found.sum())}"
    return text


def _write_cvo(store: Store, src: Cvo, prefix: str) -> AnnotationResult:
    from probing.cvo import read_cvo

    obs = _require_obs(store, ["key"], optional=[*PROB_COLUMNS, "pred_genotype"])
    source = f"cvo {src.path}"
    table = _cvo_by_key(read_cvo(src.path), source)
    where = pd.Index(table["key"]).get_indexer(obs["key"].astype(str))
    found = where >= 0
    if len(table) and not found.any():
        raise AnnotationError(
            f"{source}: none of its {len(table)} records has a key of {store.path} (e.g. "
            f"{table['key'].iat[0]!r} vs {obs['key'].iat[0]!r}): the output of another run "
            "or region?")
    probs = np.full((len(obs), len(PROB_COLUMNS)), np.nan)
    probs[found] = table[list(PROB_COLUMNS)].to_numpy(np.float64)[where[found]]
    called = np.where(found, np.nan_to_num(probs).argmax(axis=1), -1)
    genotype = pd.array(np.where(found, called, 0), dtype="Int64")
    genotype[~found] = pd.NA
    cols = dict(zip(src.columns(), [*probs.T, genotype], strict=True))
    store.add_obs(cols)
    matched = int(found.sum())
    return AnnotationResult(
        ",".join(src.columns()), source, len(obs), matched, len(table), matched,
        len(table) - matched, detail=_agreement(obs, probs, called, found))


# --------------------------------------------------------------------------------------
# Sources and the one entry
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """A file to annotate from: ``name`` is the column (default: from the file, see
    :func:`default_name`), ``by`` what of an example must overlap it (``variant``:
    ``[pos, end)``; ``locus``: the pileup window)."""

    path: str | os.PathLike
    name: str | None = None
    by: str = "variant"

    kind = ""

    def column(self) -> str:
        return self.name or default_name(self.kind, self.path)

    def columns(self) -> list[str]:
        """Every column the source writes (one, except :class:`Cvo`'s)."""
        return [self.column()]

    def named_by_file(self) -> Path | None:
        """The file the column name was taken from (named in a refusal), if it was."""
        return None if self.name else Path(self.path)

    def check(self) -> None:
        """Refuse options that cannot work, before any file or STORE is read."""
        if self.by not in ("variant", "locus"):
            raise AnnotationError(f"by must be 'variant' or 'locus', got {self.by!r}")

    def write(self, store: Store, column: str) -> AnnotationResult:
        raise NotImplementedError


@dataclass(frozen=True)
class Bed(_Source):
    """BED(.gz), e.g. a GIAB stratification (0-based half-open); column: the file stem
    without ``.bed``/``.gz`` (``GRCh38_segdups``)."""

    kind = "bed"

    def write(self, store: Store, column: str) -> AnnotationResult:
        return _write_bed(store, self, column)


@dataclass(frozen=True)
class RepeatMasker(_Source):
    """UCSC ``rmsk.txt(.gz)`` or RepeatMasker ``.out``, filtered by ``repeat_class`` /
    ``repeat_family`` (names the file never uses are refused, with those present); column:
    ``rmsk_<class>[_<family>]`` (``rmsk_LINE``, ``rmsk_L1`` for a family alone, ``rmsk``
    for every repeat)."""

    repeat_class: Sequence[str] | None = None
    repeat_family: Sequence[str] | None = None

    kind = "rmsk"

    def column(self) -> str:
        return self.name or default_name("rmsk", self.path, self.repeat_class,
                                         self.repeat_family)

    def check(self) -> None:
        super().check()
        for option, names in (("repeat_class", self.repeat_class),
                              ("repeat_family", self.repeat_family)):
            if isinstance(names, str):
                raise AnnotationError(f"{option} takes a list of names (e.g. [{names!r}]), "
                                      f"not the string {names!r}")

    def named_by_file(self) -> Path | None:
        return None  # the default name comes from the filters, not the file

    def write(self, store: Store, column: str) -> AnnotationResult:
        return _write_rmsk(store, self, column)


@dataclass(frozen=True)
class Vcf(_Source):
    """A truth VCF(.gz): is the example's variant in it (same chrom and start)? column: the
    file stem. With ``match_alleles`` REF must be equal and one of the example's *selected*
    alt alleles (``alt_allele_indices``) among the record's ALTs; without it a position
    match suffices (a multi-allelic site's examples all match). ``by="locus"`` marks
    examples whose pileup window holds a record's POS (alleles cannot be matched then)."""

    match_alleles: bool = False

    kind = "vcf"

    def check(self) -> None:
        super().check()
        if self.by == "locus" and self.match_alleles:
            raise AnnotationError(f"{self.path}: --match-alleles compares an example's own "
                                  "site; it cannot be combined with --by locus")

    def write(self, store: Store, column: str) -> AnnotationResult:
        return _write_vcf(store, self, column)


#: What :class:`Cvo` writes after its prefix: DeepVariant's three probabilities and its call.
CVO_SUFFIXES = ("p_hom_ref", "p_het", "p_hom_alt", "genotype")


@dataclass(frozen=True)
class Cvo(_Source):
    """DeepVariant's own ``call_variants`` output (``call_variants_output*.tfrecord.gz``: a
    file, a ``name@N.tfrecord.gz`` spec, a glob or a comma list), joined to the STORE by
    ``key``. Columns ``<name>_p_hom_ref``, ``_p_het``, ``_p_hom_alt`` (float; NaN where
    DeepVariant scored no such example) and ``<name>_genotype`` (0/1/2, the argmax of the
    three, as postprocess_variants calls a bi-allelic site; <NA> there); ``name`` defaults
    to ``dv``. Why: the rebuilt model's ``p_*`` / ``pred_genotype`` beside DeepVariant's own,
    example by example, is a parity check on real data that needs no TensorFlow."""

    kind = "cvo"

    def column(self) -> str:
        return self.name or "dv"

    def columns(self) -> list[str]:
        return [f"{self.column()}_{suffix}" for suffix in CVO_SUFFIXES]

    def named_by_file(self) -> Path | None:
        return None  # the prefix is fixed, not taken from the file

    def check(self) -> None:
        if self.by != "variant":
            raise AnnotationError(f"{self.path}: call_variants records are joined by example "
                                  "key; --by does not apply to --cvo")

    def write(self, store: Store, column: str) -> AnnotationResult:
        return _write_cvo(store, self, column)


Source = Bed | RepeatMasker | Vcf | Cvo


def plan_columns(sources: Sequence[Source]) -> list[str]:
    """The column each source writes; two sources writing one column are refused (before
    anything is written, so a clash in the second does not leave the first's behind)."""
    if not sources:
        raise AnnotationError("annotate: give --bed, --rmsk or --vcf, or --cvo (from Python: "
                              "sources=[Bed(path), RepeatMasker(path), Vcf(path), Cvo(spec)])")
    seen: dict[str, Source] = {}
    for src in sources:
        src.check()
        for col in src.columns():
            if col in seen:
                raise AnnotationError(f"annotate: {seen[col].path} and {src.path} would both "
                                      f"write column {col!r}; annotate them in separate "
                                      "commands with --name")
            seen[col] = src
    return list(seen)


def annotate(store: Store | str | os.PathLike, sources: Sequence[Source], *,
             overwrite: bool = True) -> list[AnnotationResult]:
    """Write one boolean obs column per source (:class:`Bed`, :class:`RepeatMasker`,
    :class:`Vcf`), or DeepVariant's probabilities and call (:class:`Cvo`); returns what each
    did, in order.

    Every source's options and column names are checked against the STORE before the first
    column is written. ``overwrite=False`` (the CLI's default) refuses an existing column.
    """
    store = as_store(store)
    plan_columns(sources)
    _require_examples(store, Path(str(sources[0].path).split(",")[0]))
    for src in sources:
        for col in src.columns():
            check_name(store, col, overwrite=overwrite, from_file=src.named_by_file())
    return [src.write(store, src.column()) for src in sources]


def annotate_bed(store: Store | str | os.PathLike, path: str | os.PathLike,
                 name: str | None = None, by: str = "variant", *,
                 overwrite: bool = True) -> AnnotationResult:
    """One :class:`Bed` source: ``annotate(store, [Bed(path, name, by)])``."""
    return annotate(store, [Bed(path, name, by)], overwrite=overwrite)[0]


def annotate_rmsk(store: Store | str | os.PathLike, path: str | os.PathLike,
                  name: str | None = None, by: str = "variant",
                  repeat_class: Sequence[str] | None = None,
                  repeat_family: Sequence[str] | None = None, *,
                  overwrite: bool = True) -> AnnotationResult:
    """One :class:`RepeatMasker` source."""
    src = RepeatMasker(path, name, by, repeat_class, repeat_family)
    return annotate(store, [src], overwrite=overwrite)[0]


def annotate_cvo(store: Store | str | os.PathLike, spec: str | os.PathLike,
                 name: str | None = None, *, overwrite: bool = True) -> AnnotationResult:
    """One :class:`Cvo` source: DeepVariant's probabilities and call as obs columns."""
    return annotate(store, [Cvo(spec, name)], overwrite=overwrite)[0]


def annotate_vcf(store: Store | str | os.PathLike, path: str | os.PathLike,
                 name: str | None = None, match_alleles: bool = False, by: str = "variant",
                 *, overwrite: bool = True) -> AnnotationResult:
    """One :class:`Vcf` source."""
    return annotate(store, [Vcf(path, name, by, match_alleles)], overwrite=overwrite)[0]


def _vcf_by_site(obs: pd.DataFrame, chrom_obs: np.ndarray, rchrom: np.ndarray,
                 rpos: np.ndarray, rec: VcfRecords,
                 match_alleles: bool) -> tuple[np.ndarray, int]:
    """Examples at a record's (chrom, POS) (and alleles); returns (hit, records matched)."""
    # Join on (chrom, pos) via a merge of two small frames (vectorised, no pair loops).
    ex = pd.DataFrame({"chrom": chrom_obs, "pos": obs["pos"].to_numpy(np.int64),
                       "row": np.arange(len(obs))})
    vr = pd.DataFrame({"chrom": rchrom.astype(str), "pos": rpos, "rec": np.arange(len(rpos))})
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
    return hit, int(m["rec"].nunique())


def _vcf_by_locus(store: Store, obs: pd.DataFrame, chrom_obs: np.ndarray, rchrom: np.ndarray,
                  rpos: np.ndarray) -> tuple[np.ndarray, int]:
    """Examples whose pileup window ``[pos - half, pos + half + 1)`` holds a record's POS;
    a record counts as matched when it lies in any example's window."""
    qs, qe = _query_window(store, obs, "locus")
    hit = np.zeros(len(obs), dtype=bool)
    matched = 0
    for c in np.unique(chrom_obs):
        rows = np.flatnonzero(chrom_obs == c)
        p = rpos[rchrom == c]
        ms, me = merge_intervals(p, p + 1)
        hit[rows] = overlaps(qs[rows], qe[rows], ms, me)
        ws, we = merge_intervals(qs[rows], qe[rows])
        matched += int(overlaps(p, p + 1, ws, we).sum())
    return hit, matched
