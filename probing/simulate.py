"""Simulated diploid short-read sample with planted, annotated "concepts".

Why: the blog post this project reproduces found DeepVariant activations that cluster by
LINE elements, depth, hard-to-map regions and mosaic variants. To test whether the probing
pipeline can *recover* such concepts we need data where they are planted and their ground
truth is known exactly. ``simulate()`` writes a complete small "sample": reference FASTA,
coordinate-sorted BAM, germline + mosaic truth VCFs, an rmsk-style repeat annotation and
GIAB-style stratification BEDs, plus ``truth.json`` describing every planted feature.

What is planted (all seeded, all reported in ``truth.json``):

* **LINE-like families** (``L1Sim<k>``, repClass LINE, repFamily L1): a random ~6 kb
  consensus per family and many copies, each diverged from the consensus by substitutions
  (default 2-10 %), about half 5'-truncated, random orientation. A fraction of copies are
  *young*: derived from another copy with only 0.1-1 % extra divergence, the way recent
  L1PA/L1HS copies are near-identical. Reads from copies are multi-mapped honestly (below).
* **A reference segmental duplication**: two ~8 kb copies ~1 % apart (``segdup.bed``).
* **A copy-number gain in the sample** (``cnv_gain.bed``): one haplotype's segment is
  present twice, so depth there is ~1.5x (junction reads of the tandem copy are not
  modelled).
* **Low-complexity stretches**: homopolymers and short tandem repeats (rmsk
  ``Simple_repeat``, ``(A)n`` / ``(CA)n``) and two-letter ``GA-rich`` style stretches
  (``Low_complexity``); some STRs carry germline unit expansions/contractions.
* **Germline variants**: het / hom SNVs (~1e-3 per bp), small insertions and deletions,
  a few multi-allelic 1/2 SNVs, phased in the truth VCF.
* **Mosaic SNVs**: on one haplotype in a fraction of cells, VAF 3-20 % of all reads
  (INFO/VAF in ``mosaic.vcf.gz``), placed outside repeats and the CN gain.

Reads: paired-end 2x150, fragment length ~N(400, 80), uniform over both haplotypes.
Base qualities decay along the read (sequencing direction, so reverse reads decay towards
their left end in reference orientation) with per-read offsets and occasional low-Q dips;
substitution errors are drawn with probability 10^(-Q/10) (Q<=2 bases become N).

Mapping model (instead of running an aligner): reads are aligned where they came from,
with CIGARs from the haplotype-to-reference map (indels -> I/D, reads starting or ending
inside an insertion are soft-clipped). For a pair whose mates both lie inside one copy of a
repeat family, every copy of that family that contains the homologous consensus interval is
scored by substitution count of the *actual read bases* (errors and sample variants
included) against that copy's reference sequence; the pair is placed at the best-scoring
copy (ties broken at random) - so reads land on the wrong copy exactly when their bases
match it at least as well, which makes depth swing between young copies. Per-mate MAPQ
follows BWA-MEM's ``30 * (1 - S2/S1) * ln(L)`` with match +1 / mismatch -4, which for
150 bp reads is ~5 per mismatch of difference between the best and second-best copy,
capped at 60 (identical best hit elsewhere -> 0). Unique reads get 60. Simplifications:
reads containing an indel are never moved and keep MAPQ 60; the mate-rescue MAPQ boost
BWA applies to pairs is not modelled; no duplicates, chimeras or adapter read-through.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pysam
from tqdm import tqdm

from dvtorch.errors import DvprobeError

__all__ = ["SimulationError", "simulate", "planted_concepts", "SIM_FORMAT"]

SIM_FORMAT = "dvprobe-sim"
SAMPLE = "SIM"
_ALPHABET = np.frombuffer(b"ACGTN", dtype=np.uint8)  # code -> ASCII
_CODE = np.full(256, 4, dtype=np.uint8)  # ASCII -> code (anything else -> N)
for _i, _b in enumerate(b"ACGT"):
    _CODE[_b] = _i
    _CODE[ord(chr(_b).lower())] = _i


class SimulationError(DvprobeError):
    """Bad simulation parameters or an unusable output directory."""


# ----------------------------------------------------------------------------- helpers


def _decode(codes: np.ndarray) -> str:
    return _ALPHABET[codes].tobytes().decode()


def _encode(seq: str) -> np.ndarray:
    return _CODE[np.frombuffer(seq.encode(), dtype=np.uint8)]


def _revcomp(codes: np.ndarray) -> np.ndarray:
    """Reverse complement of a code array (N stays N); works on the last axis."""
    out = np.where(codes < 4, 3 - codes, 4).astype(np.uint8)
    return out[..., ::-1]


def _random_seq(rng: np.random.Generator, n: int, gc: float = 0.41) -> np.ndarray:
    p = [(1 - gc) / 2, gc / 2, gc / 2, (1 - gc) / 2]
    return rng.choice(4, size=n, p=p).astype(np.uint8)


def _substitute(rng: np.random.Generator, seq: np.ndarray, rate: float) -> np.ndarray:
    """Copy of ``seq`` with each base substituted with probability ``rate``."""
    out = seq.copy()
    hit = rng.random(seq.size) < rate
    out[hit] = (out[hit] + rng.integers(1, 4, size=int(hit.sum()))) % 4
    return out


def _ucsc_bin(start: int, end: int) -> int:
    """UCSC standard binning scheme (``binFromRange``) used by the rmsk ``bin`` column."""
    offsets = (512 + 64 + 8 + 1, 64 + 8 + 1, 8 + 1, 1, 0)
    s, e = start >> 17, (max(end, start + 1) - 1) >> 17
    for off in offsets:
        if s == e:
            return off + s
        s >>= 3
        e >>= 3
    raise SimulationError(f"interval {start}-{end} too large for UCSC binning")


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Half-open [start, end) runs of True in a boolean array."""
    if not mask.any():
        return []
    d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist(), strict=True))


@dataclass
class _Copy:
    """One placed copy of a repeat family (LINE copy or segdup arm)."""

    family: str
    index: int
    chrom: str
    start: int  # genome, 0-based half-open
    end: int
    strand: str
    cons_start: int  # consensus interval covered by the copy
    cons_end: int
    divergence: float  # substitution rate vs the family consensus (cumulative)
    parent: int | None = None


