"""A pysam pileup encoder that writes DeepVariant-format examples (``make_examples`` lite).

Why: probing needs examples whose provenance we control (the simulated sample with planted
concepts, or any small BAM) without installing DeepVariant. The output is what DeepVariant
1.6+ ``make_examples`` writes for the WGS model: gzipped TFRecords of ``tf.Example`` with
``image/encoded`` 100x221x7 uint8 (channels 1,2,3,4,5,6,19), ``variant/encoded``,
``alt_allele_indices/encoded``, ``locus``, ``variant_type``, ``sequencing_type`` and, when a
truth VCF is given, ``label``; ``<shard>.example_info.json`` beside each shard. Records are
produced by :func:`probing.examples.encode_example` and framed by
:class:`probing.tfrecord.TFRecordWriter`, so they round-trip through ``read_examples`` and
load in DeepVariant's ``call_variants``.

Pixel encoding follows ``docs/deepvariant-formats.md`` §4 exactly:

* rows 0-4: reference band (ref base colour, BQ 254, MQ 254, strand 70, supports 152,
  differs 50, insert size 254); read rows after; unused rows all 0;
* column ``c`` <-> reference position ``start - (W-1)/2 + c`` (variant start at column 110
  for W=221); positions outside the contig are ``N`` (colour 0);
* read_base A=250 G=180 T=100 C=30 other=0; base_quality ``int(254*min(BQ,40)/40)``;
  mapping_quality ``int(254*min(MQ,60)/60)``; strand 70 forward / 240 reverse;
  read_supports_variant 254 when the read's allele is in this example's alt subset, else
  152; base_differs_from_ref 50 / 254; insert_size ``int(254*min(|TLEN|,1000)/1000)``;
* an insertion overwrites its anchor column (the aligned base before it) with ``*``
  (read_base 0, differs 254, BQ of the first inserted base); a deletion writes ``*`` at the
  base before it and leaves the deleted columns empty; soft clips are not drawn;
* reads: unmapped / secondary / supplementary / QC-fail / duplicate reads are skipped, as are
  reads with MAPQ < 10 or whose base at the variant start has BQ < 10; a read is used when
  its alignment overlaps the variant +/- 5 bp (``read_overlap_buffer_bp``); more than 95
  usable reads -> a seeded random 95 are kept; rows are stable-sorted by alignment start,
  then read name, then read number;
* a site with n alt alleles yields one example per alt subset: every single alt and every
  pair (n + n(n-1)/2; DeepVariant's default ``ADD_HET_ALT_IMAGES``);
* ``label`` = number of the truth genotype's alleles that fall in the example's alt subset
  (alleles are compared after padding to a common reference span; no truth record at the
  site -> 0, i.e. the truth set is taken to be complete, as in DeepVariant training inside
  confident regions). Mosaic truth: the GT as written (0/1 -> label 1).

Where this differs from DeepVariant (documented on purpose, see the README section):

* no local realignment / haplotype assembly (DeepVariant re-aligns reads in active regions
  before building pileups); reads are drawn as the aligner placed them;
* simplified candidate generation: an allele is a candidate when >= ``min_count`` reads
  (default 2) and >= ``min_fraction`` of the reads (default 0.05, lower than DeepVariant's
  0.12 SNV / 0.06 indel so low-VAF mosaics are kept) carry it, counting bases with
  BQ >= 10 from reads with MAPQ >= 10; indels are taken as the aligner wrote them (no
  left-normalisation beyond the aligner's); no gVCF / no ``max_reads_per_partition``;
* optional hom-ref "examples" (``ref_sites_fraction``): sampled non-candidate positions
  with the most-observed (or a random) non-ref base as alt, so the data has label-0 images
  of plain reference sequence; DeepVariant never writes these;
* no alt-aligned pileup channels (not used by the WGS model); the >95-read subsample uses
  numpy's generator seeded per site, not DeepVariant's ``mt19937_64`` sequence, so which
  reads are kept differs, though the rule (random subset, then sort) is the same.
"""

from __future__ import annotations

import logging
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pysam
from tqdm import tqdm

from dvtorch.errors import DvprobeError
from probing import channels as C
from probing.examples import (
    alternate_contig_name,
    encode_example,
    encoded_variant_type,
    write_example_info,
)
from probing.tfrecord import TFRecordWriter, shard_name

_LOG = logging.getLogger(__name__)

__all__ = [
    "MakeExamplesError",
    "Site",
    "PileupEncoder",
    "TruthLabeler",
    "alt_subsets",
    "find_candidates",
    "load_sites",
    "make_examples",
    "MakeExamplesConfig",
    "MakeExamplesResult",
    "EXAMPLE_INFO_VERSION",
]

# DeepVariant layout version this encoder follows; "+dvprobe" marks who wrote the file.
EXAMPLE_INFO_VERSION = "1.6.0+dvprobe"
READ_OVERLAP_BUFFER = 5
SUBSAMPLE_SEED = 2101079370  # DeepVariant's default pileup random seed (used as our base seed)
SUPPORTED_CHANNELS = (1, 2, 3, 4, 5, 6, 19)
_SHARD_SPEC = re.compile(r"^(?P<base>.+)@(?P<n>\d+)(?P<suffix>\.[^/@]*)?$")
_BASES = "ACGT"  # the row order of pysam's count_coverage
_SKIP_FLAGS = 0x4 | 0x100 | 0x200 | 0x400 | 0x800  # unmapped, secondary, qcfail, dup, suppl

