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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pysam
from tqdm import tqdm

from dvtorch.errors import DvprobeError

__all__ = [
    "SIM_FILES",
    "SIM_FORMAT",
    "SimulationConfig",
    "SimulationError",
    "planted_concepts",
    "simulate",
    "simulation_summary",
]

SIM_FORMAT = "dvprobe-sim"
SAMPLE = "SIM"
_ALPHABET = np.frombuffer(b"ACGTN", dtype=np.uint8)  # code -> ASCII
_CODE = np.full(256, 4, dtype=np.uint8)  # ASCII -> code (anything else -> N)
for _i, _b in enumerate(b"ACGT"):
    _CODE[_b] = _i
    _CODE[ord(chr(_b).lower())] = _i


class SimulationError(DvprobeError):
    """Bad simulation parameters or an unusable output directory."""


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

# Fields of SimulationConfig that say where to write, not what: left out of truth.json.
_NOT_PARAMETERS = ("out", "overwrite")


@dataclass(frozen=True)
class SimulationConfig:
    """What to simulate and where: every parameter of :func:`simulate`.

    The defaults give the demo's sample (400 kb over chr20 + chr21 at 30x). Values are
    checked when the config is built, so a bad one is refused (``SimulationError`` naming
    it) before any work; ``dataclasses.replace`` checks again. ``out`` and ``overwrite``
    say where to write; every other field is recorded in ``truth.json`` as ``params``.
    """

    out: str | Path
    seed: int = 0
    length: int = 400_000  # total bp, split 3:2 over two contigs (evenly over other counts)
    contigs: tuple[str, ...] = ("chr20", "chr21")
    coverage: float = 30.0
    read_length: int = 150
    insert_mean: float = 400.0
    insert_sd: float = 80.0
    n_line_families: int = 2
    line_copies: int = 8  # per family
    line_length: int = 6000  # consensus length
    line_divergence: tuple[float, float] = (0.02, 0.10)  # substitution rate range of copies
    young_fraction: float = 0.3  # share of copies derived from another copy
    young_divergence: tuple[float, float] = (0.001, 0.01)  # their extra divergence
    segdup_length: int = 8000  # 0: no segmental duplication
    segdup_divergence: float = 0.01
    cnv_length: int = 20_000  # 0: no copy-number gain
    n_homopolymers: int = 30
    n_strs: int = 40
    n_low_complexity: int = 15
    snv_rate: float = 1e-3  # germline SNVs per bp
    indel_rate: float = 1.2e-4  # germline small indels per bp
    hom_fraction: float = 0.35
    multiallelic_fraction: float = 0.03
    str_indel_fraction: float = 0.3  # STRs given a germline unit expansion / contraction
    n_mosaic: int = 40
    mosaic_vaf: tuple[float, float] = (0.03, 0.20)
    overwrite: bool = False  # replace the files of an earlier simulation in ``out``

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "contigs", tuple(self.contigs))
        for name in ("line_divergence", "young_divergence", "mosaic_vaf"):
            object.__setattr__(self, name, _pair(name, getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        """Raise ``SimulationError`` for the first value that cannot make a sample."""
        if self.length < 20_000:
            raise SimulationError(f"--length {self.length} is too small (need >= 20000 bp)")
        if not self.contigs or len(set(self.contigs)) != len(self.contigs):
            raise SimulationError(
                f"contig names must be unique and non-empty, got {self.contigs!r}"
            )
        if self.coverage <= 0 or self.read_length < 30 or self.insert_mean < self.read_length:
            raise SimulationError(
                "need coverage > 0, read_length >= 30, insert_mean >= read_length"
            )
        for name in ("line_divergence", "mosaic_vaf", "young_divergence"):
            lo, hi = getattr(self, name)
            if not (0 <= lo <= hi < 0.5):
                raise SimulationError(f"{name} must be 0 <= lo <= hi < 0.5, got {(lo, hi)}")
        if self.line_length < 2000 and self.n_line_families > 0:
            raise SimulationError("line_length must be >= 2000 bp")
        # A rate near 1 per bp never finds free positions for its variants (it ran forever).
        for name in ("snv_rate", "indel_rate"):
            rate = getattr(self, name)
            if not 0 <= rate <= 0.01:
                raise SimulationError(
                    f"--{name.replace('_', '-')} must be within 0..0.01 per bp "
                    f"(human germline: ~1e-3), got {rate}"
                )
        counts = ("n_mosaic", "n_line_families", "line_copies", "n_homopolymers", "n_strs",
                  "n_low_complexity", "segdup_length", "cnv_length")
        negative = {k: getattr(self, k) for k in counts if getattr(self, k) < 0}
        if negative:
            raise SimulationError(f"counts and lengths must be >= 0, got {negative}")

    def params(self) -> dict:
        """The parameters as ``truth.json`` records them (pairs as lists)."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in fields(self)
            if f.name not in _NOT_PARAMETERS
        }

    def contig_lengths(self) -> dict[str, int]:
        """``length`` split 3:2 between two contigs (like chr20 : chr21), evenly otherwise."""
        weights = [3, 2] if len(self.contigs) == 2 else [1] * len(self.contigs)
        sizes = [int(self.length * w / sum(weights)) for w in weights]
        return dict(zip(self.contigs, sizes, strict=True))


def _pair(name: str, value) -> tuple[float, float]:
    """``value`` as a ``(lo, hi)`` tuple, or a ``SimulationError`` naming the field."""
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise SimulationError(f"{name} must be a pair (lo, hi), got {value!r}") from None
    return lo, hi


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


class _Simple(NamedTuple):
    """A planted low-complexity stretch (homopolymer, STR or two-letter run)."""

    chrom: str
    start: int
    end: int
    name: str  # rmsk repName, e.g. "(CA)n" or "AG-rich"
    rclass: str  # rmsk repClass: Simple_repeat / Low_complexity
    family: str
    unit: str | None  # the STR's repeat unit (None: not an STR)


@dataclass
class _Genome:
    """The reference and what was planted in it (before any variant)."""

    seqs: dict[str, np.ndarray]
    layout: _Layout
    copies: list[_Copy] = field(default_factory=list)
    consensus: dict[str, np.ndarray] = field(default_factory=dict)
    cnv: list[tuple[str, int, int]] = field(default_factory=list)
    low: list[_Simple] = field(default_factory=list)

    @property
    def cons_len(self) -> dict[str, int]:
        return {k: int(v.size) for k, v in self.consensus.items()}

    @property
    def families(self) -> dict[str, list[_Copy]]:
        fams: dict[str, list[_Copy]] = {}
        for c in self.copies:
            fams.setdefault(c.family, []).append(c)
        return fams

    def insert(self, seq: np.ndarray, strand: str, what: str) -> tuple[str, int]:
        """Place ``seq`` (on ``strand``) somewhere free; returns (chrom, start)."""
        chrom, start = self.layout.place(seq.size, what=what)
        self.seqs[chrom][start : start + seq.size] = seq if strand == "+" else _revcomp(seq)
        return chrom, start


def _build_genome(rng: np.random.Generator, cfg: SimulationConfig) -> _Genome:
    """Random reference with LINE copies, a segdup, a CN-gain region and simple repeats."""
    lengths = cfg.contig_lengths()
    genome = _Genome({c: _random_seq(rng, n) for c, n in lengths.items()}, _Layout(lengths, rng))
    for f in range(cfg.n_line_families):
        _plant_line_family(rng, genome, f"L1Sim{f + 1}", cfg)
    if cfg.segdup_length > 0:
        _plant_segdup(rng, genome, cfg)
    if cfg.cnv_length > 0:
        chrom, start = genome.layout.place(cfg.cnv_length, margin=2000, what="copy-number gain")
        genome.cnv.append((chrom, start, start + cfg.cnv_length))
    _plant_homopolymers(rng, genome, cfg.n_homopolymers)
    _plant_strs(rng, genome, cfg.n_strs)
    _plant_two_letter_runs(rng, genome, cfg.n_low_complexity)
    return genome


def _plant_line_family(
    rng: np.random.Generator, genome: _Genome, name: str, cfg: SimulationConfig
) -> None:
    """A random AT-rich consensus and ``line_copies`` diverged (some young) copies of it."""
    cons = _random_seq(rng, cfg.line_length, gc=0.38)  # L1 is AT-rich
    genome.consensus[name] = cons
    family: list[_Copy] = []
    fam_seqs: list[np.ndarray] = []
    for k in range(cfg.line_copies):
        parent = None
        if k >= 2 and rng.random() < cfg.young_fraction:
            parent = int(rng.integers(0, k))
            p = family[parent]
            d = float(rng.uniform(*cfg.young_divergence))
            cs, ce = p.cons_start, p.cons_end
            seq = _substitute(rng, fam_seqs[parent], d)
            div = p.divergence + d
        else:
            truncated = k > 0 and rng.random() < 0.5
            cs = int(rng.integers(0, cfg.line_length - 1500)) if truncated else 0
            ce = cfg.line_length
            div = float(rng.uniform(*cfg.line_divergence))
            seq = _substitute(rng, cons[cs:ce], div)
        fam_seqs.append(seq)
        strand = "+" if rng.random() < 0.5 else "-"
        chrom, start = genome.insert(seq, strand, f"LINE copy {name}#{k}")
        family.append(_Copy(name, k, chrom, start, start + seq.size, strand, cs, ce, div, parent))
    genome.copies.extend(family)


def _plant_segdup(rng: np.random.Generator, genome: _Genome, cfg: SimulationConfig) -> None:
    """Two copies of a random segment, the second ``segdup_divergence`` apart."""
    name, n = "SegDup1", cfg.segdup_length
    base = _random_seq(rng, n)
    genome.consensus[name] = base
    for k, seq in enumerate((base, _substitute(rng, base, cfg.segdup_divergence))):
        strand = "+" if k == 0 or rng.random() < 0.5 else "-"
        chrom, start = genome.insert(seq, strand, "segmental duplication")
        div = cfg.segdup_divergence if k else 0.0
        genome.copies.append(_Copy(name, k, chrom, start, start + n, strand, 0, n, div))


def _plant_homopolymers(rng: np.random.Generator, genome: _Genome, count: int) -> None:
    for _ in range(count):
        n = int(rng.integers(10, 26))
        b = int(rng.integers(0, 4))
        chrom, s = genome.layout.place(n, margin=30, what="homopolymer")
        genome.seqs[chrom][s : s + n] = b
        name = f"({'ACGT'[b]})n"
        genome.low.append(_Simple(chrom, s, s + n, name, "Simple_repeat", "Simple_repeat", None))


def _plant_strs(rng: np.random.Generator, genome: _Genome, count: int) -> None:
    for _ in range(count):
        u = int(rng.integers(2, 7))
        unit = _random_seq(rng, u)
        while np.all(unit == unit[0]):
            unit = _random_seq(rng, u)
        reps = int(rng.integers(max(3, 15 // u), max(4, 60 // u) + 1))
        n = u * reps
        chrom, s = genome.layout.place(n, margin=30, what="short tandem repeat")
        genome.seqs[chrom][s : s + n] = np.tile(unit, reps)
        text = _decode(unit)
        genome.low.append(
            _Simple(chrom, s, s + n, f"({text})n", "Simple_repeat", "Simple_repeat", text)
        )


def _plant_two_letter_runs(rng: np.random.Generator, genome: _Genome, count: int) -> None:
    for _ in range(count):
        n = int(rng.integers(30, 101))
        pair = rng.choice(4, size=2, replace=False)
        chrom, s = genome.layout.place(n, margin=30, what="low-complexity stretch")
        genome.seqs[chrom][s : s + n] = pair[(rng.random(n) < 0.5).astype(int)]
        name = f"{_decode(np.sort(pair))}-rich"
        genome.low.append(
            _Simple(chrom, s, s + n, name, "Low_complexity", "Low_complexity", None)
        )


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
    rng: np.random.Generator, genome: _Genome, cfg: SimulationConfig
) -> tuple[list[_Variant], list[_Mosaic]]:
    """Germline variants (STR unit indels, SNVs, small indels) and mosaic SNVs."""
    taken: dict[str, list[int]] = {c: [] for c in genome.seqs}
    variants = _str_indels(rng, genome, cfg, taken)
    low_mask = {c: np.zeros(n.size, dtype=bool) for c, n in genome.seqs.items()}
    for chrom, s, e, *_ in genome.low:
        low_mask[chrom][max(0, s - 15) : e + 15] = True
    for chrom, seq in genome.seqs.items():
        variants += _small_variants(rng, chrom, seq, low_mask[chrom], taken[chrom], cfg)
    variants.sort(key=lambda v: (list(genome.seqs).index(v.chrom), v.pos))
    mosaics = _place_mosaics(rng, genome, low_mask, taken, cfg)
    return variants, mosaics


def _genotype(
    rng: np.random.Generator, hom_fraction: float, multi: bool = False
) -> tuple[int, int]:
    """A phased genotype: 1|2 or 2|1 for a multi-allelic site, else hom alt or het."""
    if multi:
        return (1, 2) if rng.random() < 0.5 else (2, 1)
    if rng.random() < hom_fraction:
        return (1, 1)
    return (0, 1) if rng.random() < 0.5 else (1, 0)


def _str_indels(
    rng: np.random.Generator, genome: _Genome, cfg: SimulationConfig, taken: dict[str, list[int]]
) -> list[_Variant]:
    """Unit expansions / contractions in some STRs, left-aligned (anchor before the STR)."""
    variants = []
    for chrom, s, _e, _name, _cls, _fam, unit in genome.low:
        if unit is None or rng.random() >= cfg.str_indel_fraction:
            continue
        anchor = _decode(genome.seqs[chrom][s - 1 : s])
        deletion = rng.random() < 0.5
        if deletion:
            v = _Variant(chrom, s - 1, anchor + unit, [anchor],
                         _genotype(rng, cfg.hom_fraction), "str_del")
        else:
            v = _Variant(chrom, s - 1, anchor, [anchor + unit],
                         _genotype(rng, cfg.hom_fraction), "str_ins")
        variants.append(v)
        taken[chrom].append(s - 1)
    return variants


def _small_variants(
    rng: np.random.Generator,
    chrom: str,
    seq: np.ndarray,
    low_mask: np.ndarray,
    taken: list[int],
    cfg: SimulationConfig,
) -> list[_Variant]:
    """Poisson numbers of SNVs and indels at random positions of one contig, at least 15 bp
    apart and away from low-complexity stretches (the positions are appended to ``taken``)."""
    n = seq.size
    n_snv = int(rng.poisson(cfg.snv_rate * n))
    n_indel = int(rng.poisson(cfg.indel_rate * n))
    pos = rng.integers(1000, n - 1000, size=n_snv + n_indel)
    kinds = np.array(["snv"] * n_snv + ["indel"] * n_indel)
    order = rng.permutation(pos.size)
    variants = []
    for p, kind in zip(pos[order].tolist(), kinds[order].tolist(), strict=True):
        if low_mask[p] or any(abs(p - q) < 15 for q in taken):
            continue
        ref = _decode(seq[p : p + 1])
        if kind == "snv":
            multi = rng.random() < cfg.multiallelic_fraction
            others = [b for b in "ACGT" if b != ref]
            rng.shuffle(others)
            alts = others[:2] if multi else others[:1]
            gt = _genotype(rng, cfg.hom_fraction, multi)
            variants.append(_Variant(chrom, p, ref, alts, gt, "multi" if multi else "snv"))
        else:
            k = int(min(rng.geometric(0.45), 10))
            if rng.random() < 0.5:
                ins = _decode(_random_seq(rng, k))
                gt = _genotype(rng, cfg.hom_fraction)
                variants.append(_Variant(chrom, p, ref, [ref + ins], gt, "ins"))
            else:
                gt = _genotype(rng, cfg.hom_fraction)
                variants.append(_Variant(chrom, p, _decode(seq[p : p + 1 + k]), [ref], gt, "del"))
        taken.append(p)
    return variants


def _place_mosaics(
    rng: np.random.Generator,
    genome: _Genome,
    low_mask: dict[str, np.ndarray],
    taken: dict[str, list[int]],
    cfg: SimulationConfig,
) -> list[_Mosaic]:
    """Mosaic SNVs in unique sequence only (outside repeats, the CN gain and low complexity),
    at least 160 bp from germline variants, so their allele fraction is what the BAM shows."""
    seqs, n_mosaic = genome.seqs, cfg.n_mosaic
    mosaics: list[_Mosaic] = []
    repeat_iv = [(c.chrom, c.start, c.end) for c in genome.copies] + [tuple(x) for x in genome.cnv]
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
        vaf = float(rng.uniform(*cfg.mosaic_vaf))
        mosaics.append(_Mosaic(chrom, p, ref, alt, vaf, int(rng.integers(0, 2))))
        taken[chrom].append(p)
    mosaics.sort(key=lambda m: (names.index(m.chrom), m.pos))
    return mosaics


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
    genome: _Genome,
    variants: list[_Variant],
    mosaics: list[_Mosaic],
    cfg: SimulationConfig,
) -> _Reads:
    """Read pairs from both haplotypes of every contig, with sequencing errors, aligned
    where they came from (the multi-mapping model moves some later)."""
    blocks = []
    for ci, chrom in enumerate(genome.seqs):
        cv = [v for v in variants if v.chrom == chrom]
        for hap in (0, 1):
            hseq, hmap = _haplotype(genome.seqs[chrom], cv, hap)
            fs, fl = _fragments(rng, hseq.size, hmap, chrom, hap, genome.cnv, cfg)
            rl = cfg.read_length
            left = fs[:, None] + np.arange(rl)
            right = (fs + fl - rl)[:, None] + np.arange(rl)
            lseq, rseq = hseq[left], hseq[right]
            _carry_mosaics(rng, mosaics, chrom, hap, hmap, fs, fl, lseq, rseq)
            blocks.append((ci, hap, lseq, rseq, hmap[left], hmap[right]))
    seq, refpos, chrom_arr, hap_arr, reverse = _interleave_mates(blocks, cfg.read_length)
    qual = _sequence(rng, seq, reverse)
    simple, start, end, cigars = _alignments(refpos)
    n = seq.shape[0]
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


def _fragments(
    rng: np.random.Generator,
    hap_length: int,
    hmap: np.ndarray,
    chrom: str,
    hap: int,
    cnv: list[tuple[str, int, int]],
    cfg: SimulationConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of the fragments drawn from one haplotype: uniform at half the
    coverage, plus the CN gain's extra copy, which sits on haplotype 0."""
    rl, mean, sd = cfg.read_length, cfg.insert_mean, cfg.insert_sd
    n_frag = int(rng.poisson(cfg.coverage / 2 * hap_length / (2 * rl)))
    flen = np.clip(
        np.rint(rng.normal(mean, sd, n_frag)), rl, min(3 * mean, hap_length - 1)
    ).astype(np.int64)
    starts = [(rng.random(n_frag) * (hap_length - flen)).astype(np.int64)]
    lengths = [flen]
    if hap == 0:
        for c, s, e in cnv:
            if c != chrom:
                continue
            hs, he = np.searchsorted(hmap, [s, e])
            m = int(rng.poisson(cfg.coverage / 2 * (he - hs) / (2 * rl)))
            fl = np.clip(np.rint(rng.normal(mean, sd, m)), rl, he - hs - 1).astype(np.int64)
            starts.append(hs + (rng.random(m) * (he - hs - fl)).astype(np.int64))
            lengths.append(fl)
    return np.concatenate(starts), np.concatenate(lengths)


def _carry_mosaics(
    rng: np.random.Generator,
    mosaics: list[_Mosaic],
    chrom: str,
    hap: int,
    hmap: np.ndarray,
    fs: np.ndarray,
    fl: np.ndarray,
    lseq: np.ndarray,
    rseq: np.ndarray,
) -> None:
    """Write mosaic alleles into the mates (in place): chosen per fragment, so both mates
    agree, on the mosaic's haplotype only."""
    rl = lseq.shape[1]
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


def _interleave_mates(blocks: list, rl: int) -> tuple[np.ndarray, ...]:
    """One array per field with the mates of fragment f in rows 2f (forward) and 2f+1
    (reverse): (seq, refpos, chrom, hap, reverse)."""
    n = 2 * sum(b[2].shape[0] for b in blocks)
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
    return seq, refpos, chrom_arr, hap_arr, reverse


def _sequence(rng: np.random.Generator, seq: np.ndarray, reverse: np.ndarray) -> np.ndarray:
    """Qualities (in sequencing order, flipped to reference order for reverse reads) and the
    substitution errors they imply, written into ``seq``; Q<=2 bases become N."""
    n, rl = seq.shape
    qual = _qualities(rng, n, rl)
    qual[reverse] = qual[reverse, ::-1]
    err = rng.random((n, rl)) < 10.0 ** (-qual.astype(np.float64) / 10.0)
    seq[err] = (seq[err] + rng.integers(1, 4, size=int(err.sum()))) % 4
    seq[qual <= 2] = 4
    return qual


def _alignments(refpos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """(simple, start, end, cigars) from each read's per-base reference positions: a simple
    read is one plain <rl>M alignment; the others get a CIGAR (empty: cannot be aligned)."""
    rl = refpos.shape[1]
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
    return simple, start, end, cigars


def _multimap(rng: np.random.Generator, reads: _Reads, genome: _Genome) -> None:
    """Place pairs inside repeat copies at their best-matching copy and set MAPQ (see module
    docstring). Mutates ``reads`` in place."""
    names = list(genome.seqs)
    # Which copy (global index) fully contains each simple read.
    copy_of = np.full(reads.start.size, -1, dtype=np.int64)
    for gi, c in enumerate(genome.copies):
        ci = names.index(c.chrom)
        inside = (
            (reads.chrom == ci) & (reads.start >= c.start) & (reads.end <= c.end) & reads.simple
        )
        copy_of[inside] = gi
    gidx = {id(c): gi for gi, c in enumerate(genome.copies)}
    cons_len = genome.cons_len
    for fam, cps in genome.families.items():
        if len(cps) < 2:
            continue
        local = {gidx[id(c)]: k for k, c in enumerate(cps)}
        rows = np.flatnonzero(np.isin(copy_of, list(local)))
        if rows.size == 0:
            continue
        k_of = np.array([local[g] for g in copy_of[rows].tolist()])
        mat = _cons_matrix(genome.seqs, cps, cons_len[fam])
        _place_in_family(rng, reads, cps, mat, rows, k_of, names)


def _place_in_family(
    rng: np.random.Generator,
    reads: _Reads,
    cps: list[_Copy],
    mat: np.ndarray,
    rows: np.ndarray,
    k_of: np.ndarray,
    names: list[str],
) -> None:
    """Score ``rows`` (reads inside copy ``k_of`` of one family) against every copy, place
    each pair at its best copy, set MAPQ and move the misplaced mates."""
    minus = np.array([c.strand == "-" for c in cps])[k_of]
    c_cs = np.array([c.cons_start for c in cps])[k_of]
    cstart = np.where(
        minus,
        c_cs + (np.array([c.end for c in cps])[k_of] - reads.end[rows]),
        c_cs + (reads.start[rows] - np.array([c.start for c in cps])[k_of]),
    )
    rcons = np.where(minus[:, None], _revcomp(reads.seq[rows]), reads.seq[rows])
    mism = _mismatches(mat, cstart, rcons)
    chosen = _choose_copies(rng, mism, rows, k_of)
    reads.mapq[rows] = _mapq(mism, chosen, reads.seq.shape[1])
    for t in np.flatnonzero(chosen != k_of).tolist():
        _move(reads, int(rows[t]), cps[int(chosen[t])], rcons[t], bool(minus[t]),
              int(cstart[t]), names)


def _mismatches(mat: np.ndarray, cstart: np.ndarray, rcons: np.ndarray) -> np.ndarray:
    """[copies, reads] substitutions of each read (consensus orientation, starting at
    consensus column ``cstart``) against each copy; inf where the copy lacks the interval."""
    cols = cstart[:, None] + np.arange(rcons.shape[1])
    mism = np.empty((mat.shape[0], rcons.shape[0]), dtype=np.float64)
    for j in range(mat.shape[0]):
        ref_j = mat[j][cols]
        mm = (ref_j != rcons).sum(axis=1).astype(np.float64)
        mm[(ref_j == 5).any(axis=1)] = np.inf  # copy j lacks this consensus interval
        mism[j] = mm
    return mism


def _choose_copies(
    rng: np.random.Generator, mism: np.ndarray, rows: np.ndarray, k_of: np.ndarray
) -> np.ndarray:
    """The copy each read is placed at: pairs with both mates in the same copy go to the
    copy with the fewest mismatches over both mates (random tie-break); others stay."""
    pos_in = {int(r): t for t, r in enumerate(rows.tolist())}
    chosen = k_of.copy()
    for t, r in enumerate(rows.tolist()):
        if r % 2:
            continue
        t2 = pos_in.get(r + 1)
        if t2 is None or k_of[t2] != k_of[t]:
            continue
        score = mism[:, t] + mism[:, t2] + rng.random(mism.shape[0]) * 0.5  # random tie-break
        j = int(np.argmin(score))
        chosen[t] = chosen[t2] = j
    return chosen


def _mapq(mism: np.ndarray, chosen: np.ndarray, rl: int) -> np.ndarray:
    """BWA-MEM-like MAPQ per mate: ~5 per mismatch between the chosen and the next best copy
    (60 without a second copy, 0 when another copy matches as well)."""
    cols = np.arange(chosen.size)
    own = mism[chosen, cols]
    others = mism.copy()
    others[chosen, cols] = np.inf
    second = others.min(axis=0)
    delta = second - own
    score1 = rl - 5.0 * own
    mapq = np.where(
        np.isinf(second),
        60.0,
        30.0 * (1.0 - (rl - 5.0 * second) / np.maximum(score1, 1.0)) * math.log(rl),
    )
    mapq = np.where(delta <= 0, 0.0, mapq)
    return np.clip(np.rint(mapq), 0, 60).astype(np.int16)


def _move(
    reads: _Reads,
    r: int,
    cj: _Copy,
    seq_c: np.ndarray,
    minus: bool,
    cstart: int,
    names: list[str],
) -> None:
    """Put read ``r`` (bases ``seq_c`` in consensus orientation from consensus column
    ``cstart``; its copy is on the minus strand if ``minus``) at the same interval of ``cj``."""
    rl = reads.seq.shape[1]
    q = reads.qual[r]
    q_c = q[::-1] if minus else q
    rev_c = bool(reads.reverse[r]) ^ minus
    off = cstart - cj.cons_start
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


def _pair_fields(reads: _Reads) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(SAM flag, TLEN, write order) of every read; the order is coordinate-sorted and holds
    only pairs whose mates both align."""
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
    return flag, tlen, order[keep[order]]


def _write_bam(path: Path, reads: _Reads, seqs: dict[str, np.ndarray], progress: bool) -> int:
    """Coordinate-sorted, indexed BAM of the reads; returns how many were written."""
    names = list(seqs)
    header = {
        "HD": {"VN": "1.6", "SO": "coordinate"},
        "SQ": [{"SN": c, "LN": int(s.size)} for c, s in seqs.items()],
        "RG": [{"ID": "sim", "SM": SAMPLE, "PL": "ILLUMINA", "LB": "sim"}],
        "PG": [{"ID": "dvprobe-simulate", "PN": "dvprobe simulate"}],
    }
    flag, tlen, order = _pair_fields(reads)
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


def _rmsk_rows(copies: list[_Copy], low: list[_Simple], cons_len: dict[str, int]) -> list:
    """(chrom, start, end, strand, name, class, family, (repStart, repEnd, repLeft), milliDiv)
    of the LINE copies and simple repeats; the repeat coordinates follow UCSC's strand rule."""
    rows = []
    for c in copies:
        if not c.family.startswith("L1"):
            continue
        L = cons_len[c.family]
        if c.strand == "+":
            rep = (c.cons_start + 1, c.cons_end, -(L - c.cons_end))
        else:
            rep = (-(L - c.cons_end), c.cons_end, c.cons_start + 1)
        div = int(c.divergence * 1000)
        rows.append((c.chrom, c.start, c.end, c.strand, c.family, "LINE", "L1", rep, div))
    for chrom, s, e, name, cls, fam, _unit in low:
        rows.append((chrom, s, e, "+", name, cls, fam, (1, e - s, 0), 0))
    return rows


def _write_rmsk(
    path: Path,
    copies: list[_Copy],
    low: list[_Simple],
    cons_len: dict[str, int],
    seqs: dict[str, np.ndarray],
) -> None:
    """UCSC rmsk.txt (17 tab-separated columns, no header, 0-based half-open)."""
    order = list(seqs)
    rows = _rmsk_rows(copies, low, cons_len)
    rows.sort(key=lambda r: (order.index(r[0]), r[1]))
    with open(path, "w") as fh:
        for k, (chrom, s, e, strand, name, cls, fam, rep, mdiv) in enumerate(rows):
            left = -(seqs[chrom].size - e)
            sw = max(1, int((e - s) * (1 - mdiv / 1000) * 2))
            cols = [_ucsc_bin(s, e), sw, mdiv, 0, 0, chrom, s, e, left, strand, name, cls, fam,
                    rep[0], rep[1], rep[2], k + 1]
            fh.write("\t".join(str(x) for x in cols) + "\n")


# ----------------------------------------------------------------------------- API


def simulate(config: SimulationConfig, *, progress: bool = True) -> dict[str, Path]:
    """Simulate a sample with planted concepts into directory ``config.out``.

    Returns the written files by role (``reference``, ``bam``, ``truth_vcf``,
    ``mosaic_vcf``, ``rmsk``, ``lowmappability``, ``segdup``, ``lowcomplexity``,
    ``line_bed``, ``cnv_gain``, ``manifest``). Same config -> identical files (the BAM
    byte-for-byte up to the pysam/htslib version in its header). Files of an earlier
    simulation in ``out`` are replaced only with ``config.overwrite``.

    The stages, in the order they draw from the one seeded generator: the genome with its
    repeats, the variants, the reads, the multi-mapping model; then the files.
    """
    files = _prepare_out(config)
    rng = np.random.default_rng(config.seed)
    genome = _build_genome(rng, config)
    variants, mosaics = _plant_variants(rng, genome, config)
    reads = _generate_reads(rng, genome, variants, mosaics, config)
    _multimap(rng, reads, genome)
    _write_fasta(files["reference"], genome.seqs)
    n_written = _write_bam(files["bam"], reads, genome.seqs, progress)
    _write_annotations(files, genome, variants, mosaics)
    manifest = _manifest(config, files, genome, variants, mosaics, reads, n_written)
    files["manifest"].write_text(json.dumps(manifest, indent=1) + "\n")
    return files


def _prepare_out(config: SimulationConfig) -> dict[str, Path]:
    """Create ``out`` (refusing a file, or an earlier simulation without ``overwrite``) and
    return the paths to write, by role."""
    out = config.out
    if out.exists() and not out.is_dir():
        raise SimulationError(f"--out {out} is a file; give a directory")
    present = sorted(name for name in SIM_FILES.values() if (out / name).exists())
    if present and not config.overwrite:
        raise SimulationError(
            f"{out}: already holds {', '.join(present)} (an earlier simulation?); "
            "give a new directory or --overwrite to replace them"
        )
    out.mkdir(parents=True, exist_ok=True)
    return {role: out / name for role, name in SIM_FILES.items()}


def _write_annotations(
    files: dict[str, Path], genome: _Genome, variants: list[_Variant], mosaics: list[_Mosaic]
) -> None:
    """The truth VCFs, rmsk and the stratification BEDs."""
    seqs, copies, order = genome.seqs, genome.copies, list(genome.seqs)
    _write_vcf(files["truth_vcf"], seqs, variants, mosaic=False)
    _write_vcf(files["mosaic_vcf"], seqs, mosaics, mosaic=True)
    _write_rmsk(files["rmsk"], copies, genome.low, genome.cons_len, seqs)
    lowmap = _low_mappability(seqs, genome.families, genome.cons_len)
    _write_bed(files["lowmappability"], lowmap, order, merge=True)
    segdups = [(c.chrom, c.start, c.end, f"{c.family}_{c.index}")
               for c in copies if c.family.startswith("SegDup")]
    _write_bed(files["segdup"], segdups, order)
    _write_bed(files["lowcomplexity"], [(c, s, e, n) for c, s, e, n, *_ in genome.low], order)
    lines = [(c.chrom, c.start, c.end, f"{c.family}#{c.index}", 0, c.strand)
             for c in copies if c.family.startswith("L1")]
    _write_bed(files["line_bed"], lines, order)
    _write_bed(files["cnv_gain"], [(c, s, e, "CN3") for c, s, e in genome.cnv], order)


def _manifest(
    config: SimulationConfig,
    files: dict[str, Path],
    genome: _Genome,
    variants: list[_Variant],
    mosaics: list[_Mosaic],
    reads: _Reads,
    n_written: int,
) -> dict:
    """``truth.json``: parameters, contigs, files by role, counts and every planted copy."""
    kinds: dict[str, int] = {}
    for v in variants:
        kinds[v.kind] = kinds.get(v.kind, 0) + 1
    copies = genome.copies
    return {
        "format": SIM_FORMAT,
        "version": 1,
        "sample": SAMPLE,
        "params": config.params(),
        "contigs": {c: int(s.size) for c, s in genome.seqs.items()},
        "files": {k: p.name for k, p in files.items()},
        "counts": {
            "reads": n_written,
            "misplaced_reads": int(reads.moved.sum()),
            "germline_variants": len(variants),
            "germline_by_kind": kinds,
            "mosaic_snvs": len(mosaics),
            "line_copies": sum(c.family.startswith("L1") for c in copies),
            "low_complexity": len(genome.low),
        },
        "repeat_copies": [_copy_record(c) for c in copies],
        "cnv_gain": [{"chrom": c, "start": s, "end": e, "copy_number": 3}
                     for c, s, e in genome.cnv],
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


def _copy_record(c: _Copy) -> dict:
    return {
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


def simulation_summary(files: dict[str, Path]) -> str:
    """What a simulation wrote, in a few lines (the ``dvprobe simulate`` output)."""
    counts = json.loads(files["manifest"].read_text())["counts"]
    out = files["manifest"].parent
    lines = [
        f"simulated {counts['reads']} reads ({counts['misplaced_reads']} misplaced in "
        f"repeats), {counts['germline_variants']} germline variants, "
        f"{counts['mosaic_snvs']} mosaic SNVs, {counts['line_copies']} LINE copies "
        f"-> {out}"
    ]
    lines += [f"  {role:15s} {p}" for role, p in files.items()]
    return "\n".join(lines)


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
