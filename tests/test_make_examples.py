"""Pixel-exact checks of the pysam pileup encoder on hand-built reads, labels, multi-allelic
examples, sharding and round trip through ``probing.examples.read_examples``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pysam
import pytest

from probing import channels as C
from probing.examples import read_example_info, read_examples
from probing.make_examples import (
    MakeExamplesConfig,
    MakeExamplesError,
    PileupEncoder,
    Site,
    TruthLabeler,
    alt_subsets,
    make_examples,
)

REF_LEN = 400
SITE = 200  # 0-based SNV position; column 110
W0 = SITE - 110  # reference position of column 0
CH = {ch: i for i, ch in enumerate(C.WGS_CHANNELS)}
COLOR = C.BASE_COLOR


def _ref_seq() -> str:
    rng = np.random.default_rng(3)
    s = list("".join("ACGT"[i] for i in rng.integers(0, 4, REF_LEN)))
    s[SITE] = "C"
    s[300] = "A"
    return "".join(s)


REF = _ref_seq()
SNV_ALT = "T"
MULTI = 300  # multi-allelic site A -> G,T


def _read(header, name, start, cigar, seq, quals, mapq=60, reverse=False, tlen=0, read2=False):
    a = pysam.AlignedSegment(header)
    a.query_name = name
    a.flag = (16 if reverse else 0) | ((1 | 128) if read2 else (1 if tlen else 0))
    a.reference_id = 0
    a.reference_start = start
    a.cigarstring = cigar
    a.query_sequence = seq
    a.query_qualities = pysam.qualitystring_to_array("".join(chr(33 + q) for q in quals))
    a.mapping_quality = mapq
    a.template_length = tlen
    if tlen:
        a.next_reference_id = 0
        a.next_reference_start = start
    return a


def _ref_slice(a: int, b: int) -> str:
    return REF[a:b]


def _with(seq: str, pos: int, base: str) -> str:
    return seq[:pos] + base + seq[pos + 1 :]


def _write_bam(path: Path, reads_fn) -> Path:
    header = pysam.AlignmentHeader.from_dict(
        {"HD": {"VN": "1.6", "SO": "unsorted"}, "SQ": [{"SN": "c1", "LN": REF_LEN}]}
    )
    unsorted = path.with_suffix(".unsorted.bam")
    with pysam.AlignmentFile(str(unsorted), "wb", header=header) as out:
        for r in reads_fn(header):
            out.write(r)
    pysam.sort("-o", str(path), str(unsorted))
    pysam.index(str(path))
    return path


def _fasta(tmp: Path) -> Path:
    fa = tmp / "ref.fa"
    fa.write_text(">c1\n" + "\n".join(REF[i : i + 60] for i in range(0, REF_LEN, 60)) + "\n")
    pysam.faidx(str(fa))
    return fa


# Hand-built reads around SITE (see the expected pixels in the tests).
Q1 = [(i * 7) % 45 + 10 for i in range(50)]  # includes values above the cap 40


def _hand_reads(header):
    # q1: forward, MAPQ 60, 50M at 180, alt base at SITE, TLEN 300.
    s1 = _with(_ref_slice(180, 230), SITE - 180, SNV_ALT)
    yield _read(header, "q1", 180, "50M", s1, Q1, mapq=60, tlen=300)
    # q0: same start as q1, sorts first by name; ref at SITE.
    yield _read(header, "q0", 180, "30M", _ref_slice(180, 210), [30] * 30, mapq=45, tlen=-420)
    # q2: reverse, MAPQ 30, 5S20M2I28M at 190, TLEN -250.
    s2 = "GGGGG" + _ref_slice(190, 210) + "TT" + _ref_slice(210, 238)
    q2 = [20] * 5 + [25] * 20 + [12, 33] + [35] * 28
    yield _read(header, "q2", 190, "5S20M2I28M", s2, q2, mapq=30, reverse=True, tlen=-250)
    # q3: deletion of SITE..SITE+2 (15M3D20M at 185), unpaired (TLEN 0).
    s3 = _ref_slice(185, 200) + _ref_slice(203, 223)
    yield _read(header, "q3", 185, "15M3D20M", s3, [38] * 35, mapq=60)
    # q7: ends at 197, inside the 5 bp overlap buffer -> kept.
    yield _read(header, "q7", 170, "27M", _ref_slice(170, 197), [30] * 27, mapq=60)
    # Filtered: MAPQ 5; BQ 5 at SITE; ends before the buffer; secondary; duplicate.
    yield _read(header, "f1", 181, "40M", _ref_slice(181, 221), [30] * 40, mapq=5)
    qlow = [30] * 40
    qlow[SITE - 182] = 5
    yield _read(header, "f2", 182, "40M", _with(_ref_slice(182, 222), SITE - 182, SNV_ALT), qlow)
    yield _read(header, "f3", 150, "40M", _ref_slice(150, 190), [30] * 40)
    sec = _read(header, "f4", 183, "40M", _ref_slice(183, 223), [30] * 40)
    sec.flag |= 0x100
    yield sec
    dup = _read(header, "f5", 184, "40M", _ref_slice(184, 224), [30] * 40)
    dup.flag |= 0x400
    yield dup
    # Multi-allelic site at 300 (ref A): two G reads, two T reads, one ref read.
    for i, b in enumerate("GGTTA"):
        yield _read(
            header,
            f"m{i}",
            280 + i,
            "40M",
            _with(_ref_slice(280 + i, 320 + i), 20 - i, b),
            [30] * 40,
            mapq=60,
        )


@pytest.fixture(scope="module")
def hand(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hand")
    return _fasta(tmp), _write_bam(tmp / "reads.bam", _hand_reads), tmp


def _encoder(hand) -> PileupEncoder:
    fa, bam, _ = hand
    return PileupEncoder(pysam.FastaFile(str(fa)), pysam.AlignmentFile(str(bam)))


def test_reference_band_and_geometry(hand):
    ((subset, img),) = _encoder(hand).encode_site(Site("c1", SITE, SITE + 1, "C", (SNV_ALT,)))
    assert subset == (0,) and img.shape == (100, 221, 7) and img.dtype == np.uint8
    colors = np.array([COLOR[b] for b in REF[W0 : W0 + 221]], dtype=np.uint8)
    for r in range(5):
        assert (img[r, :, CH[1]] == colors).all()
        assert (img[r, :, CH[2]] == 254).all() and (img[r, :, CH[3]] == 254).all()
        assert (img[r, :, CH[4]] == 70).all() and (img[r, :, CH[5]] == 152).all()
        assert (img[r, :, CH[6]] == 50).all() and (img[r, :, CH[19]] == 254).all()
    assert img[5 + 5 :].max() == 0  # 5 usable reads -> rows 5..9, the rest empty
    assert img[5 + 4].max() > 0


def test_read_rows_exact_pixels(hand):
    ((_, img),) = _encoder(hand).encode_site(Site("c1", SITE, SITE + 1, "C", (SNV_ALT,)))
    # Sorted by start, then name: q7(170), q0(180), q1(180), q3(185), q2(190).
    q7, q0, q1, q3, q2 = (img[5 + i] for i in range(5))
    # q7: columns 80..106, everything else empty.
    assert (q7[80:107, CH[4]] == 70).all() and q7[:80].max() == 0 and q7[107:].max() == 0
    assert (q7[80:107, CH[3]] == 254).all() and (q7[80:107, CH[19]] == 0).all()
    # q0: MAPQ 45 -> int(254*45/60) = 190; TLEN -420 -> 106.
    assert (q0[90:120, CH[3]] == 190).all() and (q0[90:120, CH[19]] == 106).all()
    # q1: columns 90..139, bases/BQ per position, alt at column 110.
    cols = slice(90, 140)
    seq = _with(REF[180:230], SITE - 180, SNV_ALT)
    assert (q1[cols, CH[1]] == [COLOR[b] for b in seq]).all()
    assert (q1[cols, CH[2]] == [254 * min(q, 40) // 40 for q in Q1]).all()
    assert (q1[cols, CH[3]] == 254).all() and (q1[cols, CH[4]] == 70).all()
    assert (q1[cols, CH[19]] == 254 * 300 // 1000).all()
    assert (q1[cols, CH[5]] == 254).all()  # carries the alt -> supports on every column
    differs = np.full(50, 50)
    differs[SITE - 180] = 254
    assert (q1[cols, CH[6]] == differs).all()
    assert q1[:90].max() == 0 and q1[140:].max() == 0
    # q2 (reverse): soft clip (cols 95..99) not drawn; 20M at cols 100..119; insertion
    # anchor '*' at col 119 with BQ of the first inserted base (12); 28M at cols 120..147.
    assert q2[:100].max() == 0 and q2[148:].max() == 0
    assert (q2[100:148, CH[4]] == 240).all() and (q2[100:148, CH[3]] == 127).all()
    assert (q2[100:148, CH[19]] == 254 * 250 // 1000).all()
    assert (q2[100:148, CH[5]] == 152).all()  # reads the reference at SITE
    assert q2[119, CH[1]] == 0 and q2[119, CH[6]] == 254 and q2[119, CH[2]] == 254 * 12 // 40
    assert (q2[100:119, CH[2]] == 254 * 25 // 40).all()
    assert (q2[120:148, CH[2]] == 254 * 35 // 40).all()
    assert (q2[100:119, CH[6]] == 50).all() and (q2[120:148, CH[6]] == 50).all()
    assert (q2[120:148, CH[1]] == [COLOR[b] for b in REF[210:238]]).all()
    # q3: 15M at cols 95..109 with '*' anchor at 109; deleted cols 110..112 empty; 20M at
    # cols 113..132; TLEN 0 -> insert size 0.
    assert q3[109, CH[1]] == 0 and q3[109, CH[6]] == 254 and q3[109, CH[2]] == 254 * 38 // 40
    assert q3[110:113].max() == 0
    assert (q3[113:133, CH[1]] == [COLOR[b] for b in REF[203:223]]).all()
    assert (q3[95:109, CH[6]] == 50).all() and (q3[95:133, CH[19]] == 0).sum() == 35 + 3
    assert (q3[95:109, CH[5]] == 152).all()


def test_multiallelic_examples_and_support(hand):
    site = Site("c1", MULTI, MULTI + 1, "A", ("G", "T"))
    out = _encoder(hand).encode_site(site)
    assert [s for s, _ in out] == [(0,), (1,), (0, 1)] == alt_subsets(2)
    assert len(alt_subsets(3)) == 3 + 3 and len(alt_subsets(3, het_alt_images=False)) == 3
    support = {s: img[5:10, MULTI - 190, CH[5]].tolist() for s, img in out}
    # Rows m0..m4 (sorted by start): bases G, G, T, T, A.
    assert support[(0,)] == [254, 254, 152, 152, 152]
    assert support[(1,)] == [152, 152, 254, 254, 152]
    assert support[(0, 1)] == [254, 254, 254, 254, 152]
    # Only channel 5 differs between the subset images.
    a, b = out[0][1].astype(int), out[1][1].astype(int)
    diff = np.flatnonzero((a != b).any(axis=(0, 1)))
    assert diff.tolist() == [CH[5]]


def test_subsample_caps_rows(tmp_path):
    def many(header):
        for i in range(130):
            yield _read(
                header,
                f"r{i:03d}",
                150 + (i % 40),
                "60M",
                _ref_slice(150 + (i % 40), 210 + (i % 40)),
                [30] * 60,
            )

    bam = _write_bam(tmp_path / "many.bam", many)
    enc = PileupEncoder(pysam.FastaFile(str(_fasta(tmp_path))), pysam.AlignmentFile(str(bam)))
    site = Site("c1", SITE, SITE + 1, "C", ("T",))
    ((_, img),) = enc.encode_site(site)
    ((_, img2),) = enc.encode_site(site)
    assert (img[5:, 110, CH[4]] > 0).sum() == 95  # all rows used, no more
    assert (img == img2).all()  # seeded
    starts = [int(np.flatnonzero(img[r, :, CH[4]])[0]) for r in range(5, 100)]
    assert starts == sorted(starts)


def test_labels_from_truth(tmp_path):
    vcf = tmp_path / "truth.vcf"
    vcf.write_text(
        "##fileformat=VCFv4.2\n##contig=<ID=c1,length=400>\n"
        '##FORMAT=<ID=GT,Number=1,Type=String,Description="GT">\n'
        "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\tS\n"
        f"c1\t{SITE + 1}\t.\tC\tT\t.\tPASS\t.\tGT\t0|1\n"
        f"c1\t{MULTI + 1}\t.\tA\tG,T\t.\tPASS\t.\tGT\t1/2\n"
        "c1\t51\t.\tAT\tA\t.\tPASS\t.\tGT\t1/1\n"
    )
    lab = TruthLabeler([vcf])
    assert lab.label(Site("c1", SITE, SITE + 1, "C", ("T",)), (0,)) == 1
    assert lab.label(Site("c1", SITE, SITE + 1, "C", ("G",)), (0,)) == 0
    m = Site("c1", MULTI, MULTI + 1, "A", ("G", "T"))
    assert [lab.label(m, s) for s in alt_subsets(2)] == [1, 1, 2]
    # Same deletion written on a longer reference span; a different deletion is not it.
    assert lab.label(Site("c1", 50, 53, "ATT", ("AT", "A")), (0,)) == 2
    assert lab.label(Site("c1", 50, 53, "ATT", ("AT", "A")), (1,)) == 0
    assert lab.label(Site("c1", 120, 121, "G", ("A",)), (0,)) == 0  # no truth -> hom-ref


def test_truth_contigs_named_without_chr_are_matched_and_unplaceable_ones_refused(tmp_path):
    """A truth VCF naming chr20 as 20 must not silently label every example hom-ref."""
    def truth(name: str, contig: str) -> Path:
        vcf = tmp_path / name
        vcf.write_text(
            f"##fileformat=VCFv4.2\n##contig=<ID={contig},length=400>\n"
            '##FORMAT=<ID=GT,Number=1,Type=String,Description="GT">\n'
            "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\tS\n"
            f"{contig}\t{SITE + 1}\t.\tC\tT\t.\tPASS\t.\tGT\t0|1\n")
        return vcf

    site = Site("chr1", SITE, SITE + 1, "C", ("T",))
    assert TruthLabeler([truth("bare.vcf", "1")], ["chr1"]).label(site, (0,)) == 1
    assert TruthLabeler([truth("chr.vcf", "chr1")], ["chr1"]).label(site, (0,)) == 1
    with pytest.raises(MakeExamplesError, match="no truth record is on a contig of the "
                                                "reference.*labelled hom-ref"):
        TruthLabeler([truth("other.vcf", "chrUn")], ["chr1"])


def test_make_examples_roundtrip_shards_and_info(hand, tmp_path):
    fa, bam, _ = hand
    sites = tmp_path / "sites.vcf"
    sites.write_text(
        "##fileformat=VCFv4.2\n##contig=<ID=c1,length=400>\n"
        '##FORMAT=<ID=GT,Number=1,Type=String,Description="GT">\n'
        "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\tS\n"
        f"c1\t{SITE + 1}\t.\tC\tT\t.\tPASS\t.\tGT\t0/1\n"
        f"c1\t{MULTI + 1}\t.\tA\tG,T\t.\tPASS\t.\tGT\t1/2\n"
    )
    config = MakeExamplesConfig(fa, bam, tmp_path / "ex.tfrecord@2.gz", sites=sites, truth=sites)
    res = make_examples(config, progress=False)
    assert res.n_sites == 2 and res.n_examples == 1 + 3 and len(res.shards) == 2
    assert [p.name for p in res.shards] == [
        "ex.tfrecord-00000-of-00002.gz",
        "ex.tfrecord-00001-of-00002.gz",
    ]
    for p in res.shards:
        assert p.read_bytes()[:2] == b"\x1f\x8b"
        info = json.loads(Path(str(p) + ".example_info.json").read_text())
        assert info["shape"] == [100, 221, 7] and info["channels"] == [1, 2, 3, 4, 5, 6, 19]
    assert read_example_info(res.spec)["shape"] == [100, 221, 7]
    exs = list(read_examples(str(tmp_path / "ex.tfrecord@2.gz")))
    assert [(e.start, e.alt_allele_indices, e.label) for e in exs] == [
        (SITE, (0,), 1),
        (MULTI, (0,), 1),
        (MULTI, (1,), 1),
        (MULTI, (0, 1), 2),
    ]
    e0 = exs[0]
    assert e0.image.shape == (100, 221, 7) and e0.chrom == "c1" and e0.ref == "C"
    assert e0.alts == ("T",) and e0.variant_type == 1 and e0.locus == f"c1:{SITE + 1}-{SITE + 1}"
    direct = _encoder(hand).encode_site(Site("c1", SITE, SITE + 1, "C", ("T",)))[0][1]
    assert (e0.image == direct).all()


def test_candidates_mode(hand, tmp_path):
    fa, bam, _ = hand
    res = make_examples(
        MakeExamplesConfig(fa, bam, tmp_path / "c.tfrecord.gz", candidates=True), progress=False
    )
    exs = list(read_examples(res.shards[0]))
    found = {(e.start, e.ref, e.alts) for e in exs}
    # SITE: 1 alt read of 5 usable -> not enough reads (min_count 2); the multi site is found
    # with both alts, most frequent first (ties by insertion order).
    assert (MULTI, "A", ("G", "T")) in found or (MULTI, "A", ("T", "G")) in found
    assert not any(s == SITE for s, _, _ in found)
    res2 = make_examples(
        MakeExamplesConfig(fa, bam, tmp_path / "r.tfrecord.gz", candidates=True,
                           ref_sites_fraction=0.5),
        progress=False,
    )
    srcs = res2.by_source
    assert srcs["refsite"] > 20 and srcs["candidate"] == res.n_sites


def test_on_simulated_sample(tmp_path):
    from probing.simulate import SimulationConfig, simulate

    config = SimulationConfig(
        tmp_path / "sim",
        seed=1,
        length=40_000,
        n_line_families=1,
        line_copies=3,
        line_length=2500,
        segdup_length=0,
        cnv_length=0,
        n_homopolymers=2,
        n_strs=4,
        n_low_complexity=1,
        n_mosaic=3,
    )
    sim = simulate(config, progress=False)
    res = make_examples(
        MakeExamplesConfig(
            sim["reference"],
            sim["bam"],
            tmp_path / "s.tfrecord.gz",
            sites=sim["truth_vcf"],
            truth=sim["truth_vcf"],
        ),
        progress=False,
    )
    n_alts = [len(r.alts) for r in pysam.VariantFile(str(sim["truth_vcf"]))]
    assert res.n_examples == sum(n + n * (n - 1) // 2 for n in n_alts)
    assert 0 not in res.labels  # every truth variant is a positive example
    exs = list(read_examples(res.shards[0]))
    assert {e.variant_type for e in exs} == {1, 2}


def test_user_errors(hand, tmp_path):
    fa, bam, _ = hand
    unindexed = tmp_path / "noindex.bam"
    unindexed.write_bytes(Path(bam).read_bytes())
    with pytest.raises(MakeExamplesError, match="no index"):
        make_examples(MakeExamplesConfig(fa, unindexed, tmp_path / "x.gz", candidates=True),
                      progress=False)
    bad = tmp_path / "bad.vcf"
    bad.write_text(
        "##fileformat=VCFv4.2\n##contig=<ID=c9,length=10>\n"
        "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n"
        "c9\t5\t.\tA\tC\t.\t.\t.\n"
    )
    with pytest.raises(MakeExamplesError, match="record 0.*c9"):
        make_examples(MakeExamplesConfig(fa, bam, tmp_path / "x.gz", sites=bad), progress=False)
    assert not (tmp_path / "x.gz").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "give --sites VCF|BED or --candidates"),
        ({"sites": "s.vcf.gz", "candidates": True}, "--sites VCF and --candidates are exclusive"),
        ({"candidates": True, "ref_sites_fraction": 1.5}, "0 <= ref_sites_fraction <= 1"),
        ({"candidates": True, "min_fraction": 0}, "0 < min_fraction <= 1"),
        ({"candidates": True, "min_count": 0}, "min_count >= 1"),
        ({"candidates": True, "width": 220}, "--width must be odd and >= 3, got 220"),
        ({"candidates": True, "height": 5}, "--height must exceed 5, got 5"),
        ({"candidates": True, "channels": (1, 2, 9)}, r"channels \[9\] not supported"),
        ({"candidates": True, "compress_level": 10}, "compress_level must be 0..9, got 10"),
    ],
)
def test_config_refuses_bad_options_when_built(options, message):
    # no file is opened: these paths need not exist
    with pytest.raises(MakeExamplesError, match=message):
        MakeExamplesConfig("ref.fa", "reads.bam", "out.tfrecord.gz", **options)


def test_config_takes_one_truth_or_several():
    one = MakeExamplesConfig("r.fa", "r.bam", "o.gz", candidates=True, truth="t.vcf.gz")
    two = MakeExamplesConfig("r.fa", "r.bam", "o.gz", candidates=True,
                             truth=[Path("g.vcf.gz"), "m.vcf.gz"])
    none = MakeExamplesConfig("r.fa", "r.bam", "o.gz", candidates=True)
    assert one.truth == ("t.vcf.gz",) and two.truth == (Path("g.vcf.gz"), "m.vcf.gz")
    assert none.truth == () and one.shape == (100, 221, 7)
    with pytest.raises(MakeExamplesError, match="--sites"):
        dataclasses.replace(none, candidates=False)


def test_bed_sites_and_regions_limit_the_candidate_scan(hand, tmp_path):
    fa, bam, _ = hand
    bed = tmp_path / "multi.bed"
    bed.write_text(f"c1\t{MULTI - 5}\t{MULTI + 5}\n")
    by_bed = make_examples(MakeExamplesConfig(fa, bam, tmp_path / "b.gz", sites=bed),
                           progress=False)
    by_regions = make_examples(
        MakeExamplesConfig(fa, bam, tmp_path / "r.gz", candidates=True,
                           regions=[("c1", MULTI - 5, MULTI + 5)]),
        progress=False,
    )
    for res in (by_bed, by_regions):
        assert {e.start for e in read_examples(res.shards[0])} == {MULTI}
    with pytest.raises(MakeExamplesError, match="no sites to make examples for"):
        make_examples(MakeExamplesConfig(fa, bam, tmp_path / "n.gz", candidates=True,
                                         regions=[("c1", 10, 20)]), progress=False)


def test_block_cache_matches_fresh_fetch(hand):
    fa, bam, _ = hand
    sites = [
        Site("c1", p, p + 1, REF[p], ("T" if REF[p] != "T" else "A",))
        for p in (SITE, 150, 205, MULTI, 310)
    ]
    big = _encoder(hand)
    tiny = PileupEncoder(pysam.FastaFile(str(fa)), pysam.AlignmentFile(str(bam)), block_size=1)
    for s in sites:
        ((_, a),) = big.encode_site(s)
        ((_, b),) = tiny.encode_site(s)
        assert (a == b).all(), s


def test_cli_commands(hand, tmp_path):
    import typer
    from typer.testing import CliRunner

    from dvtorch.errors import DvprobeError
    from probing.commands_sim import register

    app = typer.Typer()
    register(app)
    fa, bam, _ = hand
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "make-examples",
            "--ref",
            str(fa),
            "--reads",
            str(bam),
            "--candidates",
            "--out",
            str(tmp_path / "e@2.gz"),
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "in 2 shard(s)" in res.output
    assert len(list(read_examples(str(tmp_path / "e@2.gz")))) >= 3
    # the same --out again (it could be a DeepVariant run's examples) is refused up front
    args = ["make-examples", "--ref", str(fa), "--reads", str(bam), "--candidates", "--quiet",
            "--ref-sites-fraction", "0.5", "--out", str(tmp_path / "e@2.gz")]
    before = [p.read_bytes() for p in sorted(tmp_path.glob("e-0000*-of-00002.gz"))]
    res = runner.invoke(app, args)
    assert isinstance(res.exception, DvprobeError), res.output
    assert "e-00000-of-00002.gz and 1 more shards already exist" in str(res.exception)
    assert "--overwrite" in str(res.exception)
    assert [p.read_bytes() for p in sorted(tmp_path.glob("e-0000*-of-00002.gz"))] == before
    res = runner.invoke(app, [*args, "--overwrite"])
    assert res.exit_code == 0, res.output
    assert [p.read_bytes() for p in sorted(tmp_path.glob("e-0000*-of-00002.gz"))] != before
    res = runner.invoke(
        app,
        ["make-examples", "--ref", str(fa), "--reads", str(bam), "--out", str(tmp_path / "x.gz")],
    )
    assert isinstance(res.exception, DvprobeError)
    res = runner.invoke(app, ["simulate", "--out", str(tmp_path / "s"), "--mosaic-vaf", "x"])
    assert isinstance(res.exception, DvprobeError) and "mosaic-vaf" in str(res.exception)