# ASCII -> read_base pixel / canonical upper-case base.
_COLOR = np.zeros(256, dtype=np.uint8)
for _b, _v in C.BASE_COLOR.items():
    _COLOR[ord(_b)] = _v
    _COLOR[ord(_b.lower())] = _v
_UPPER = np.arange(256, dtype=np.uint8)
_UPPER[ord("a") : ord("z") + 1] -= 32
# Channel index inside the full internal 7-channel image.
_CH = {ch: i for i, ch in enumerate(SUPPORTED_CHANNELS)}


class MakeExamplesError(DvprobeError):
    """Bad inputs to make_examples (missing index, unknown contig, malformed site...)."""


@dataclass(frozen=True)
class Site:
    """A candidate variant: 0-based half-open reference span, ref and alt alleles."""

    chrom: str
    start: int
    end: int
    ref: str
    alts: tuple[str, ...]
    source: str = "sites"  # sites / candidate / refsite


def alt_subsets(n_alts: int, het_alt_images: bool = True) -> list[tuple[int, ...]]:
    """Alt subsets DeepVariant builds images for: singles, then pairs (n + n(n-1)/2)."""
    singles = [(i,) for i in range(n_alts)]
    if not het_alt_images:
        return singles
    return singles + [(i, j) for i in range(n_alts) for j in range(i + 1, n_alts)]


def _pad(ref: str, alt: str, to_ref: str) -> str:
    """``alt`` of a ``ref`` allele rewritten on the longer reference span ``to_ref``."""
    return alt + to_ref[len(ref) :]


def _same_allele(ref_a: str, alt_a: str, ref_b: str, alt_b: str) -> bool:
    """Two (ref, alt) alleles at the same start describe the same haplotype change."""
    if len(ref_a) <= len(ref_b):
        return ref_b.startswith(ref_a) and _pad(ref_a, alt_a, ref_b) == alt_b
    return ref_a.startswith(ref_b) and _pad(ref_b, alt_b, ref_a) == alt_a


# ----------------------------------------------------------------------------- inputs


def _open_fasta(path: str | Path) -> pysam.FastaFile:
    try:
        return pysam.FastaFile(str(path))
    except (OSError, ValueError) as exc:
        raise MakeExamplesError(
            f"{path}: cannot open reference FASTA ({exc}); it needs a samtools faidx .fai index"
        ) from None


def _open_bam(path: str | Path) -> pysam.AlignmentFile:
    try:
        bam = pysam.AlignmentFile(str(path))
    except (OSError, ValueError) as exc:
        raise MakeExamplesError(f"{path}: cannot open reads ({exc})") from None
    if not bam.has_index():
        raise MakeExamplesError(f"{path}: no index (.bai/.csi); run `samtools index {path}`")
    return bam


def _is_vcf(path: Path) -> bool:
    return path.name.endswith((".vcf", ".vcf.gz", ".bcf", ".vcf.bgz"))


def load_sites(path: str | Path, contigs: dict[str, int]) -> list[Site]:
    """Variants of a VCF as sites (symbolic ``<*>``/``*`` alts dropped, records without a
    usable alt skipped)."""
    path = Path(path)
    sites: list[Site] = []
    try:
        vf = pysam.VariantFile(str(path))
    except (OSError, ValueError) as exc:
        raise MakeExamplesError(f"{path}: cannot open sites VCF ({exc})") from None
    with vf:
        for i, rec in enumerate(vf):
            if rec.chrom not in contigs:
                raise MakeExamplesError(
                    f"{path}, record {i} ({rec.chrom}:{rec.pos}): contig {rec.chrom!r} is not "
                    "in the BAM/reference"
                )
            alts = tuple(a for a in (rec.alts or ()) if not a.startswith("<") and a != "*")
            if not alts:
                continue
            if not re.fullmatch(r"[ACGTNacgtn]+", rec.ref) or any(
                not re.fullmatch(r"[ACGTNacgtn]+", a) for a in alts
            ):
                raise MakeExamplesError(
                    f"{path}, record {i} ({rec.chrom}:{rec.pos}): "
                    f"unsupported alleles {rec.ref}>{','.join(alts)}"
                )
            sites.append(
                Site(
                    rec.chrom, rec.start, rec.stop, rec.ref.upper(), tuple(a.upper() for a in alts)
                )
            )
    return sites


def _load_bed(path: Path, contigs: dict[str, int]) -> list[tuple[str, int, int]]:
    out = []
    opener = pysam.BGZFile if path.name.endswith(".gz") else open
    with opener(str(path), "rb") as fh:
        for i, raw in enumerate(fh):
            line = raw.decode().strip()
            if not line or line.startswith(("#", "track", "browser")):
                continue
            f = line.split("\t")
            try:
                chrom, s, e = f[0], int(f[1]), int(f[2])
            except (IndexError, ValueError):
                raise MakeExamplesError(
                    f"{path}, line {i + 1}: not a BED line: {line[:60]!r}"
                ) from None
            if chrom not in contigs:
                raise MakeExamplesError(f"{path}, line {i + 1}: contig {chrom!r} not in BAM")
            if not 0 <= s < e <= contigs[chrom]:
                raise MakeExamplesError(f"{path}, line {i + 1}: bad interval {chrom}:{s}-{e}")
            out.append((chrom, s, e))
    return out