@dataclass
class _Variant:
    chrom: str
    pos: int  # 0-based
    ref: str
    alts: list[str]
    gt: tuple[int, int]  # phased (hap0, hap1)
    kind: str  # snv / ins / del / str_ins / str_del / multi


@dataclass
class _Mosaic:
    chrom: str
    pos: int
    ref: str
    alt: str
    vaf: float
    hap: int


@dataclass
class _Layout:
    """Non-overlapping placement of planted features on the contigs."""

    lengths: dict[str, int]
    rng: np.random.Generator
    occupied: dict[str, list[tuple[int, int]]] = field(default_factory=dict)

    def place(self, length: int, margin: int = 300, what: str = "feature") -> tuple[str, int]:
        names = list(self.lengths)
        weights = np.array([self.lengths[c] for c in names], dtype=float)
        for _ in range(2000):
            chrom = names[int(self.rng.choice(len(names), p=weights / weights.sum()))]
            lo, hi = 1000, self.lengths[chrom] - length - 1000
            if hi <= lo:
                continue
            start = int(self.rng.integers(lo, hi))
            occ = self.occupied.setdefault(chrom, [])
            if all(start + length + margin <= s or e + margin <= start for s, e in occ):
                occ.append((start, start + length))
                return chrom, start
        raise SimulationError(
            f"cannot place {what} of {length} bp: the genome (--length) is too small for the "
            "requested repeats/features; raise --length or lower the feature counts"
        )

    def free(self, chrom: str, pos: int, margin: int = 0) -> bool:
        return all(pos < s - margin or pos >= e + margin for s, e in self.occupied.get(chrom, []))


# ----------------------------------------------------------------------------- genome


