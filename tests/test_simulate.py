"""Invariants of the simulated sample: the planted concepts are really in the BAM."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pysam
import pytest

from probing.simulate import (
    SimulationConfig,
    SimulationError,
    planted_concepts,
    simulate,
    simulation_summary,
)

SMALL = dict(
    seed=7,
    length=90_000,
    coverage=30.0,
    n_line_families=1,
    line_copies=6,
    line_length=3000,
    young_fraction=0.6,
    segdup_length=3000,
    cnv_length=8000,
    n_homopolymers=6,
    n_strs=8,
    n_low_complexity=4,
    n_mosaic=12,
    mosaic_vaf=(0.10, 0.20),
)


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> dict[str, Path]:
    return simulate(SimulationConfig(tmp_path_factory.mktemp("sim"), **SMALL), progress=False)


@pytest.fixture(scope="module")
def manifest(sim) -> dict:
    return json.loads(sim["manifest"].read_text())


def _alt_count(bam: pysam.AlignmentFile, chrom: str, pos: int, alt: str) -> tuple[int, int]:
    """(alt fragments, total fragments) at 0-based ``pos``; a fragment counts once."""
    seen: dict[str, str] = {}
    for col in bam.pileup(
        chrom,
        pos,
        pos + 1,
        truncate=True,
        min_base_quality=0,
        ignore_orphans=False,
        stepper="nofilter",
    ):
        for pr in col.pileups:
            if pr.is_del or pr.is_refskip:
                continue
            seen.setdefault(pr.alignment.query_name, pr.alignment.query_sequence[pr.query_position])
    return sum(b == alt for b in seen.values()), len(seen)


def test_files_valid_and_indexed(sim, manifest):
    fa = pysam.FastaFile(str(sim["reference"]))
    assert dict(zip(fa.references, fa.lengths, strict=True)) == manifest["contigs"]
    assert set(manifest["contigs"]) == {"chr20", "chr21"}
    bam = pysam.AlignmentFile(str(sim["bam"]))
    assert bam.has_index() and bam.header["HD"]["SO"] == "coordinate"
    assert bam.mapped == manifest["counts"]["reads"]
    last = (-1, -1)
    by_name: dict[str, list[pysam.AlignedSegment]] = {}
    for i, r in enumerate(bam.fetch(until_eof=True)):
        key = (r.reference_id, r.reference_start)
        assert key >= last, "BAM not coordinate-sorted"
        last = key
        if i < 4000:
            by_name.setdefault(r.query_name, []).append(r)
        assert r.query_length == 150 and r.is_paired
    pairs = [v for v in by_name.values() if len(v) == 2]
    assert len(pairs) > 500
    for a, b in pairs:
        assert a.next_reference_start == b.reference_start
        assert b.next_reference_start == a.reference_start
        assert a.template_length == -b.template_length != 0
        assert a.is_read1 != b.is_read1 and a.mate_is_reverse == b.is_reverse
    # Indels appear as CIGAR I/D.
    bam = pysam.AlignmentFile(str(sim["bam"]))
    ops = {op for r in bam.fetch(until_eof=True) for op, _ in r.cigartuples}
    assert {0, 1, 2} <= ops
    for key in ("truth_vcf", "mosaic_vcf"):
        vf = pysam.VariantFile(str(sim[key]))
        assert vf.index is not None
        assert list(vf.header.samples) == ["SIM"]
        chrom = next(iter(manifest["contigs"]))
        list(vf.fetch(chrom, 0, 10_000))  # tabix works
    rows = [ln.split("\t") for ln in sim["rmsk"].read_text().splitlines()]
    assert rows and all(len(r) == 17 for r in rows)
    assert {r[11] for r in rows} == {"LINE", "Simple_repeat", "Low_complexity"}
    lines = {(r[5], int(r[6]), int(r[7])) for r in rows if r[11] == "LINE"}
    want = {
        (c["chrom"], c["start"], c["end"])
        for c in manifest["repeat_copies"]
        if c["family"].startswith("L1")
    }
    assert lines == want and all(r[12] == "L1" for r in rows if r[11] == "LINE")
    for bed in ("lowmappability", "segdup", "lowcomplexity", "cnv_gain", "line_bed"):
        recs = [ln.split("\t") for ln in sim[bed].read_text().splitlines()]
        assert recs, bed
        order = list(manifest["contigs"])
        keys = [(order.index(r[0]), int(r[1])) for r in recs]
        assert keys == sorted(keys) and all(int(r[1]) < int(r[2]) for r in recs)


def test_deterministic(sim, manifest, tmp_path):
    (tmp_path / "ref.fa").write_text(">stale\nACGT\n")  # from an earlier run: replaced
    again = simulate(SimulationConfig(tmp_path, overwrite=True, **SMALL), progress=False)
    assert json.loads(again["manifest"].read_text()) == manifest
    assert again["reference"].read_bytes() == sim["reference"].read_bytes()
    a = [str(r) for r in pysam.VariantFile(str(sim["truth_vcf"]))]
    b = [str(r) for r in pysam.VariantFile(str(again["truth_vcf"]))]
    assert a == b


def test_mosaic_vaf_observed_within_binomial_ci(sim):
    bam = pysam.AlignmentFile(str(sim["bam"]))
    obs_total = exp_total = var_total = 0.0
    records = list(pysam.VariantFile(str(sim["mosaic_vcf"])))
    assert len(records) == SMALL["n_mosaic"]
    for rec in records:
        vaf = rec.info["VAF"][0]
        assert 0.10 <= vaf <= 0.20 and rec.samples[0]["GT"] == (0, 1)
        k, n = _alt_count(bam, rec.chrom, rec.start, rec.alts[0])
        assert n > 10
        # Per site: inside a 5-sigma binomial band (12 sites, so no false alarms by chance).
        assert abs(k - n * vaf) <= 5 * math.sqrt(n * vaf * (1 - vaf)) + 1, (rec.pos, k, n, vaf)
        obs_total += k
        exp_total += n * vaf
        var_total += n * vaf * (1 - vaf)
    assert abs(obs_total - exp_total) <= 4 * math.sqrt(var_total) + 2


def test_germline_het_fraction_near_half(sim, manifest):
    bam = pysam.AlignmentFile(str(sim["bam"]))
    avoid = [(c["chrom"], c["start"] - 500, c["end"] + 500) for c in manifest["repeat_copies"]]
    avoid += [(c["chrom"], c["start"] - 500, c["end"] + 500) for c in manifest["cnv_gain"]]
    k_tot = n_tot = 0
    for rec in pysam.VariantFile(str(sim["truth_vcf"])):
        gt = rec.samples[0]["GT"]
        if rec.info["KIND"] != "snv" or sorted(gt) != [0, 1]:
            continue
        if any(c == rec.chrom and s <= rec.start < e for c, s, e in avoid):
            continue
        k, n = _alt_count(bam, rec.chrom, rec.start, rec.alts[0])
        k_tot += k
        n_tot += n
    assert n_tot > 1000
    assert 0.46 <= k_tot / n_tot <= 0.54
    hom = [
        r
        for r in pysam.VariantFile(str(sim["truth_vcf"]))
        if r.samples[0]["GT"] == (1, 1)
        and r.info["KIND"] == "snv"
        and not any(c == r.chrom and s <= r.start < e for c, s, e in avoid)
    ][:10]
    for rec in hom:
        k, n = _alt_count(bam, rec.chrom, rec.start, rec.alts[0])
        assert k >= 0.9 * n


def test_repeat_reads_get_low_mapq_and_misplacement(sim, manifest):
    bam = pysam.AlignmentFile(str(sim["bam"]))
    copies = manifest["repeat_copies"]
    young = {c["copy"] for c in copies if c["family"].startswith("L1") and c["parent"] is not None}
    young |= {
        c["parent"] for c in copies if c["family"].startswith("L1") and c["parent"] is not None
    }
    assert young, "fixture should plant young (near-identical) LINE copies"
    young_mq, old_mq = [], []
    for c in copies:
        if not c["family"].startswith("L1"):
            continue
        mqs = [
            r.mapping_quality
            for r in bam.fetch(c["chrom"], c["start"] + 300, c["end"] - 300)
            if r.reference_start >= c["start"] and r.reference_end <= c["end"]
        ]
        (young_mq if c["copy"] in young else old_mq).extend(mqs)
    assert np.mean(young_mq) < 20 and np.mean(np.array(young_mq) < 10) > 0.4
    if old_mq:
        assert np.mean(old_mq) > np.mean(young_mq) + 15
    # Reads away from every repeat are unique: MAPQ 60.
    feature = [(c["chrom"], c["start"] - 400, c["end"] + 400) for c in copies]
    unique = [
        r.mapping_quality
        for r in bam.fetch("chr20", 0, 40_000)
        if not any(ch == "chr20" and s <= r.reference_start < e for ch, s, e in feature)
    ]
    assert len(unique) > 500 and set(unique) == {60}
    bam = pysam.AlignmentFile(str(sim["bam"]))  # fresh handle: until_eof reads from the start
    moved = [r for r in bam.fetch(until_eof=True) if r.has_tag("ZT")]
    assert moved and manifest["counts"]["misplaced_reads"] == len(moved)
    assert all(r.mapping_quality < 30 for r in moved)
    # The low-mappability BED covers the young copies.
    lowmap = [ln.split("\t") for ln in sim["lowmappability"].read_text().splitlines()]
    covered = 0
    for c in copies:
        if c["family"].startswith("L1") and c["copy"] in young:
            covered += sum(
                max(0, min(int(e), c["end"]) - max(int(s), c["start"]))
                for ch, s, e in lowmap
                if ch == c["chrom"]
            )
    total = sum(
        c["end"] - c["start"] for c in copies if c["family"].startswith("L1") and c["copy"] in young
    )
    assert covered / total > 0.5


def test_cnv_gain_has_one_and_a_half_depth(sim, manifest):
    bam = pysam.AlignmentFile(str(sim["bam"]))
    (cnv,) = manifest["cnv_gain"]
    chrom, s, e = cnv["chrom"], cnv["start"], cnv["end"]
    feats = [(c["chrom"], c["start"], c["end"]) for c in manifest["repeat_copies"]]

    def depth(a: int, b: int) -> float:
        n = sum(1 for r in bam.fetch(chrom, a, b) if a <= r.reference_start < b)
        return n / (b - a)

    inner = depth(s + 500, e - 500)
    flank = []
    for a in range(1000, manifest["contigs"][chrom] - 3000, 2000):
        b = a + 2000
        if b > s - 1000 and a < e + 1000:
            continue
        if any(c == chrom and a < fe + 500 and fs - 500 < b for c, fs, fe in feats):
            continue
        flank.append(depth(a, b))
    ratio = inner / float(np.median(flank))
    assert 1.3 <= ratio <= 1.7, ratio


def test_planted_concepts(sim, tmp_path):
    c = planted_concepts(sim["manifest"].parent)
    assert set(c) == {
        "line",
        "segdup",
        "lowmappability",
        "lowcomplexity",
        "cnv_gain",
        "mosaic",
        "germline",
    }
    assert c["line"] == sim["rmsk"] and c["mosaic"] == sim["mosaic_vcf"]
    assert all(p.exists() for p in c.values())
    with pytest.raises(SimulationError, match="truth.json"):
        planted_concepts(tmp_path)


def test_earlier_simulation_is_not_replaced_without_overwrite(tmp_path):
    (tmp_path / "reads.bam").write_bytes(b"an earlier run's reads")
    (tmp_path / "truth.json").write_text("{}")
    with pytest.raises(SimulationError, match=r"already holds reads\.bam, truth\.json.*--overwrite"):
        simulate(SimulationConfig(tmp_path), progress=False)  # refused before any work
    assert (tmp_path / "reads.bam").read_bytes() == b"an earlier run's reads"
    with pytest.raises(SimulationError, match="is a file"):
        simulate(SimulationConfig(tmp_path / "truth.json"), progress=False)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"length": 1000}, r"--length 1000 is too small \(need >= 20000 bp\)"),
        ({"contigs": ("chr1", "chr1")}, "contig names must be unique"),
        ({"contigs": ()}, "contig names must be unique and non-empty"),
        ({"coverage": 0}, "need coverage > 0"),
        ({"read_length": 20}, "read_length >= 30"),
        ({"insert_mean": 100.0}, "insert_mean >= read_length"),
        ({"mosaic_vaf": (0.3, 0.1)}, r"mosaic_vaf must be 0 <= lo <= hi < 0.5, got \(0.3, 0.1\)"),
        ({"line_divergence": (0.1, 0.6)}, "line_divergence must be 0 <= lo <= hi < 0.5"),
        ({"young_divergence": 0.01}, r"young_divergence must be a pair \(lo, hi\), got 0.01"),
        ({"line_length": 1000}, "line_length must be >= 2000 bp"),
        # a rate of 2 per bp used to loop forever looking for free positions
        ({"snv_rate": 2}, "--snv-rate must be within 0..0.01 per bp"),
        ({"indel_rate": -1e-4}, "--indel-rate must be within 0..0.01 per bp"),
        ({"n_mosaic": -1}, r"must be >= 0, got \{'n_mosaic': -1\}"),
        ({"cnv_length": -5, "n_strs": -1}, r"got \{'n_strs': -1, 'cnv_length': -5\}"),
    ],
)
def test_config_refuses_bad_values_when_built(tmp_path, options, message):
    with pytest.raises(SimulationError, match=message):
        SimulationConfig(tmp_path, **options)
    assert not any(tmp_path.iterdir())  # refused before anything is written


def test_config_is_checked_again_when_replaced(tmp_path):
    config = SimulationConfig(tmp_path, length=50_000)
    with pytest.raises(SimulationError, match="--length 10 is too small"):
        dataclasses.replace(config, length=10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.length = 10  # type: ignore[misc]


def test_manifest_records_every_parameter_but_where_to_write(tmp_path, manifest):
    config = SimulationConfig(tmp_path, **SMALL)
    names = [f.name for f in dataclasses.fields(SimulationConfig)]
    assert list(manifest["params"]) == [n for n in names if n not in ("out", "overwrite")]
    assert manifest["params"] == config.params()
    assert manifest["params"]["contigs"] == ["chr20", "chr21"]
    assert manifest["params"]["mosaic_vaf"] == [0.10, 0.20]


def test_feature_that_does_not_fit_is_refused_with_the_options_to_change(tmp_path):
    with pytest.raises(SimulationError, match="cannot place .* raise --length or lower"):
        simulate(SimulationConfig(tmp_path, length=30_000, n_line_families=3, line_copies=10),
                 progress=False)


def test_summary_names_the_counts_and_every_file(sim, manifest):
    text = simulation_summary(sim)
    counts = manifest["counts"]
    assert text.splitlines()[0].startswith(f"simulated {counts['reads']} reads "
                                           f"({counts['misplaced_reads']} misplaced in repeats)")
    assert f"{counts['mosaic_snvs']} mosaic SNVs" in text
    for role, path in sim.items():
        assert f"  {role:15s} {path}" in text