class TruthLabeler:
    """Labels from one or more truth VCFs (first genotype column; GT as written)."""

    def __init__(self, paths: Sequence[str | Path], contigs: Sequence[str] | None = None):
        """``contigs``: the reference's contig names. A truth VCF naming them without (or
        with) the ``chr`` prefix is matched to them, with a warning; one that places no
        record on them is refused -- its sites would silently all be labelled hom-ref."""
        self.records: dict[tuple[str, int], list[tuple[str, tuple[str, ...], tuple]]] = {}
        known = set(contigs) if contigs is not None else None
        for path in paths:
            try:
                vf = pysam.VariantFile(str(path))
            except (OSError, ValueError) as exc:
                raise MakeExamplesError(f"{path}: cannot open truth VCF ({exc})") from None
            if not list(vf.header.samples):
                raise MakeExamplesError(f"{path}: truth VCF has no sample column (need GT)")
            placed, renamed, off = 0, set(), set()
            with vf:
                for i, rec in enumerate(vf):
                    chrom = rec.chrom
                    if known is not None and chrom not in known:
                        other = alternate_contig_name(chrom)
                        if other not in known:
                            off.add(chrom)
                            continue
                        renamed.add(chrom)
                        chrom = other
                    placed += 1
                    sample = rec.samples[0]
                    gt = sample.get("GT") if "GT" in sample else None
                    if gt is None:
                        raise MakeExamplesError(
                            f"{path}, record {i} ({rec.chrom}:{rec.pos}): no GT field"
                        )
                    self.records.setdefault((chrom, rec.start), []).append(
                        (rec.ref.upper(), tuple(a.upper() for a in (rec.alts or ())), gt)
                    )
            if off and not placed:
                raise MakeExamplesError(
                    f"{path}: no truth record is on a contig of the reference (truth contigs "
                    f"{sorted(off)[:5]}, reference {sorted(known)[:5]}); every example would "
                    "be labelled hom-ref")
            if renamed:
                _LOG.warning("%s: contigs %s matched to the reference's names with/without "
                             "'chr'", path, sorted(renamed)[:5])
            if off:
                _LOG.warning("%s: records on contigs %s that the reference lacks are not used",
                             path, sorted(off)[:5])

    def label(self, site: Site, subset: Sequence[int]) -> int:
        """How many of the truth GT's alleles are among ``site.alts[subset]`` (0, 1 or 2)."""
        wanted = [site.alts[i] for i in subset]
        best = 0
        for tref, talts, gt in self.records.get((site.chrom, site.start), []):
            n = 0
            for a in gt:
                if a is None or a == 0 or a > len(talts):
                    continue
                if any(_same_allele(tref, talts[a - 1], site.ref, w) for w in wanted):
                    n += 1
            best = max(best, n)
        return min(best, 2)


# ----------------------------------------------------------------------------- candidates


def _usable(read: pysam.AlignedSegment, min_mapq: int) -> bool:
    return not (read.flag & _SKIP_FLAGS) and read.mapping_quality >= min_mapq


def find_candidates(
    bam: pysam.AlignmentFile,
    fasta: pysam.FastaFile,
    chrom: str,
    start: int,
    end: int,
    *,
    min_count: int = 2,
    min_fraction: float = 0.05,
    min_mapq: int = C.MIN_MAPPING_QUALITY,
    min_baseq: int = C.MIN_BASE_QUALITY,
    ref_sites_fraction: float = 0.0,
    rng: np.random.Generator | None = None,
) -> list[Site]:
    """Candidate sites in ``chrom:start-end`` (see the module docstring for the rule).

    SNV allele counts come from ``count_coverage`` (C loop, BQ/MAPQ filtered); indels from a
    pass over the reads' CIGARs. Alleles sharing a start are merged into one multi-allelic
    site on the longest reference span. With ``ref_sites_fraction`` > 0 a random fraction of
    covered non-candidate positions is added as ``refsite`` sites.
    """
    ref = fasta.fetch(chrom, start, end).upper()
    counts = np.array(
        bam.count_coverage(
            chrom,
            start,
            end,
            quality_threshold=min_baseq,
            read_callback=lambda r: _usable(r, min_mapq),
        ),
        dtype=np.int64,
    )  # [4, L] A C G T
    depth = counts.sum(axis=0)
    ref_codes = np.frombuffer(ref.encode(), dtype=np.uint8)
    alleles: dict[int, dict[tuple[str, str], int]] = {}
    for k, b in enumerate(_BASES):
        ok = (
            (counts[k] >= min_count)
            & (counts[k] >= min_fraction * np.maximum(depth, 1))
            & (ref_codes != ord(b))
            & (ref_codes != ord("N"))
        )
        for p in np.flatnonzero(ok).tolist():
            alleles.setdefault(start + p, {})[(ref[p], b)] = int(counts[k, p])
    for (a, ra, aa), n in _indel_counts(bam, chrom, start, end, ref, min_mapq).items():
        d = int(depth[a - start])
        if n >= min_count and n >= min_fraction * max(d, 1):
            alleles.setdefault(a, {})[(ra, aa)] = n
    sites = _merge_alleles(alleles, chrom, end)
    if ref_sites_fraction > 0:
        rng = rng if rng is not None else np.random.default_rng(0)
        sites += _ref_sites(rng, sites, counts, depth, ref, ref_codes, chrom, start,
                            ref_sites_fraction)
        sites.sort(key=lambda s: (s.start, s.source))
    return sites