def _build_genome(
    rng: np.random.Generator,
    lengths: dict[str, int],
    *,
    n_line_families: int,
    line_copies: int,
    line_length: int,
    line_divergence: tuple[float, float],
    young_fraction: float,
    young_divergence: tuple[float, float],
    segdup_length: int,
    segdup_divergence: float,
    cnv_length: int,
    n_homopolymers: int,
    n_strs: int,
    n_low_complexity: int,
) -> tuple[dict[str, np.ndarray], _Layout, list[_Copy], dict[str, np.ndarray], list, list]:
    seqs = {c: _random_seq(rng, n) for c, n in lengths.items()}
    layout = _Layout(lengths, rng)
    copies: list[_Copy] = []
    consensus: dict[str, np.ndarray] = {}

    for f in range(n_line_families):
        name = f"L1Sim{f + 1}"
        cons = _random_seq(rng, line_length, gc=0.38)  # L1 is AT-rich
        consensus[name] = cons
        fam_seqs: list[np.ndarray] = []
        for k in range(line_copies):
            parent = None
            if k >= 2 and rng.random() < young_fraction:
                parent = int(rng.integers(0, k))
                p = copies[-k + parent]
                d = float(rng.uniform(*young_divergence))
                cs, ce = p.cons_start, p.cons_end
                seq = _substitute(rng, fam_seqs[parent], d)
                div = p.divergence + d
            else:
                truncated = k > 0 and rng.random() < 0.5
                cs = int(rng.integers(0, line_length - 1500)) if truncated else 0
                ce = line_length
                div = float(rng.uniform(*line_divergence))
                seq = _substitute(rng, cons[cs:ce], div)
            fam_seqs.append(seq)
            strand = "+" if rng.random() < 0.5 else "-"
            chrom, start = layout.place(seq.size, what=f"LINE copy {name}#{k}")
            seqs[chrom][start : start + seq.size] = seq if strand == "+" else _revcomp(seq)
            copies.append(
                _Copy(name, k, chrom, start, start + seq.size, strand, cs, ce, div, parent)
            )

    if segdup_length > 0:
        name = "SegDup1"
        base = _random_seq(rng, segdup_length)
        consensus[name] = base
        for k, seq in enumerate((base, _substitute(rng, base, segdup_divergence))):
            strand = "+" if k == 0 or rng.random() < 0.5 else "-"
            chrom, start = layout.place(seq.size, what="segmental duplication")
            seqs[chrom][start : start + seq.size] = seq if strand == "+" else _revcomp(seq)
            copies.append(
                _Copy(
                    name,
                    k,
                    chrom,
                    start,
                    start + seq.size,
                    strand,
                    0,
                    segdup_length,
                    segdup_divergence if k else 0.0,
                )
            )

    cnv = []
    if cnv_length > 0:
        chrom, start = layout.place(cnv_length, margin=2000, what="copy-number gain")
        cnv.append((chrom, start, start + cnv_length))

    low: list[tuple[str, int, int, str, str, str, str | None]] = []  # chrom,s,e,name,class,fam,unit
    for _ in range(n_homopolymers):
        n = int(rng.integers(10, 26))
        b = int(rng.integers(0, 4))
        chrom, s = layout.place(n, margin=30, what="homopolymer")
        seqs[chrom][s : s + n] = b
        low.append((chrom, s, s + n, f"({'ACGT'[b]})n", "Simple_repeat", "Simple_repeat", None))
    for _ in range(n_strs):
        u = int(rng.integers(2, 7))
        unit = _random_seq(rng, u)
        while np.all(unit == unit[0]):
            unit = _random_seq(rng, u)
        reps = int(rng.integers(max(3, 15 // u), max(4, 60 // u) + 1))
        n = u * reps
        chrom, s = layout.place(n, margin=30, what="short tandem repeat")
        seqs[chrom][s : s + n] = np.tile(unit, reps)
        low.append(
            (
                chrom,
                s,
                s + n,
                f"({_decode(unit)})n",
                "Simple_repeat",
                "Simple_repeat",
                _decode(unit),
            )
        )
    for _ in range(n_low_complexity):
        n = int(rng.integers(30, 101))
        pair = rng.choice(4, size=2, replace=False)
        chrom, s = layout.place(n, margin=30, what="low-complexity stretch")
        seqs[chrom][s : s + n] = pair[(rng.random(n) < 0.5).astype(int)]
        low.append(
            (
                chrom,
                s,
                s + n,
                f"{_decode(np.sort(pair))}-rich",
                "Low_complexity",
                "Low_complexity",
                None,
            )
        )
    return seqs, layout, copies, consensus, cnv, low


def _cons_matrix(seqs: dict[str, np.ndarray], copies: list[_Copy], length: int) -> np.ndarray:
    """[K, length] reference bases of each copy in consensus orientation; 5 = not covered."""
    out = np.full((len(copies), length), 5, dtype=np.uint8)
    for i, c in enumerate(copies):
        g = seqs[c.chrom][c.start : c.end]
        out[i, c.cons_start : c.cons_end] = g if c.strand == "+" else _revcomp(g)
    return out


def _low_mappability(
    seqs: dict[str, np.ndarray],
    families: dict[str, list[_Copy]],
    cons_len: dict[str, int],
    kmer: int = 100,
    max_mm: int = 2,
) -> list[tuple[str, int, int]]:
    """Genome intervals covered by a ``kmer``-mer with a <= ``max_mm``-mismatch hit in another
    copy of the same family (GIAB ``nonunique_l100_m2`` in spirit, substitutions only)."""
    out: list[tuple[str, int, int]] = []
    for fam, cps in families.items():
        mat = _cons_matrix(seqs, cps, cons_len[fam])
        for i, c in enumerate(cps):
            mark = np.zeros(cons_len[fam], dtype=bool)
            for j in range(len(cps)):
                if j == i:
                    continue
                both = (mat[i] < 5) & (mat[j] < 5)
                mm = ((mat[i] != mat[j]) | ~both).astype(np.int32)
                cs = np.concatenate([[0], np.cumsum(mm)])
                win = cs[kmer:] - cs[:-kmer]  # mismatches of window starting at w
                ok = np.flatnonzero(win <= max_mm)
                if ok.size:
                    diff = np.zeros(cons_len[fam] + 1, dtype=np.int32)
                    np.add.at(diff, ok, 1)
                    np.add.at(diff, ok + kmer, -1)
                    mark |= np.cumsum(diff[:-1]) > 0
            for a, b in _runs(mark):
                if c.strand == "+":
                    gs, ge = c.start + (a - c.cons_start), c.start + (b - c.cons_start)
                else:
                    gs, ge = c.end - (b - c.cons_start), c.end - (a - c.cons_start)
                out.append((c.chrom, gs, ge))
    return out


# ----------------------------------------------------------------------------- variants


def _plant_variants(
    rng: np.random.Generator,
    seqs: dict[str, np.ndarray],
    layout: _Layout,
    low: list,
    cnv: list,
    copies: list[_Copy],
    *,
    snv_rate: float,
    indel_rate: float,
    hom_fraction: float,
    multiallelic_fraction: float,
    str_indel_fraction: float,
    n_mosaic: int,
    mosaic_vaf: tuple[float, float],
) -> tuple[list[_Variant], list[_Mosaic]]:
    variants: list[_Variant] = []
    taken: dict[str, list[int]] = {c: [] for c in seqs}

    def gt_for(kind_multi: bool = False) -> tuple[int, int]:
        if kind_multi:
            return (1, 2) if rng.random() < 0.5 else (2, 1)
        if rng.random() < hom_fraction:
            return (1, 1)
        return (0, 1) if rng.random() < 0.5 else (1, 0)

    # Unit expansions / contractions in some STRs, left-aligned (anchor before the STR).
    for chrom, s, _e, _name, _cls, _fam, unit in low:
        if unit is None or rng.random() >= str_indel_fraction:
            continue
        seq = seqs[chrom]
        anchor = _decode(seq[s - 1 : s])
        if rng.random() < 0.5:
            v = _Variant(chrom, s - 1, anchor + unit, [anchor], gt_for(), "str_del")
        else:
            v = _Variant(chrom, s - 1, anchor, [anchor + unit], gt_for(), "str_ins")
        variants.append(v)
        taken[chrom].append(s - 1)

    low_mask = {c: np.zeros(n.size, dtype=bool) for c, n in seqs.items()}
    for chrom, s, e, *_ in low:
        low_mask[chrom][max(0, s - 15) : e + 15] = True

    for chrom, seq in seqs.items():
        n = seq.size
        n_snv = int(rng.poisson(snv_rate * n))
        n_indel = int(rng.poisson(indel_rate * n))
        pos = rng.integers(1000, n - 1000, size=n_snv + n_indel)
        kinds = np.array(["snv"] * n_snv + ["indel"] * n_indel)
        order = rng.permutation(pos.size)
        for p, kind in zip(pos[order].tolist(), kinds[order].tolist(), strict=True):
            if low_mask[chrom][p] or any(abs(p - q) < 15 for q in taken[chrom]):
                continue
            ref = _decode(seq[p : p + 1])
            if kind == "snv":
                multi = rng.random() < multiallelic_fraction
                others = [b for b in "ACGT" if b != ref]
                rng.shuffle(others)
                alts = others[:2] if multi else others[:1]
                variants.append(
                    _Variant(chrom, p, ref, alts, gt_for(multi), "multi" if multi else "snv")
                )
            else:
                k = int(min(rng.geometric(0.45), 10))
                if rng.random() < 0.5:
                    ins = _decode(_random_seq(rng, k))
                    variants.append(_Variant(chrom, p, ref, [ref + ins], gt_for(), "ins"))
                else:
                    variants.append(
                        _Variant(chrom, p, _decode(seq[p : p + 1 + k]), [ref], gt_for(), "del")
                    )
            taken[chrom].append(p)
    variants.sort(key=lambda v: (list(seqs).index(v.chrom), v.pos))

    # Mosaic SNVs: unique sequence only (outside repeats, the CN gain and low complexity),
    # away from germline variants, so their allele fraction is what the BAM shows.
    mosaics: list[_Mosaic] = []
    repeat_iv = [(c.chrom, c.start, c.end) for c in copies] + [tuple(x) for x in cnv]
    names = list(seqs)
    tries = 0
    while len(mosaics) < n_mosaic:
        tries += 1
        if tries > 200 * max(n_mosaic, 1):
            raise SimulationError(f"cannot place {n_mosaic} mosaic SNVs; raise --length")
        chrom = names[int(rng.integers(0, len(names)))]
        p = int(rng.integers(1000, seqs[chrom].size - 1000))
        if low_mask[chrom][p] or any(abs(p - q) < 160 for q in taken[chrom]):
            continue
        if any(c == chrom and s - 200 <= p < e + 200 for c, s, e in repeat_iv):
            continue
        ref = _decode(seqs[chrom][p : p + 1])
        alt = [b for b in "ACGT" if b != ref][int(rng.integers(0, 3))]
        mosaics.append(
            _Mosaic(chrom, p, ref, alt, float(rng.uniform(*mosaic_vaf)), int(rng.integers(0, 2)))
        )
        taken[chrom].append(p)
    mosaics.sort(key=lambda m: (names.index(m.chrom), m.pos))
    return variants, mosaics


def _haplotype(
    seq: np.ndarray, variants: list[_Variant], hap: int
) -> tuple[np.ndarray, np.ndarray]:
    """(haplotype bases, reference position of each base; -1 for inserted bases)."""
    seq_parts: list[np.ndarray] = []
    map_parts: list[np.ndarray] = []
    cursor = 0
    for v in variants:
        a = v.gt[hap]
        if a == 0:
            continue
        allele = _encode(v.alts[a - 1])
        r = len(v.ref)
        seq_parts.append(seq[cursor : v.pos])
        map_parts.append(np.arange(cursor, v.pos, dtype=np.int64))
        if allele.size == r:
            amap = np.arange(v.pos, v.pos + r, dtype=np.int64)
        elif allele.size > r:  # insertion after the shared anchor base(s)
            amap = np.concatenate([np.arange(v.pos, v.pos + r), np.full(allele.size - r, -1)])
        else:  # deletion: allele keeps the anchor base(s)
            amap = np.arange(v.pos, v.pos + allele.size, dtype=np.int64)
        seq_parts.append(allele)
        map_parts.append(amap.astype(np.int64))
        cursor = v.pos + r
    seq_parts.append(seq[cursor:])
    map_parts.append(np.arange(cursor, seq.size, dtype=np.int64))
    return np.concatenate(seq_parts).astype(np.uint8), np.concatenate(map_parts)


# ----------------------------------------------------------------------------- reads


def _qualities(rng: np.random.Generator, n: int, rl: int) -> np.ndarray:
    """Phred qualities in sequencing order: decay along the read, per-read offset, dips."""
    x = np.arange(rl) / rl
    mean = 38.0 - 12.0 * x**2
    q = rng.normal(mean, 2.5, size=(n, rl)) + rng.normal(0, 2.0, size=(n, 1))
    dips = rng.random((n, rl)) < 0.008
    q[dips] = rng.integers(2, 12, size=int(dips.sum()))
    return np.clip(np.rint(q), 2, 41).astype(np.uint8)


def _cigar(refpos: np.ndarray) -> tuple[int, list[tuple[int, int]]]:
    """(reference start, cigartuples) for a read from its per-base reference positions."""
    aligned = np.flatnonzero(refpos >= 0)
    first, last = int(aligned[0]), int(aligned[-1])
    ops: list[tuple[int, int]] = []

    def push(op: int, n: int) -> None:
        if n <= 0:
            return
        if ops and ops[-1][0] == op:
            ops[-1] = (op, ops[-1][1] + n)
        else:
            ops.append((op, n))

    push(4, first)
    prev = int(refpos[first])
    push(0, 1)
    for i in range(first + 1, last + 1):
        r = int(refpos[i])
        if r < 0:
            push(1, 1)
            continue
        push(2, r - prev - 1)
        push(0, 1)
        prev = r
    push(4, refpos.size - 1 - last)
    return int(refpos[first]), ops


@dataclass
class _Reads:
    """All reads of the sample as arrays (mates of fragment f are rows 2f and 2f+1)."""

    chrom: np.ndarray  # contig index
    start: np.ndarray  # reference start
    end: np.ndarray  # reference end (exclusive)
    seq: np.ndarray  # [n, rl] codes in reference orientation
    qual: np.ndarray  # [n, rl] in reference orientation
    reverse: np.ndarray
    simple: np.ndarray  # pure <rl>M alignment
    cigars: dict[int, list[tuple[int, int]]]
    mapq: np.ndarray
    moved: np.ndarray
    hap: np.ndarray
    origin: np.ndarray  # true reference start before any misplacement
    origin_chrom: np.ndarray  # true contig index before any misplacement


def _generate_reads(
    rng: np.random.Generator,
    seqs: dict[str, np.ndarray],
    variants: list[_Variant],
    mosaics: list[_Mosaic],
    cnv: list,
    *,
    coverage: float,
    read_length: int,
    insert_mean: float,
    insert_sd: float,
) -> _Reads:
    rl = read_length
    names = list(seqs)
    blocks = []
    for ci, chrom in enumerate(names):
        cv = [v for v in variants if v.chrom == chrom]
        for hap in (0, 1):
            hseq, hmap = _haplotype(seqs[chrom], cv, hap)
            starts_list, flen_list = [], []
            n_frag = int(rng.poisson(coverage / 2 * hseq.size / (2 * rl)))
            flen = np.clip(
                np.rint(rng.normal(insert_mean, insert_sd, n_frag)),
                rl,
                min(3 * insert_mean, hseq.size - 1),
            ).astype(np.int64)
            starts_list.append((rng.random(n_frag) * (hseq.size - flen)).astype(np.int64))
            flen_list.append(flen)
            if hap == 0:  # the extra copy of a CN gain sits on haplotype 0
                for c, s, e in cnv:
                    if c != chrom:
                        continue
                    hs, he = np.searchsorted(hmap, [s, e])
                    m = int(rng.poisson(coverage / 2 * (he - hs) / (2 * rl)))
                    fl = np.clip(
                        np.rint(rng.normal(insert_mean, insert_sd, m)), rl, he - hs - 1
                    ).astype(np.int64)
                    starts_list.append(hs + (rng.random(m) * (he - hs - fl)).astype(np.int64))
                    flen_list.append(fl)
            fs = np.concatenate(starts_list)
            fl = np.concatenate(flen_list)
            left = fs[:, None] + np.arange(rl)
            right = (fs + fl - rl)[:, None] + np.arange(rl)
            lseq, rseq = hseq[left], hseq[right]
            # Mosaic alleles: per fragment (both mates agree), on the mosaic's haplotype only.
            for m in mosaics:
                if m.chrom != chrom or m.hap != hap:
                    continue
                hp = int(np.searchsorted(hmap, m.pos))
                if hp >= hmap.size or hmap[hp] != m.pos:
                    continue
                carrier = rng.random(fs.size) < min(1.0, 2 * m.vaf)
                alt = _encode(m.alt)[0]
                for pos_arr, seq_arr in ((fs, lseq), (fs + fl - rl, rseq)):
                    hit = carrier & (pos_arr <= hp) & (hp < pos_arr + rl)
                    seq_arr[np.flatnonzero(hit), hp - pos_arr[hit]] = alt
            blocks.append((ci, hap, lseq, rseq, hmap[left], hmap[right]))

    n_frag_total = sum(b[2].shape[0] for b in blocks)
    n = 2 * n_frag_total
    seq = np.empty((n, rl), dtype=np.uint8)
    refpos = np.empty((n, rl), dtype=np.int64)
    chrom_arr = np.empty(n, dtype=np.int32)
    hap_arr = np.empty(n, dtype=np.int8)
    reverse = np.zeros(n, dtype=bool)
    o = 0
    for ci, hap, lseq, rseq, lmap, rmap in blocks:
        k = lseq.shape[0]
        seq[o : o + 2 * k : 2], seq[o + 1 : o + 2 * k : 2] = lseq, rseq
        refpos[o : o + 2 * k : 2], refpos[o + 1 : o + 2 * k : 2] = lmap, rmap
        reverse[o + 1 : o + 2 * k : 2] = True
        chrom_arr[o : o + 2 * k] = ci
        hap_arr[o : o + 2 * k] = hap
        o += 2 * k

    # Sequencing: qualities in sequencing order, flipped to reference order for reverse reads.
    qual = _qualities(rng, n, rl)
    qual[reverse] = qual[reverse, ::-1]
    err = rng.random((n, rl)) < 10.0 ** (-qual.astype(np.float64) / 10.0)
    seq[err] = (seq[err] + rng.integers(1, 4, size=int(err.sum()))) % 4
    seq[qual <= 2] = 4

    simple = (refpos.min(axis=1) >= 0) & (refpos[:, -1] - refpos[:, 0] == rl - 1)
    start = refpos[:, 0].copy()
    end = refpos[:, -1] + 1
    cigars: dict[int, list[tuple[int, int]]] = {}
    for i in np.flatnonzero(~simple).tolist():
        rp = refpos[i]
        if (rp < 0).all():  # entirely inside an insertion: cannot be aligned; drop later
            cigars[i] = []
            continue
        s, ops = _cigar(rp)
        start[i] = s
        end[i] = int(rp[rp >= 0].max()) + 1
        cigars[i] = ops
    return _Reads(
        chrom_arr,
        start,
        end,
        seq,
        qual,
        reverse,
        simple,
        cigars,
        np.full(n, 60, dtype=np.int16),
        np.zeros(n, dtype=bool),
        hap_arr,
        start.copy(),
        chrom_arr.copy(),
    )


def _multimap(
    rng: np.random.Generator,
    reads: _Reads,
    seqs: dict[str, np.ndarray],
    copies: list[_Copy],
    cons_len: dict[str, int],
) -> None:
    """Place pairs inside repeat copies at their best-matching copy and set MAPQ (see module
    docstring). Mutates ``reads`` in place."""
    names = list(seqs)
    rl = reads.seq.shape[1]
    fams: dict[str, list[_Copy]] = {}
    for c in copies:
        fams.setdefault(c.family, []).append(c)
    # Which copy (global index) fully contains each simple read.
    copy_of = np.full(reads.start.size, -1, dtype=np.int64)
    for gi, c in enumerate(copies):
        ci = names.index(c.chrom)
        inside = (
            (reads.chrom == ci) & (reads.start >= c.start) & (reads.end <= c.end) & reads.simple
        )
        copy_of[inside] = gi
    gidx = {id(c): gi for gi, c in enumerate(copies)}
    for fam, cps in fams.items():
        if len(cps) < 2:
            continue
        mat = _cons_matrix(seqs, cps, cons_len[fam])
        local = {gidx[id(c)]: k for k, c in enumerate(cps)}
        rows = np.flatnonzero(np.isin(copy_of, list(local)))
        if rows.size == 0:
            continue
        k_of = np.array([local[g] for g in copy_of[rows].tolist()])
        c_strand = np.array([c.strand == "-" for c in cps])
        c_cs = np.array([c.cons_start for c in cps])
        c_gs = np.array([c.start for c in cps])
        c_ge = np.array([c.end for c in cps])
        minus = c_strand[k_of]
        cstart = np.where(
            minus,
            c_cs[k_of] + (c_ge[k_of] - reads.end[rows]),
            c_cs[k_of] + (reads.start[rows] - c_gs[k_of]),
        )
        rseq = reads.seq[rows]
        rcons = np.where(minus[:, None], _revcomp(rseq), rseq)
        cols = cstart[:, None] + np.arange(rl)
        mism = np.empty((len(cps), rows.size), dtype=np.float64)
        for j in range(len(cps)):
            ref_j = mat[j][cols]
            mm = (ref_j != rcons).sum(axis=1).astype(np.float64)
            mm[(ref_j == 5).any(axis=1)] = np.inf  # copy j lacks this consensus interval
            mism[j] = mm
        # Pairs with both mates in the same copy choose a placement by pair score.
        pos_in = {int(r): t for t, r in enumerate(rows.tolist())}
        chosen = k_of.copy()
        for t, r in enumerate(rows.tolist()):
            if r % 2:
                continue
            t2 = pos_in.get(r + 1)
            if t2 is None or k_of[t2] != k_of[t]:
                continue
            score = mism[:, t] + mism[:, t2] + rng.random(len(cps)) * 0.5  # random tie-break
            j = int(np.argmin(score))
            chosen[t] = chosen[t2] = j
        # MAPQ per mate: ~5 per mismatch between the chosen and the next best copy.
        own = mism[chosen, np.arange(rows.size)]
        others = mism.copy()
        others[chosen, np.arange(rows.size)] = np.inf
        second = others.min(axis=0)
        delta = second - own
        score1 = rl - 5.0 * own
        mapq = np.where(
            np.isinf(second),
            60.0,
            30.0 * (1.0 - (rl - 5.0 * second) / np.maximum(score1, 1.0)) * math.log(rl),
        )
        mapq = np.where(delta <= 0, 0.0, mapq)
        reads.mapq[rows] = np.clip(np.rint(mapq), 0, 60).astype(np.int16)
        # Move the misplaced mates.
        for t in np.flatnonzero(chosen != k_of).tolist():
            r = int(rows[t])
            j = int(chosen[t])
            cj = cps[j]
            seq_c, q = rcons[t], reads.qual[r]
            q_c = q[::-1] if minus[t] else q
            rev_c = bool(reads.reverse[r]) ^ bool(minus[t])
            off = int(cstart[t] - cj.cons_start)
            if cj.strand == "+":
                reads.start[r], reads.seq[r], reads.qual[r] = cj.start + off, seq_c, q_c
                reads.reverse[r] = rev_c
            else:
                reads.start[r] = cj.end - off - rl
                reads.seq[r], reads.qual[r] = _revcomp(seq_c), q_c[::-1]
                reads.reverse[r] = not rev_c
            reads.end[r] = reads.start[r] + rl
            reads.chrom[r] = names.index(cj.chrom)
            reads.moved[r] = True


# ----------------------------------------------------------------------------- writers


def _write_fasta(path: Path, seqs: dict[str, np.ndarray]) -> None:
    with open(path, "w") as fh:
        for chrom, s in seqs.items():
            fh.write(f">{chrom}\n")
            txt = _decode(s)
            for i in range(0, len(txt), 60):
                fh.write(txt[i : i + 60] + "\n")
    pysam.faidx(str(path))


def _write_bam(path: Path, reads: _Reads, seqs: dict[str, np.ndarray], progress: bool) -> int:
    names = list(seqs)
    header = {
        "HD": {"VN": "1.6", "SO": "coordinate"},
        "SQ": [{"SN": c, "LN": int(s.size)} for c, s in seqs.items()],
        "RG": [{"ID": "sim", "SM": SAMPLE, "PL": "ILLUMINA", "LB": "sim"}],
        "PG": [{"ID": "dvprobe-simulate", "PN": "dvprobe simulate"}],
    }
    n = reads.start.size
    keep = np.array([reads.simple[i] or bool(reads.cigars.get(i)) for i in range(n)])
    # A pair is kept only if both mates align.
    keep = keep.reshape(-1, 2).all(axis=1).repeat(2)
    mate = np.arange(n) ^ 1
    tlen_abs = np.maximum(reads.end, reads.end[mate]) - np.minimum(reads.start, reads.start[mate])
    is_left = (reads.start < reads.start[mate]) | (
        (reads.start == reads.start[mate]) & (np.arange(n) % 2 == 0)
    )
    same_chrom = reads.chrom == reads.chrom[mate]
    tlen = np.where(same_chrom, np.where(is_left, tlen_abs, -tlen_abs), 0)
    fwd_left = np.where(is_left, ~reads.reverse, ~reads.reverse[mate])
    proper = same_chrom & (reads.reverse != reads.reverse[mate]) & fwd_left & (tlen_abs <= 1000)
    read1 = np.random.default_rng(0).random(n // 2) < 0.5  # which mate is R1 (deterministic)
    first = np.where(np.arange(n) % 2 == 0, read1.repeat(2), ~read1.repeat(2))
    flag = (
        1
        | np.where(proper, 2, 0)
        | np.where(reads.reverse, 16, 0)
        | np.where(reads.reverse[mate], 32, 0)
        | np.where(first, 64, 128)
    )
    order = np.lexsort((np.arange(n), reads.start, reads.chrom))
    order = order[keep[order]]
    rl = reads.seq.shape[1]
    ascii_seq = _ALPHABET[reads.seq]
    written = 0
    with pysam.AlignmentFile(str(path), "wb", header=header) as out:
        for i in tqdm(
            order.tolist(), desc="write BAM", unit="read", disable=not progress, mininterval=1.0
        ):
            a = pysam.AlignedSegment(out.header)
            a.query_name = f"sim{i // 2:08d}"
            a.flag = int(flag[i])
            a.reference_id = int(reads.chrom[i])
            a.reference_start = int(reads.start[i])
            a.mapping_quality = int(reads.mapq[i])
            a.cigartuples = [(0, rl)] if reads.simple[i] else reads.cigars[i]
            a.next_reference_id = int(reads.chrom[i ^ 1])
            a.next_reference_start = int(reads.start[i ^ 1])
            a.template_length = int(tlen[i])
            a.query_sequence = ascii_seq[i].tobytes().decode()
            a.query_qualities = reads.qual[i]
            tags: list[tuple[str, object]] = [("RG", "sim"), ("ZH", int(reads.hap[i]))]
            if reads.moved[i]:  # misplaced by the multi-mapping model: record the truth
                tags.append(("ZT", f"{names[reads.origin_chrom[i]]}:{int(reads.origin[i]) + 1}"))
            a.set_tags(tags)
            out.write(a)
            written += 1
    pysam.index(str(path))
    return written


def _vcf_header(seqs: dict[str, np.ndarray], mosaic: bool) -> pysam.VariantHeader:
    h = pysam.VariantHeader()
    for c, s in seqs.items():
        h.contigs.add(c, length=int(s.size))
    h.add_line('##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">')
    h.add_line('##INFO=<ID=KIND,Number=1,Type=String,Description="Planted variant kind">')
    if mosaic:
        h.add_line(
            '##INFO=<ID=VAF,Number=A,Type=Float,Description="Planted variant allele '
            'fraction (fraction of all reads carrying the alt)">'
        )
        h.add_line(
            '##INFO=<ID=HAP,Number=1,Type=Integer,Description="Haplotype carrying '
            'the mosaic allele (0/1)">'
        )
        h.add_line(
            '##INFO=<ID=MOSAIC,Number=0,Type=Flag,Description="Mosaic (post-zygotic) variant">'
        )
    h.add_sample(SAMPLE)
    return h


def _write_vcf(path_gz: Path, seqs: dict[str, np.ndarray], records: list, mosaic: bool) -> None:
    plain = path_gz.with_suffix("")  # x.vcf.gz -> x.vcf
    hdr = _vcf_header(seqs, mosaic)
    with pysam.VariantFile(str(plain), "w", header=hdr) as vf:
        for r in records:
            if mosaic:
                rec = vf.new_record(
                    contig=r.chrom,
                    start=r.pos,
                    stop=r.pos + 1,
                    alleles=(r.ref, r.alt),
                    id=f"mosaic_{r.chrom}_{r.pos + 1}",
                )
                rec.info["VAF"] = (round(r.vaf, 4),)
                rec.info["HAP"] = r.hap
                rec.info["MOSAIC"] = True
                rec.info["KIND"] = "mosaic_snv"
                rec.samples[SAMPLE]["GT"] = (0, 1)
            else:
                rec = vf.new_record(
                    contig=r.chrom, start=r.pos, stop=r.pos + len(r.ref), alleles=(r.ref, *r.alts)
                )
                rec.info["KIND"] = r.kind
                rec.samples[SAMPLE]["GT"] = r.gt
                rec.samples[SAMPLE].phased = True
            vf.write(rec)
    pysam.tabix_index(str(plain), preset="vcf", force=True)


def _write_bed(path: Path, rows: list[tuple], order: list[str], merge: bool = False) -> None:
    rows = sorted(rows, key=lambda r: (order.index(r[0]), r[1], r[2]))
    if merge:
        merged: list[list] = []
        for c, s, e, *_ in rows:
            if merged and merged[-1][0] == c and s <= merged[-1][2]:
                merged[-1][2] = max(merged[-1][2], e)
            else:
                merged.append([c, s, e])
        rows = [tuple(m) for m in merged]
    with open(path, "w") as fh:
        for r in rows:
            fh.write("\t".join(str(x) for x in r) + "\n")


def _write_rmsk(
    path: Path,
    copies: list[_Copy],
    low: list,
    cons_len: dict[str, int],
    seqs: dict[str, np.ndarray],
) -> None:
    """UCSC rmsk.txt (17 tab-separated columns, no header, 0-based half-open)."""
    order = list(seqs)
    rows = []
    for c in copies:
        if not c.family.startswith("L1"):
            continue
        L = cons_len[c.family]
        if c.strand == "+":
            rep = (c.cons_start + 1, c.cons_end, -(L - c.cons_end))
        else:
            rep = (-(L - c.cons_end), c.cons_end, c.cons_start + 1)
        rows.append(
            (
                c.chrom,
                c.start,
                c.end,
                c.strand,
                c.family,
                "LINE",
                "L1",
                rep,
                int(c.divergence * 1000),
            )
        )
    for chrom, s, e, name, cls, fam, _unit in low:
        rows.append((chrom, s, e, "+", name, cls, fam, (1, e - s, 0), 0))
    rows.sort(key=lambda r: (order.index(r[0]), r[1]))
    with open(path, "w") as fh:
        for k, (chrom, s, e, strand, name, cls, fam, rep, mdiv) in enumerate(rows):
            left = -(seqs[chrom].size - e)
            sw = max(1, int((e - s) * (1 - mdiv / 1000) * 2))
            cols = [
                _ucsc_bin(s, e),
                sw,
                mdiv,
                0,
                0,
                chrom,
                s,
                e,
                left,
                strand,
                name,
                cls,
                fam,
                rep[0],
                rep[1],
                rep[2],
                k + 1,
            ]
            fh.write("\t".join(str(x) for x in cols) + "\n")


# ----------------------------------------------------------------------------- API

# What :func:`simulate` writes into its directory, by role (indexes beside them).
SIM_FILES = {
    "reference": "ref.fa",
    "bam": "reads.bam",
    "truth_vcf": "truth.vcf.gz",
    "mosaic_vcf": "mosaic.vcf.gz",
    "rmsk": "rmsk.txt",
    "lowmappability": "lowmappability.bed",
    "segdup": "segdup.bed",
    "lowcomplexity": "lowcomplexity.bed",
    "line_bed": "line.bed",
    "cnv_gain": "cnv_gain.bed",
    "manifest": "truth.json",
}


def simulate(
    out: str | Path,
    *,
    seed: int = 0,
    length: int = 400_000,
    contigs: tuple[str, ...] = ("chr20", "chr21"),
    coverage: float = 30.0,
    read_length: int = 150,
    insert_mean: float = 400.0,
    insert_sd: float = 80.0,
    n_line_families: int = 2,
    line_copies: int = 8,
    line_length: int = 6000,
    line_divergence: tuple[float, float] = (0.02, 0.10),
    young_fraction: float = 0.3,
    young_divergence: tuple[float, float] = (0.001, 0.01),
    segdup_length: int = 8000,
    segdup_divergence: float = 0.01,
    cnv_length: int = 20_000,
    n_homopolymers: int = 30,
    n_strs: int = 40,
    n_low_complexity: int = 15,
    snv_rate: float = 1e-3,
    indel_rate: float = 1.2e-4,
    hom_fraction: float = 0.35,
    multiallelic_fraction: float = 0.03,
    str_indel_fraction: float = 0.3,
    n_mosaic: int = 40,
    mosaic_vaf: tuple[float, float] = (0.03, 0.20),
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Path]:
    """Simulate a sample with planted concepts into directory ``out``.

    Returns the written files by role (``reference``, ``bam``, ``truth_vcf``,
    ``mosaic_vcf``, ``rmsk``, ``lowmappability``, ``segdup``, ``lowcomplexity``,
    ``line_bed``, ``cnv_gain``, ``manifest``). Same seed and parameters -> identical files
    (the BAM byte-for-byte up to the pysam/htslib version in its header). Files of an
    earlier simulation in ``out`` are replaced only with ``overwrite``.
    """
    params = {k: v for k, v in locals().items() if k not in ("out", "progress", "overwrite")}
    if length < 20_000:
        raise SimulationError(f"--length {length} is too small (need >= 20000 bp)")
    if not contigs or len(set(contigs)) != len(contigs):
        raise SimulationError(f"contig names must be unique and non-empty, got {contigs!r}")
    if coverage <= 0 or read_length < 30 or insert_mean < read_length:
        raise SimulationError("need coverage > 0, read_length >= 30, insert_mean >= read_length")
    for name, (lo, hi) in (
        ("line_divergence", line_divergence),
        ("mosaic_vaf", mosaic_vaf),
        ("young_divergence", young_divergence),
    ):
        if not (0 <= lo <= hi < 0.5):
            raise SimulationError(f"{name} must be 0 <= lo <= hi < 0.5, got {(lo, hi)}")
    if line_length < 2000 and n_line_families > 0:
        raise SimulationError("line_length must be >= 2000 bp")
    # A rate near 1 per bp never finds free positions for its variants (it ran forever).
    for name, rate in (("snv_rate", snv_rate), ("indel_rate", indel_rate)):
        if not 0 <= rate <= 0.01:
            raise SimulationError(f"--{name.replace('_', '-')} must be within 0..0.01 per bp "
                                  f"(human germline: ~1e-3), got {rate}")
    counts = {"n_mosaic": n_mosaic, "n_line_families": n_line_families,
              "line_copies": line_copies, "n_homopolymers": n_homopolymers,
              "n_strs": n_strs, "n_low_complexity": n_low_complexity,
              "segdup_length": segdup_length, "cnv_length": cnv_length}
    negative = {k: v for k, v in counts.items() if v < 0}
    if negative:
        raise SimulationError(f"counts and lengths must be >= 0, got {negative}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SimulationError(f"--out {out} is a file; give a directory")
    present = sorted(name for name in SIM_FILES.values() if (out / name).exists())
    if present and not overwrite:
        raise SimulationError(
            f"{out}: already holds {', '.join(present)} (an earlier simulation?); "
            "give a new directory or --overwrite to replace them"
        )
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    # Contig lengths: split ``length`` 3:2 between two contigs (like chr20 : chr21), evenly
    # for other counts.
    weights = [3, 2] if len(contigs) == 2 else [1] * len(contigs)
    sizes = [int(length * w / sum(weights)) for w in weights]
    lengths = dict(zip(contigs, sizes, strict=True))

    seqs, layout, copies, consensus, cnv, low = _build_genome(
        rng,
        lengths,
        n_line_families=n_line_families,
        line_copies=line_copies,
        line_length=line_length,
        line_divergence=line_divergence,
        young_fraction=young_fraction,
        young_divergence=young_divergence,
        segdup_length=segdup_length,
        segdup_divergence=segdup_divergence,
        cnv_length=cnv_length,
        n_homopolymers=n_homopolymers,
        n_strs=n_strs,
        n_low_complexity=n_low_complexity,
    )
    cons_len = {k: int(v.size) for k, v in consensus.items()}
    variants, mosaics = _plant_variants(
        rng,
        seqs,
        layout,
        low,
        cnv,
        copies,
        snv_rate=snv_rate,
        indel_rate=indel_rate,
        hom_fraction=hom_fraction,
        multiallelic_fraction=multiallelic_fraction,
        str_indel_fraction=str_indel_fraction,
        n_mosaic=n_mosaic,
        mosaic_vaf=mosaic_vaf,
    )
    reads = _generate_reads(
        rng,
        seqs,
        variants,
        mosaics,
        cnv,
        coverage=coverage,
        read_length=read_length,
        insert_mean=insert_mean,
        insert_sd=insert_sd,
    )
    _multimap(rng, reads, seqs, copies, cons_len)

    files = {role: out / name for role, name in SIM_FILES.items()}
    order = list(seqs)
    _write_fasta(files["reference"], seqs)
    n_written = _write_bam(files["bam"], reads, seqs, progress)
    _write_vcf(files["truth_vcf"], seqs, variants, mosaic=False)
    _write_vcf(files["mosaic_vcf"], seqs, mosaics, mosaic=True)
    _write_rmsk(files["rmsk"], copies, low, cons_len, seqs)
    fams: dict[str, list[_Copy]] = {}
    for c in copies:
        fams.setdefault(c.family, []).append(c)
    _write_bed(files["lowmappability"], _low_mappability(seqs, fams, cons_len), order, merge=True)
    _write_bed(
        files["segdup"],
        [
            (c.chrom, c.start, c.end, f"{c.family}_{c.index}")
            for c in copies
            if c.family.startswith("SegDup")
        ],
        order,
    )
    _write_bed(files["lowcomplexity"], [(c, s, e, n) for c, s, e, n, *_ in low], order)
    _write_bed(
        files["line_bed"],
        [
            (c.chrom, c.start, c.end, f"{c.family}#{c.index}", 0, c.strand)
            for c in copies
            if c.family.startswith("L1")
        ],
        order,
    )
    _write_bed(files["cnv_gain"], [(c, s, e, "CN3") for c, s, e in cnv], order)

    kinds: dict[str, int] = {}
    for v in variants:
        kinds[v.kind] = kinds.get(v.kind, 0) + 1
    manifest = {
        "format": SIM_FORMAT,
        "version": 1,
        "sample": SAMPLE,
        "params": {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()},
        "contigs": {c: int(s.size) for c, s in seqs.items()},
        "files": {k: p.name for k, p in files.items()},
        "counts": {
            "reads": n_written,
            "misplaced_reads": int(reads.moved.sum()),
            "germline_variants": len(variants),
            "germline_by_kind": kinds,
            "mosaic_snvs": len(mosaics),
            "line_copies": sum(c.family.startswith("L1") for c in copies),
            "low_complexity": len(low),
        },
        "repeat_copies": [
            {
                "family": c.family,
                "copy": c.index,
                "chrom": c.chrom,
                "start": c.start,
                "end": c.end,
                "strand": c.strand,
                "cons_start": c.cons_start,
                "cons_end": c.cons_end,
                "divergence": round(c.divergence, 5),
                "parent": c.parent,
            }
            for c in copies
        ],
        "cnv_gain": [{"chrom": c, "start": s, "end": e, "copy_number": 3} for c, s, e in cnv],
        "concepts": {
            "line": "rmsk",
            "segdup": "segdup",
            "lowmappability": "lowmappability",
            "lowcomplexity": "lowcomplexity",
            "cnv_gain": "cnv_gain",
            "mosaic": "mosaic_vcf",
            "germline": "truth_vcf",
        },
    }
    files["manifest"].write_text(json.dumps(manifest, indent=1) + "\n")
    return files


def planted_concepts(truth_dir: str | Path) -> dict[str, Path]:
    """Annotation files of a ``simulate()`` output, by concept name, for ``dvprobe annotate``.

    Keys: ``line`` (rmsk.txt; LINE rows are the planted L1 copies), ``segdup``,
    ``lowmappability``, ``lowcomplexity``, ``cnv_gain`` (BEDs), ``mosaic`` (mosaic truth
    VCF), ``germline`` (germline truth VCF). Read from ``truth.json`` so renamed layouts
    keep working; raises ``SimulationError`` when the directory is not a simulation.
    """
    d = Path(truth_dir)
    mpath = d / "truth.json"
    if not mpath.is_file():
        raise SimulationError(f"{mpath}: not found (is {d} a `dvprobe simulate` output?)")
    try:
        m = json.loads(mpath.read_text())
    except json.JSONDecodeError as exc:
        raise SimulationError(f"{mpath}: not valid JSON ({exc})") from None
    if m.get("format") != SIM_FORMAT:
        raise SimulationError(f"{mpath}: format is {m.get('format')!r}, expected {SIM_FORMAT!r}")
    out: dict[str, Path] = {}
    for concept, role in m["concepts"].items():
        p = d / m["files"][role]
        if not p.exists():
            raise SimulationError(f"{p}: missing file for concept {concept!r}")
        out[concept] = p
    return out
