"""``--regions``: which examples an extraction keeps, by the span of their variant."""

from __future__ import annotations

import numpy as np
import pytest

from probing.examples import encode_example
from probing.regions import RegionError, parse_regions


def test_a_region_is_1_based_inclusive_and_a_variant_is_in_it_when_its_span_overlaps():
    r = parse_regions(["chr20:1,001-2,000"])  # 0-based [1000, 2000)
    assert r.overlaps("chr20", 1000, 1001) and r.overlaps("chr20", 1999, 2000)
    assert not r.overlaps("chr20", 999, 1000) and not r.overlaps("chr20", 2000, 2001)
    assert r.overlaps("chr20", 995, 1003)  # a deletion starting before the region
    assert not r.overlaps("chr21", 1500, 1501)


def test_contigs_match_in_either_naming_and_a_bare_contig_is_all_of_it(tmp_path):
    bed = tmp_path / "r.bed"
    bed.write_text("20\t100\t200\n20\t150\t300\nchrX\t0\t10\n")
    r = parse_regions([str(bed), "chr21", "MT:5-6"])
    assert r.overlaps("chr20", 250, 251) and r.overlaps("20", 100, 101)
    assert not r.overlaps("chr20", 300, 301)  # 100-200 and 150-300 merged, end exclusive
    assert r.overlaps("21", 10**9, 10**9 + 1) and r.overlaps("chrM", 4, 5)
    assert r.overlaps("X", 9, 10) and not r.overlaps("X", 10, 11)
    assert r.n_intervals == 4


def test_the_same_bases_spelled_otherwise_are_the_same_selection(tmp_path):
    bed = tmp_path / "r.bed"
    bed.write_text("chr20\t999\t2000\nchr20\t1500\t1800\n")
    assert parse_regions([str(bed)]).to_json() == parse_regions(["chr20:1000-2000"]).to_json()
    assert parse_regions(["chr20:1000-2000"]).digest() == parse_regions(["20:1000-2000"]).digest()
    assert parse_regions(["chr20:1000-2000"]).digest() != parse_regions(["chr20:1000-2001"]).digest()


def test_a_record_is_chosen_by_its_variant_and_one_that_does_not_parse_is_kept_to_be_reported():
    img = np.zeros((100, 221, 7), np.uint8)
    record = encode_example(img, chrom="chr20", start=1500, end=1501, ref="A", alts=("G",),
                            alt_allele_indices=(0,))
    assert parse_regions(["chr20:1-2000"]).chooses(record)
    assert not parse_regions(["chr20:1502-3000"]).chooses(record)
    assert parse_regions(["chr21"]).chooses(b"not a tf.Example")


@pytest.mark.parametrize("value, message", [
    ("chr20:5-1", "needs 1 <= start <= end"),
    ("chr20:0-10", "needs 1 <= start <= end"),
    ("chr20:a-b", "neither an existing BED file nor a region"),
    ("missing.bed", "neither an existing BED file nor a region"),
    ("chr 20", "neither an existing BED file nor a region"),
])
def test_what_is_not_a_region_is_refused_saying_what_is(value, message):
    with pytest.raises(RegionError, match=message):
        parse_regions([value])


def test_a_bed_file_without_intervals_or_with_a_bad_line_is_refused(tmp_path):
    empty = tmp_path / "empty.bed"
    empty.write_text("# nothing\n")
    with pytest.raises(RegionError, match="holds no interval"):
        parse_regions([str(empty)])
    bad = tmp_path / "bad.bed"
    bad.write_text("chr20\t10\n")
    with pytest.raises(RegionError, match="bad.bed.*needs chrom, start, end"):
        parse_regions([str(bad)])