def _indel_counts(
    bam: pysam.AlignmentFile, chrom: str, start: int, end: int, ref: str, min_mapq: int
) -> Counter[tuple[int, str, str]]:
    """Reads carrying each indel ``(anchor position, ref allele, alt allele)`` anchored in
    ``[start, end)``, as the aligner wrote it (VCF style: the base before the event)."""
    indels: Counter[tuple[int, str, str]] = Counter()
    for read in bam.fetch(chrom, start, end):
        if not _usable(read, min_mapq) or not read.cigartuples:
            continue
        if not any(op in (1, 2) for op, _ in read.cigartuples):
            continue
        seq = read.query_sequence or ""
        q, r = 0, read.reference_start
        prev_aligned = False
        for op, n in read.cigartuples:
            if op in (0, 7, 8):
                q += n
                r += n
                prev_aligned = True
                continue
            if op == 1:
                if prev_aligned and start <= r - 1 < end:
                    a = r - 1
                    anchor = ref[a - start]
                    indels[(a, anchor, anchor + seq[q : q + n].upper())] += 1
                q += n
            elif op == 2:
                if prev_aligned and start <= r - 1 and r + n <= end:
                    a = r - 1
                    indels[(a, ref[a - start : r + n - start], ref[a - start])] += 1
                r += n
            elif op == 3:
                r += n
            elif op == 4:
                q += n
            prev_aligned = prev_aligned and op not in (3, 4)
    return indels


def _merge_alleles(
    alleles: dict[int, dict[tuple[str, str], int]], chrom: str, end: int
) -> list[Site]:
    """One site per start: its alleles (most reads first) on the longest reference span;
    a site reaching past ``end`` is left to the next window."""
    sites: list[Site] = []
    for pos in sorted(alleles):
        pairs = sorted(alleles[pos].items(), key=lambda kv: -kv[1])
        long_ref = max((ra for (ra, _), _ in pairs), key=len)
        if pos + len(long_ref) > end:
            continue
        alts = tuple(_pad(ra, aa, long_ref) for (ra, aa), _ in pairs)
        sites.append(Site(chrom, pos, pos + len(long_ref), long_ref, alts, "candidate"))
    return sites


def _ref_sites(
    rng: np.random.Generator,
    sites: list[Site],
    counts: np.ndarray,
    depth: np.ndarray,
    ref: str,
    ref_codes: np.ndarray,
    chrom: str,
    start: int,
    fraction: float,
) -> list[Site]:
    """A random ``fraction`` of the covered positions away from ``sites``, each with the
    most-observed non-reference base (a random one if none is seen) as its alt."""
    taken = np.zeros(depth.size, dtype=bool)
    for s in sites:
        taken[max(0, s.start - start - 1) : s.end - start + 1] = True
    pool = np.flatnonzero((depth > 0) & ~taken & (ref_codes != ord("N")))
    pick = pool[rng.random(pool.size) < fraction]
    out = []
    for p in pick.tolist():
        rb = ref[p]
        other = [k for k in range(4) if _BASES[k] != rb]
        c_other = counts[other, p]
        alt = (
            _BASES[other[int(np.argmax(c_other))]]
            if c_other.max() > 0
            else _BASES[other[int(rng.integers(0, 3))]]
        )
        out.append(Site(chrom, start + p, start + p + 1, rb, (alt,), "refsite"))
    return out


# ----------------------------------------------------------------------------- encoder


@dataclass
class _Row:
    start: int
    name: str
    read2: bool
    pixels: np.ndarray  # [W, 7]
    allele: int | None  # index into site.alts, -1 = ref, None = other / not spanning


def _check_geometry(width: int, height: int, channels: Sequence[int]) -> None:
    """The image shape and channels this encoder can draw (``MakeExamplesError`` if not)."""
    if width % 2 != 1 or width < 3:
        raise MakeExamplesError(f"--width must be odd and >= 3, got {width}")
    if height <= C.REF_ROWS:
        raise MakeExamplesError(f"--height must exceed {C.REF_ROWS}, got {height}")
    bad = [c for c in channels if c not in SUPPORTED_CHANNELS]
    if bad:
        raise MakeExamplesError(
            f"channels {bad} not supported; this encoder writes {list(SUPPORTED_CHANNELS)}"
        )


@dataclass
class PileupEncoder:
    """Builds DeepVariant pileup images for sites from an indexed BAM and a FASTA."""

    fasta: pysam.FastaFile
    bam: pysam.AlignmentFile
    width: int = 221
    height: int = 100
    channels: tuple[int, ...] = C.WGS_CHANNELS
    min_mapq: int = C.MIN_MAPPING_QUALITY
    min_baseq: int = C.MIN_BASE_QUALITY
    seed: int = SUBSAMPLE_SEED
    contig_lengths: dict[str, int] = field(default_factory=dict)
    block_size: int = 50_000
    _cache: tuple | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        _check_geometry(self.width, self.height, self.channels)
        if not self.contig_lengths:
            self.contig_lengths = dict(zip(self.bam.references, self.bam.lengths, strict=True))
        self._sel = [_CH[c] for c in self.channels]

    # -- reference band
    def _ref_window(self, chrom: str, wstart: int) -> bytes:
        n = self.contig_lengths[chrom]
        lo, hi = max(0, wstart), min(n, wstart + self.width)
        seq = self.fasta.fetch(chrom, lo, hi).upper() if hi > lo else ""
        return ("N" * (lo - wstart) + seq + "N" * (wstart + self.width - hi)).encode()

    def _ref_row(self, ref: np.ndarray) -> np.ndarray:
        row = np.empty((self.width, 7), dtype=np.uint8)
        row[:, _CH[1]] = _COLOR[ref]
        row[:, _CH[2]] = C.MAX_PIXEL
        row[:, _CH[3]] = C.MAX_PIXEL
        row[:, _CH[4]] = C.POSITIVE_STRAND
        row[:, _CH[5]] = C.NOT_SUPPORTING
        row[:, _CH[6]] = C.MATCHES_REF
        row[:, _CH[19]] = C.MAX_PIXEL
        return row

    # -- reads
    @staticmethod
    def read_allele(read: pysam.AlignedSegment, site: Site) -> str | None:
        """The read's sequence over ``[site.start, site.end)`` incl. insertions anchored inside
        it, or None when the read does not span the site."""
        s, e = site.start, site.end
        seq = read.query_sequence or ""
        q, r = 0, read.reference_start
        parts: list[str] = []
        cov_s = cov_e = False
        for op, n in read.cigartuples or ():
            if op in (0, 7, 8):
                lo, hi = max(r, s), min(r + n, e)
                if lo < hi:
                    parts.append(seq[q + lo - r : q + hi - r])
                cov_s |= r <= s < r + n
                cov_e |= r <= e - 1 < r + n
                q += n
                r += n
            elif op == 1:
                if s <= r - 1 <= e - 1:  # anchored inside the span
                    parts.append(seq[q : q + n])
                q += n
            elif op in (2, 3):
                cov_s |= r <= s < r + n
                cov_e |= r <= e - 1 < r + n
                r += n
            elif op == 4:
                q += n
        if not (cov_s and cov_e):
            return None
        return "".join(parts).upper()

    def _encode_read(self, read: pysam.AlignedSegment, ref: np.ndarray, wstart: int) -> np.ndarray:
        W = self.width
        px = np.zeros((W, 7), dtype=np.uint8)
        seq = np.frombuffer((read.query_sequence or "").encode(), dtype=np.uint8)
        bq = np.asarray(read.query_qualities, dtype=np.int64)
        bq_px = (C.MAX_PIXEL * np.minimum(bq, C.BASE_QUALITY_CAP) // C.BASE_QUALITY_CAP).astype(
            np.uint8
        )
        mq_px = (
            C.MAX_PIXEL * min(read.mapping_quality, C.MAPPING_QUALITY_CAP) // C.MAPPING_QUALITY_CAP
        )
        strand = C.NEGATIVE_STRAND if read.is_reverse else C.POSITIVE_STRAND
        ins_px = (
            C.MAX_PIXEL * min(abs(read.template_length), C.INSERT_SIZE_CAP) // C.INSERT_SIZE_CAP
        )
        q, r = 0, read.reference_start
        last_aligned_col: int | None = None  # column of the previous aligned base
        for op, n in read.cigartuples or ():
            if op in (0, 7, 8):
                c0, c1 = r - wstart, r - wstart + n
                lo, hi = max(c0, 0), min(c1, W)
                if lo < hi:
                    qs = slice(q + lo - c0, q + hi - c0)
                    rb = seq[qs]
                    px[lo:hi, _CH[1]] = _COLOR[rb]
                    px[lo:hi, _CH[2]] = bq_px[qs]
                    px[lo:hi, _CH[3]] = mq_px
                    px[lo:hi, _CH[4]] = strand
                    px[lo:hi, _CH[5]] = C.NOT_SUPPORTING
                    px[lo:hi, _CH[6]] = np.where(
                        _UPPER[rb] == ref[lo:hi], C.MATCHES_REF, C.DIFFERS_FROM_REF
                    )
                    px[lo:hi, _CH[19]] = ins_px
                last_aligned_col = c1 - 1
                q += n
                r += n
            elif op == 1:
                a = last_aligned_col
                if a is not None and 0 <= a < W:
                    px[a, _CH[1]] = 0
                    px[a, _CH[2]] = bq_px[q]
                    px[a, _CH[6]] = C.DIFFERS_FROM_REF
                q += n
            elif op in (2, 3):
                a = last_aligned_col
                if op == 2 and a is not None and 0 <= a < W:
                    px[a, _CH[1]] = 0
                    px[a, _CH[6]] = C.DIFFERS_FROM_REF
                r += n
                last_aligned_col = None
            elif op == 4:
                q += n
                last_aligned_col = None
        return px

    def _overlapping(self, chrom: str, lo: int, hi: int) -> list[pysam.AlignedSegment]:
        """Filter-passing reads overlapping ``[lo, hi)``, in file (start) order.

        Reads are fetched once per ``block_size`` block and cached: a ``fetch`` per site is
        slow because htslib's 16 kb linear index makes every query scan thousands of
        earlier reads, while a block fetch amortises that over all its sites (see
        docs/performance.md).
        """
        c = self._cache
        if c is None or c[0] != chrom or not (c[1] <= lo and hi <= c[2]):
            blo = lo
            bhi = min(self.contig_lengths[chrom], max(hi, lo + self.block_size))
            reads = [
                r
                for r in self.bam.fetch(chrom, blo, bhi)
                if _usable(r, self.min_mapq)
                and r.cigartuples
                and r.query_qualities is not None  # no BQ ('*'): cannot be encoded
                and r.reference_end is not None
            ]
            starts = np.array([r.reference_start for r in reads], dtype=np.int64)
            ends = np.array([r.reference_end for r in reads], dtype=np.int64)
            span = int((ends - starts).max()) if reads else 0
            c = self._cache = (chrom, blo, bhi, reads, starts, ends, span)
        _, _, _, reads, starts, ends, span = c
        i0 = int(np.searchsorted(starts, lo - span, side="left"))
        i1 = int(np.searchsorted(starts, hi, side="left"))
        sel = np.flatnonzero(ends[i0:i1] > lo) + i0
        return [reads[i] for i in sel.tolist()]

    def _rows(self, site: Site, ref: np.ndarray, wstart: int) -> list[_Row]:
        lo = max(0, site.start - READ_OVERLAP_BUFFER)
        hi = min(self.contig_lengths[site.chrom], site.end + READ_OVERLAP_BUFFER)
        usable: list[pysam.AlignedSegment] = []
        for read in self._overlapping(site.chrom, lo, hi):
            qpos = _query_pos_at(read, site.start)
            if qpos is not None and read.query_qualities[qpos] < self.min_baseq:
                continue
            usable.append(read)
        cap = self.height - C.REF_ROWS
        if len(usable) > cap:
            rng = np.random.default_rng([self.seed, zlib.crc32(site.chrom.encode()), site.start])
            keep = sorted(rng.permutation(len(usable))[:cap].tolist())
            usable = [usable[i] for i in keep]
        rows = []
        for read in usable:
            allele = self.read_allele(read, site)
            idx = None
            if allele is not None:
                if allele == site.ref:
                    idx = -1
                elif allele in site.alts:
                    idx = site.alts.index(allele)
            rows.append(
                _Row(
                    read.reference_start,
                    read.query_name or "",
                    read.is_read2,
                    self._encode_read(read, ref, wstart),
                    idx,
                )
            )
        rows.sort(key=lambda x: (x.start, x.name, x.read2))
        return rows

    def encode_site(
        self, site: Site, het_alt_images: bool = True
    ) -> list[tuple[tuple[int, ...], np.ndarray]]:
        """One ``(alt subset, image [H, W, len(channels)])`` per alt subset of ``site``."""
        if site.chrom not in self.contig_lengths:
            raise MakeExamplesError(f"site {site.chrom}:{site.start + 1}: contig not in BAM")
        half = (self.width - 1) // 2
        wstart = site.start - half
        ref = np.frombuffer(self._ref_window(site.chrom, wstart), dtype=np.uint8)
        base = np.zeros((self.height, self.width, 7), dtype=np.uint8)
        base[: C.REF_ROWS] = self._ref_row(ref)
        rows = self._rows(site, ref, wstart)
        for i, row in enumerate(rows):
            base[C.REF_ROWS + i] = row.pixels
        out = []
        for subset in alt_subsets(len(site.alts), het_alt_images):
            img = base.copy()
            for i, row in enumerate(rows):
                if row.allele is not None and row.allele >= 0 and row.allele in subset:
                    r = C.REF_ROWS + i
                    drawn = img[r, :, _CH[4]] != 0  # strand is non-zero wherever drawn
                    img[r, drawn, _CH[5]] = C.SUPPORTS_ALT
            out.append((subset, np.ascontiguousarray(img[:, :, self._sel])))
        return out


def _query_pos_at(read: pysam.AlignedSegment, pos: int) -> int | None:
    """Query index of the base aligned to reference ``pos`` (None if deleted/not covered)."""
    q, r = 0, read.reference_start
    for op, n in read.cigartuples or ():
        if op in (0, 7, 8):
            if r <= pos < r + n:
                return q + pos - r
            q += n
            r += n
        elif op in (1, 4):
            q += n
        elif op in (2, 3):
            if r <= pos < r + n:
                return None
            r += n
        if r > pos:
            return None
    return None


# ----------------------------------------------------------------------------- driver


@dataclass(frozen=True)
class MakeExamplesConfig:
    """What :func:`make_examples` reads, where it writes and how it encodes.

    ``sites`` is a VCF (examples for those variants) or a BED (candidate discovery inside
    its regions); ``candidates=True`` finds candidates over the whole BAM (or over
    ``regions``, ``(chrom, start, end)`` tuples). ``out`` is a file or a sharded spec
    ``name.tfrecord@N.gz``. ``truth``: one or more VCFs for labels (germline + mosaic).
    ``compress_level`` is the gzip level; the default, 1, is much faster than 6 for files
    only a little larger (see docs/performance.md), and any level reads the same. Existing
    output files (a DeepVariant run's examples, say) are replaced only with ``overwrite``.

    Values are checked when the config is built (``MakeExamplesError`` naming the option);
    files are checked by :func:`make_examples` before any work.
    """

    ref: str | Path
    reads: str | Path
    out: str | Path
    sites: str | Path | None = None
    candidates: bool = False
    truth: str | Path | Sequence[str | Path] | None = None
    shards: int | None = None
    width: int = 221
    height: int = 100
    channels: Sequence[int] = C.WGS_CHANNELS
    regions: Iterable[tuple[str, int, int]] | None = None
    min_count: int = 2
    min_fraction: float = 0.05
    ref_sites_fraction: float = 0.0
    het_alt_images: bool = True
    min_mapq: int = C.MIN_MAPPING_QUALITY
    min_baseq: int = C.MIN_BASE_QUALITY
    seed: int = SUBSAMPLE_SEED
    compress_level: int = 1
    overwrite: bool = False

    def __post_init__(self) -> None:
        truth = self.truth
        paths = () if truth is None else (truth,) if isinstance(truth, (str, Path)) else truth
        object.__setattr__(self, "truth", tuple(paths))
        object.__setattr__(self, "channels", tuple(self.channels))
        if self.regions is not None:
            object.__setattr__(self, "regions", tuple(self.regions))
        self.validate()

    def validate(self) -> None:
        """Raise ``MakeExamplesError`` for options that cannot work together or at all."""
        if self.sites is None and not self.candidates:
            raise MakeExamplesError("give --sites VCF|BED or --candidates")
        if self.sites is not None and self.candidates and _is_vcf(Path(self.sites)):
            raise MakeExamplesError("--sites VCF and --candidates are exclusive")
        if (not 0 <= self.ref_sites_fraction <= 1 or not 0 < self.min_fraction <= 1
                or self.min_count < 1):
            raise MakeExamplesError(
                "need 0 <= ref_sites_fraction <= 1, 0 < min_fraction <= 1, min_count >= 1"
            )
        if not 0 <= self.compress_level <= 9:
            raise MakeExamplesError(f"compress_level must be 0..9, got {self.compress_level}")
        _check_geometry(self.width, self.height, self.channels)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(height, width, channels)`` of every image written."""
        return (self.height, self.width, len(self.channels))


def _shard_paths(out: str | Path, shards: int | None) -> list[Path]:
    s = str(out)
    m = _SHARD_SPEC.match(s)
    if m:
        n = int(m.group("n"))
        if n <= 0:
            raise MakeExamplesError(f"{s}: shard count after '@' must be positive")
        if shards is not None and shards != n:
            raise MakeExamplesError(f"{s}: spec says {n} shards but --shards {shards}")
        return [Path(shard_name(m.group("base"), i, n, m.group("suffix") or "")) for i in range(n)]
    if shards is not None and shards < 1:
        raise MakeExamplesError(f"--shards must be >= 1, got {shards}")
    n = shards or 1
    if Path(s).is_dir():
        raise MakeExamplesError(f"--out {s} is a directory; give a file name or a sharded "
                                f"spec inside it, e.g. {s}/examples.tfrecord@4.gz")
    if n == 1:
        return [Path(s)]
    base, suffix = (s[:-3], ".gz") if s.endswith(".gz") else (s, "")
    return [Path(shard_name(base, i, n, suffix)) for i in range(n)]


def _spec(out: str | Path, n: int) -> str:
    """The sharded spec that names all ``n`` output files (``name@N.gz``)."""
    s = str(out)
    if _SHARD_SPEC.match(s) or n == 1:
        return s
    return f"{s[:-3]}@{n}.gz" if s.endswith(".gz") else f"{s}@{n}"


@dataclass
class MakeExamplesResult:
    """What :func:`make_examples` wrote."""

    shards: list[Path]
    example_info: list[Path]
    n_sites: int
    n_examples: int
    labels: dict[int, int]
    by_source: dict[str, int]
    spec: str

    def summary(self) -> str:
        lab = ", ".join(f"{k}:{v}" for k, v in sorted(self.labels.items())) or "none"
        src = ", ".join(f"{k} {v}" for k, v in sorted(self.by_source.items()))
        return (
            f"{self.n_examples} examples from {self.n_sites} sites ({src}) in "
            f"{len(self.shards)} shard(s) {self.spec}; labels {lab}"
        )


def make_examples(config: MakeExamplesConfig, *, progress: bool = True) -> MakeExamplesResult:
    """Write DeepVariant-format examples as ``config`` says (see :class:`MakeExamplesConfig`).

    Stages: open and cross-check the inputs, claim the output files, read the truth, list
    the sites, encode and write them shard by shard, then the example_info.json files.
    Every check on inputs and outputs runs before the (long) candidate scan.
    """
    fasta, bam, contigs = _open_inputs(config)
    paths = _output_paths(config)
    # before the candidate scan: a truth file that cannot label anything fails in seconds
    labeler = TruthLabeler(config.truth, list(fasta.references)) if config.truth else None
    site_list = _site_list(config, fasta, bam, contigs, progress)
    enc = PileupEncoder(
        fasta,
        bam,
        width=config.width,
        height=config.height,
        channels=config.channels,
        min_mapq=config.min_mapq,
        min_baseq=config.min_baseq,
        seed=config.seed,
        contig_lengths=contigs,
    )
    tally = _write_shards(config, enc, labeler, site_list, paths, progress)
    channels = list(config.channels)
    infos = [write_example_info(p, config.shape, channels, EXAMPLE_INFO_VERSION) for p in paths]
    return MakeExamplesResult(paths, infos, len(site_list), tally.n_examples,
                              dict(tally.labels), dict(tally.by_source),
                              _spec(config.out, len(paths)))


def _open_inputs(
    config: MakeExamplesConfig,
) -> tuple[pysam.FastaFile, pysam.AlignmentFile, dict[str, int]]:
    """(FASTA, BAM, contig lengths), refusing a BAM whose contigs the FASTA lacks or sizes
    differently."""
    fasta = _open_fasta(config.ref)
    bam = _open_bam(config.reads)
    contigs = dict(zip(bam.references, bam.lengths, strict=True))
    for c, n in contigs.items():
        if c not in fasta.references:
            raise MakeExamplesError(
                f"{config.ref}: contig {c!r} of {config.reads} missing from the FASTA"
            )
        if fasta.get_reference_length(c) != n:
            raise MakeExamplesError(
                f"{config.ref}: contig {c!r} has length {fasta.get_reference_length(c)} but "
                f"{n} in {config.reads}"
            )
    return fasta, bam, contigs


def _output_paths(config: MakeExamplesConfig) -> list[Path]:
    """The shard files to write; existing ones are refused unless ``overwrite``."""
    paths = _shard_paths(config.out, config.shards)
    present = [str(p) for p in paths if p.exists()]
    if present and not config.overwrite:
        what = (f"{present[0]} and {len(present) - 1} more shards already exist"
                if len(present) > 1 else f"{present[0]} already exists")
        raise MakeExamplesError(f"{what}; give another --out, or --overwrite to replace")
    return paths


def _site_list(
    config: MakeExamplesConfig,
    fasta: pysam.FastaFile,
    bam: pysam.AlignmentFile,
    contigs: dict[str, int],
    progress: bool,
) -> list[Site]:
    """The sites of a sites VCF, or the candidates found in the BED's regions, ``regions``
    or the whole BAM (scanned 1 Mb at a time)."""
    sites = config.sites
    rng = np.random.default_rng(config.seed)
    if sites is not None and _is_vcf(Path(sites)):
        site_list = load_sites(sites, contigs)
    else:
        if sites is not None:
            regs = _load_bed(Path(sites), contigs)
        elif config.regions is not None:
            regs = list(config.regions)
        else:
            regs = [(c, 0, n) for c, n in contigs.items()]
        site_list = []
        for chrom, s, e in tqdm(regs, desc="candidates", unit="region", disable=not progress):
            for cs in range(s, e, 1_000_000):
                site_list.extend(
                    find_candidates(
                        bam,
                        fasta,
                        chrom,
                        cs,
                        min(e, cs + 1_000_000),
                        min_count=config.min_count,
                        min_fraction=config.min_fraction,
                        min_mapq=config.min_mapq,
                        min_baseq=config.min_baseq,
                        ref_sites_fraction=config.ref_sites_fraction,
                        rng=rng,
                    )
                )
    if not site_list:
        raise MakeExamplesError(f"{sites or config.reads}: no sites to make examples for")
    return site_list


@dataclass
class _Tally:
    """Counts of what was written."""

    n_examples: int = 0
    labels: Counter[int] = field(default_factory=Counter)
    by_source: Counter[str] = field(default_factory=Counter)


def _write_shards(
    config: MakeExamplesConfig,
    enc: PileupEncoder,
    labeler: TruthLabeler | None,
    site_list: list[Site],
    paths: list[Path],
    progress: bool,
) -> _Tally:
    """Encode the sites into ``paths``, consecutive runs of sites per shard. On any error
    every shard is aborted (no partial file is left under a final name)."""
    n = len(paths)
    bounds = [round(i * len(site_list) / n) for i in range(n + 1)]
    tally = _Tally()
    bar = tqdm(total=len(site_list), desc="make examples", unit="site", disable=not progress)
    writers = [TFRecordWriter(p, level=config.compress_level) for p in paths]
    try:
        for k, w in enumerate(writers):
            for site in site_list[bounds[k] : bounds[k + 1]]:
                _write_site(w, enc, labeler, site, config.het_alt_images, tally)
                bar.update(1)
        for w in writers:
            w.close()
    except BaseException:
        for w in writers:
            w.abort()
        raise
    finally:
        bar.close()
    return tally


def _write_site(
    writer: TFRecordWriter,
    enc: PileupEncoder,
    labeler: TruthLabeler | None,
    site: Site,
    het_alt_images: bool,
    tally: _Tally,
) -> None:
    """One example per alt subset of ``site`` (labelled when there is a truth)."""
    tally.by_source[site.source] += 1
    vt = encoded_variant_type(site.ref, site.alts)
    for subset, img in enc.encode_site(site, het_alt_images):
        label = labeler.label(site, subset) if labeler else None
        if label is not None:
            tally.labels[label] += 1
        writer.write(
            encode_example(
                img,
                chrom=site.chrom,
                start=site.start,
                end=site.end,
                ref=site.ref,
                alts=site.alts,
                alt_allele_indices=subset,
                label=label,
                variant_type=vt,
                sequencing_type=1,
            )
        )
        tally.n_examples += 1
