"""Annotation against hand-made BED / rmsk / RepeatMasker .out / VCF fixtures.

The fixture examples sit exactly on the coordinate edges where off-by-one errors hide:
BED end is exclusive, VCF POS and .out coordinates are 1-based, a deletion's [pos, end)
spans several bases, and ``--by locus`` widens the query to pos-110 .. pos+110.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pysam
import pytest
import typer
from typer.testing import CliRunner

from probing import annotate as an
from probing.store import LayerSpec, StoreWriter, open_store

# (chrom, pos0, end, ref, alt)
ROWS = [
    ("chr20", 99, 100, "A", "G"),  # r0: ends where the BED interval starts
    ("chr20", 100, 101, "C", "T"),  # r1: first base of [100, 200)
    ("chr20", 199, 200, "G", "A"),  # r2: last base of [100, 200)
    ("chr20", 200, 203, "ATG", "A"),  # r3: deletion starting at the exclusive end
    ("chr21", 50, 51, "T", "C"),  # r4
    ("chr20", 5000, 5001, "A", "C"),  # r5: far away (pileup-window tests)
]


def make_store(path: Path, rows=ROWS):
    obs = pd.DataFrame({
        "key": [f"{c}:{p}:{r}>{a}:0" for c, p, _, r, a in rows],
        "shard": 0, "record": np.arange(len(rows)),
        "chrom": [r[0] for r in rows], "pos": [r[1] for r in rows],
        "end": [r[2] for r in rows], "ref": [r[3] for r in rows], "alt": [r[4] for r in rows],
        "alt_allele_indices": "0",
    })
    w = StoreWriter.open(path, {"inputs": {}, "input_shape": [100, 221, 7]},
                         [LayerSpec("mixed5", 2)])
    w.append(obs, {"mixed5": np.zeros((len(rows), 2), np.float32)})
    return w.finalize()


@pytest.fixture
def store(tmp_path):
    return make_store(tmp_path / "store")


def col(store, name):
    return open_store(store.path).obs[name].tolist()


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def bgzip_index(path: Path, preset: str) -> Path:
    gz = Path(str(path) + ".gz")
    pysam.tabix_compress(str(path), str(gz), force=True)
    pysam.tabix_index(str(gz), preset=preset, force=True)
    return gz


# -- intervals -----------------------------------------------------------------------------


def test_bed_half_open_edges(store, tmp_path):
    bed = write(tmp_path / "GRCh38_segdups.bed",
                "track name=x\n# comment\nchr20\t100\t200\textra\tcols\n")
    res = an.annotate_bed(store, bed)
    assert res.column == "GRCh38_segdups"
    assert col(store, "GRCh38_segdups") == [False, True, True, False, False, False]
    assert (res.n_true, res.n_records, res.renamed) == (2, 1, {})


def test_bed_gz_and_indexed_bed_agree(store, tmp_path):
    plain = write(tmp_path / "s.bed", "chr20\t100\t200\nchr21\t0\t51\nchr22\t0\t10\n")
    with gzip.open(tmp_path / "g.bed.gz", "wt") as fh:  # gzip, not bgzip: streamed
        fh.write(plain.read_text())
    idx = bgzip_index(write(tmp_path / "t.bed", plain.read_text()), "bed")  # bgzip + tabix
    want = [False, True, True, False, True, False]
    for p, name in ((plain, "a"), (tmp_path / "g.bed.gz", "b"), (idx, "c")):
        an.annotate_bed(store, p, name=name)
        assert col(store, name) == want, p


def test_locus_window(store, tmp_path):
    # r5's window is [5000-110, 5000+111) = [4890, 5111).
    inside = write(tmp_path / "in.bed", "chr20\t5110\t5200\n")
    outside = write(tmp_path / "out.bed", "chr20\t5111\t5200\n")
    below = write(tmp_path / "below.bed", "chr20\t4800\t4890\n")
    an.annotate_bed(store, inside, name="w_in", by="locus")
    an.annotate_bed(store, inside, name="v_in", by="variant")
    an.annotate_bed(store, outside, name="w_out", by="locus")
    an.annotate_bed(store, below, name="w_below", by="locus")
    assert col(store, "w_in")[5] is True and col(store, "v_in")[5] is False
    assert col(store, "w_out")[5] is False and col(store, "w_below")[5] is False


def test_chr_prefix_reconciled_with_warning(store, tmp_path, caplog):
    bed = write(tmp_path / "nochr.bed", "20\t100\t101\n21\t50\t51\n")
    with caplog.at_level("WARNING", logger="probing.annotate"):
        res = an.annotate_bed(store, bed)
    assert res.renamed == {"20": "chr20", "21": "chr21"}
    assert any("renamed" in w for w in res.warnings) and "renamed" in caplog.text
    assert col(store, "nochr") == [False, True, False, False, True, False]


def test_no_common_chromosome_refuses(store, tmp_path):
    bed = write(tmp_path / "x.bed", "chrX\t1\t5\n")
    with pytest.raises(an.AnnotationError, match="no chromosome name in common"):
        an.annotate_bed(store, bed)


def test_malformed_bed_names_file_and_line(store, tmp_path):
    bed = write(tmp_path / "bad.bed", "chr20\t1\t5\nchr20\tten\t20\n")
    with pytest.raises(an.AnnotationError, match=r"bad\.bed, line 2: start 'ten'"):
        an.annotate_bed(store, bed)
    bed2 = write(tmp_path / "bad2.bed", "chr20\t50\t10\n")
    with pytest.raises(an.AnnotationError, match=r"line 1: invalid interval"):
        an.annotate_bed(store, bed2)


RMSK = (
    # bin sw div del ins chrom start end left strand name class family rs re rl id
    "585\t100\t1\t1\t1\tchr20\t100\t101\t-1\t+\tL1PA2\tLINE\tL1\t1\t2\t0\t1\n"
    "585\t100\t1\t1\t1\tchr21\t50\t51\t-1\t+\tAluY\tSINE\tAlu\t1\t2\t0\t2\n"
    "585\t100\t1\t1\t1\tchr20\t202\t203\t-1\t+\tL2a\tLINE\tL2\t1\t2\t0\t3\n"
)

OUT = (
    "   SW   perc perc perc  query      position in query    matching   repeat    "
    "position in repeat\n"
    "score   div. del. ins.  sequence    begin  end  (left)   repeat     class/family  "
    "begin end (left)  ID\n\n"
    "  100  1.0  1.0  1.0  chr20   101   101  (1000) +  L1PA2  LINE/L1   1   2  (0)  1\n"
    "  100  1.0  1.0  1.0  chr21    51    51  (1000) C  AluY   SINE/Alu  (0) 2   1  2\n"
    "  100  1.0  1.0  1.0  chr20   203   210  (1000) +  L2a    LINE/L2   1   8  (0)  3 *\n"
)


@pytest.mark.parametrize("fmt", ["rmsk", "out"])
def test_rmsk_class_family_filters(store, tmp_path, fmt):
    path = write(tmp_path / ("rmsk.txt" if fmt == "rmsk" else "hg38.fa.out"),
                 RMSK if fmt == "rmsk" else OUT)
    r = an.annotate_rmsk(store, path, repeat_class=["LINE"])
    assert r.column == "rmsk_LINE"
    assert col(store, "rmsk_LINE") == [False, True, False, True, False, False]
    r = an.annotate_rmsk(store, path, repeat_class=["LINE"], repeat_family=["L1"])
    assert r.column == "rmsk_LINE_L1"
    assert col(store, "rmsk_LINE_L1") == [False, True, False, False, False, False]
    an.annotate_rmsk(store, path, name="any_repeat")
    assert col(store, "any_repeat") == [False, True, False, True, True, False]


def test_rmsk_gz_and_wrong_columns(store, tmp_path):
    with gzip.open(tmp_path / "rmsk.txt.gz", "wt") as fh:
        fh.write(RMSK)
    an.annotate_rmsk(store, tmp_path / "rmsk.txt.gz", repeat_class=["SINE"])
    assert col(store, "rmsk_SINE") == [False, False, False, False, True, False]
    bad = write(tmp_path / "bad_rmsk.txt", "1\t2\t3\tchr20\t5\n")
    with pytest.raises(an.AnnotationError, match=r"bad_rmsk\.txt, line 1: .* 5 tab-separated"):
        an.annotate_rmsk(store, bad)


# -- VCF -----------------------------------------------------------------------------------

VCF = (
    "##fileformat=VCFv4.2\n"
    "##contig=<ID=20>\n"
    "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\tHG002\n"
    "20\t100\t.\tA\tG\t.\tPASS\t.\tGT\t0/1\n"  # POS 100 -> pos0 99: r0
    "20\t101\t.\tC\tA\t.\tPASS\t.\tGT\t0/1\n"  # r1 position, different alt
    "20\t201\t.\tATG\tA,AT\t.\tPASS\t.\tGT\t0/1\n"  # r3 deletion (anchor base)
    "20\t7777\t.\tA\tC\t.\tPASS\t.\tGT\t0/1\n"  # no example
)


def test_vcf_one_based_and_alleles(store, tmp_path):
    vcf = write(tmp_path / "mosaic.vcf", VCF)
    res = an.annotate_vcf(store, vcf)
    assert res.column == "mosaic" and res.renamed == {"20": "chr20"}
    assert col(store, "mosaic") == [True, True, False, True, False, False]
    assert (res.n_records, res.matched, res.unmatched) == (4, 3, 1)
    res = an.annotate_vcf(store, vcf, name="mosaic_exact", match_alleles=True)
    assert col(store, "mosaic_exact") == [True, False, False, True, False, False]
    assert (res.matched, res.unmatched) == (2, 2)
    assert "2/4 VCF records matched" in res.summary()


def test_vcf_indexed_matches_plain(store, tmp_path):
    gz = bgzip_index(write(tmp_path / "truth.vcf", VCF), "vcf")
    an.annotate_vcf(store, gz, name="idx")
    assert col(store, "idx") == [True, True, False, True, False, False]


def test_vcf_bad_pos(store, tmp_path):
    vcf = write(tmp_path / "b.vcf", "#CHROM\tPOS\tID\tREF\tALT\nchr20\t0\t.\tA\tG\n")
    with pytest.raises(an.AnnotationError, match=r"b\.vcf, line 2: VCF POS is 1-based"):
        an.annotate_vcf(store, vcf)


# -- overlap kernel ------------------------------------------------------------------------


def test_overlap_matches_brute_force():
    rng = np.random.default_rng(1)
    s = rng.integers(0, 2000, 300)
    e = s + rng.integers(0, 40, 300)
    qs = rng.integers(0, 2100, 5000)
    qe = qs + rng.integers(1, 30, 5000)
    ms, me = an.merge_intervals(s, e)
    assert np.all(np.diff(ms) > 0) and np.all(np.diff(me) > 0)
    got = an.overlaps(qs, qe, ms, me)
    brute = ((s[None, :] < qe[:, None]) & (e[None, :] > qs[:, None])).any(axis=1)
    np.testing.assert_array_equal(got, brute)


def test_cli_annotate(store, tmp_path):
    from probing.commands_annotate import register

    app = typer.Typer()
    register(app)
    rm = write(tmp_path / "rmsk.txt", RMSK)
    vcf = write(tmp_path / "m.vcf", VCF)
    r = CliRunner().invoke(app, ["annotate", str(store.path), "--rmsk", str(rm),
                                 "--repeat-class", "LINE"])
    assert r.exit_code == 0, r.output
    assert "rmsk_LINE: 2/6 examples overlap 2 intervals" in r.output
    r = CliRunner().invoke(app, ["annotate", str(store.path), "--vcf", str(vcf), "--name",
                                 "mosaic", "--match-alleles"])
    assert r.exit_code == 0 and "2/4 VCF records matched an example, 2 unmatched" in r.output
    r = CliRunner().invoke(app, ["annotate", str(store.path)])
    assert r.exit_code != 0


# -- audit: per-contig naming, VCF --by locus, refusals, stale indexes, empty STOREs --------


def _cli(*args):
    from probing.commands_annotate import register

    app = typer.Typer()
    register(app)
    return CliRunner().invoke(app, ["annotate", *map(str, args)])


def test_mixed_contig_naming_is_reconciled_per_contig(store, tmp_path):
    # chr20 rows renamed to 20, chr21 kept, one contig the STORE lacks under any name.
    bed = write(tmp_path / "mixed.bed", "20\t100\t101\nchr21\t50\t51\nchrM\t0\t10\n")
    res = an.annotate_bed(store, bed, name="mixed")
    assert col(store, "mixed") == [False, True, False, False, True, False]
    assert res.renamed == {"20": "chr20"} and res.unplaced == 1
    assert res.summary() == ("mixed: 2/6 examples overlap 3 intervals "
                             "(1 interval on contigs not in the STORE)")
    vcf = write(tmp_path / "mixed.vcf", "#CHROM\tPOS\tID\tREF\tALT\n20\t100\t.\tA\tG\n"
                                        "chr21\t51\t.\tT\tC\nchr9\t5\t.\tA\tC\n")
    res = an.annotate_vcf(store, vcf, name="mixedv")
    assert col(store, "mixedv") == [True, False, False, False, True, False]
    assert (res.matched, res.unplaced) == (2, 1)


def test_indexed_mixed_naming_reads_both_conventions(store, tmp_path):
    gz = bgzip_index(write(tmp_path / "m.bed", "20\t100\t101\nchr21\t50\t51\n"), "bed")
    an.annotate_bed(store, gz, name="m")
    assert col(store, "m") == [False, True, False, False, True, False]


def test_vcf_by_locus_marks_windows_holding_a_record(store, tmp_path):
    # r5 (pos 5000) window is [4890, 5111): POS 5111 (pos0 5110) inside, POS 5112 outside.
    vcf = write(tmp_path / "near.vcf", "#CHROM\tPOS\tID\tREF\tALT\nchr20\t5111\t.\tA\tG\n"
                                       "chr20\t9000\t.\tA\tG\n")
    res = an.annotate_vcf(store, vcf, name="near", by="locus")
    assert col(store, "near")[5] is True and (res.matched, res.unmatched) == (1, 1)
    far = write(tmp_path / "far.vcf", "#CHROM\tPOS\tID\tREF\tALT\nchr20\t5112\t.\tA\tG\n")
    an.annotate_vcf(store, far, name="far", by="locus")
    assert col(store, "far")[5] is False
    with pytest.raises(an.AnnotationError, match="cannot be combined with --by locus"):
        an.annotate_vcf(store, vcf, name="x", by="locus", match_alleles=True)
    r = _cli(store.path, "--vcf", vcf, "--by", "locus", "--name", "near_cli")
    assert r.exit_code == 0, r.output
    assert col(store, "near_cli") == col(store, "near")


def test_vcf_refuses_non_vcf_and_warns_on_zero_matches(store, tmp_path, caplog):
    bed = write(tmp_path / "line.bed", "chr20\t100\t200\n")
    with pytest.raises(an.AnnotationError, match=r"line\.bed: not a VCF \(no "):
        an.annotate_vcf(store, bed, name="v")
    assert "v" not in open_store(store.path).obs.columns
    miss = write(tmp_path / "miss.vcf", "##fileformat=VCFv4.2\n#CHROM\tPOS\tID\tREF\tALT\n"
                                        "chr20\t7\t.\tA\tG\n")
    with caplog.at_level("WARNING", logger="probing.annotate"):
        res = an.annotate_vcf(store, miss)
    assert any("none of 1 records matched an example" in w for w in res.warnings)
    assert "none of 1 records matched" in caplog.text


def test_existing_duplicate_and_reserved_names_are_refused(store, tmp_path):
    bed = write(tmp_path / "line.bed", "chr20\t100\t200\n")
    empty = write(tmp_path / "empty.bed", "")
    an.annotate_bed(store, bed)
    with pytest.raises(an.AnnotationError, match=r"column 'line' already exists .* --overwrite"):
        an.annotate_bed(store, empty, name="line", overwrite=False)
    an.annotate_bed(store, empty, name="line", overwrite=True)
    assert not any(col(store, "line"))
    r = _cli(store.path, "--bed", bed, "--name", "line")
    assert r.exit_code != 0 and "already exists" in str(r.exception)
    assert _cli(store.path, "--bed", bed, "--name", "line", "--overwrite").exit_code == 0
    (tmp_path / "b").mkdir()
    other = write(tmp_path / "b" / "line.bed", "chr21\t0\t100\n")
    r = _cli(store.path, "--bed", bed, "--bed", other, "--overwrite")
    assert "would both write column 'line'" in str(r.exception)
    for reserved in ("cluster", "level1", "level2", "node", "key"):
        with pytest.raises(an.AnnotationError, match="reserved for analysis runs"):
            an.annotate_bed(store, bed, name=reserved)
    with pytest.raises(an.AnnotationError, match=r"'pos': an extraction column .* choose "
                                                 r"another --name"):
        an.annotate_bed(store, bed, name="pos")


def test_bad_name_from_file_stem_says_where_it_came_from(store, tmp_path):
    bed = write(tmp_path / "1kg-mask.bed", "chr20\t100\t200\n")
    with pytest.raises(an.AnnotationError, match=r"'1kg-mask' \(taken from the file name "
                                                 r"'1kg-mask\.bed'; set one with --name\)"):
        an.annotate_bed(store, bed)
    assert an.annotate_bed(store, bed, name="kg_mask").n_true == 2


def test_stale_tabix_index_says_how_to_rebuild(store, tmp_path, monkeypatch):
    gz = bgzip_index(write(tmp_path / "t.vcf", VCF), "vcf")
    real = pysam.TabixFile

    class Stale:
        """pysam's behaviour on a regenerated file: open works, fetch fails mid-iteration."""

        def __init__(self, path):
            self._tbx = real(path)
            self.contigs = self._tbx.contigs

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._tbx.close()

        def fetch(self, chrom):
            raise ValueError("iteration failed (error code -2)")

    monkeypatch.setattr(pysam, "TabixFile", Stale)
    with pytest.raises(an.StaleIndexError, match=r"t\.vcf\.gz: its tabix index is out of date"
                                                 r".* rebuild it with `tabix -f -p vcf "):
        an.annotate_vcf(store, gz, name="stale")


def test_unknown_repeat_class_or_family_is_refused(store, tmp_path):
    rm = write(tmp_path / "rmsk.txt", RMSK)
    with pytest.raises(an.AnnotationError, match=r"--repeat-class 'line' not in the file "
                       r"\(did you mean 'line' -> 'LINE'\?\); present: LINE, SINE"):
        an.annotate_rmsk(store, rm, repeat_class=["line"])
    with pytest.raises(an.AnnotationError, match=r"--repeat-family 'Bogus' .* present: Alu, "
                                                 r"L1, L2"):
        an.annotate_rmsk(store, rm, repeat_family=["Bogus"])
    assert "rmsk_line" not in open_store(store.path).obs.columns


def test_store_without_examples_says_so(tmp_path):
    StoreWriter.open(tmp_path / "empty", {"inputs": {}, "input_shape": [100, 221, 7]},
                         [LayerSpec("mixed5", 2)])
    s = open_store(tmp_path / "empty")  # opened, nothing committed yet
    bed = write(tmp_path / "a.bed", "chr20\t1\t5\n")
    vcf = write(tmp_path / "a.vcf", VCF)
    for call in (lambda: an.annotate_bed(s, bed), lambda: an.annotate_vcf(s, vcf),
                 lambda: an.annotate_rmsk(s, write(tmp_path / "r.txt", RMSK))):
        with pytest.raises(an.AnnotationError, match="the STORE has no examples yet"):
            call()
    r = _cli(s.path, "--bed", bed)
    assert "no examples yet" in str(r.exception)


# -- one entry for several sources: annotate(store, sources=[...]) ----------------------------


def _annotations(store) -> pd.DataFrame:
    """The annotation columns a STORE holds, by name (extraction columns left out)."""
    st = open_store(store.path)
    return st.obs[[c for c in st.obs.columns if c not in st._base_obs().columns]]


def test_several_sources_in_one_call_write_what_the_cli_writes(tmp_path):
    bed = write(tmp_path / "segdups.bed", "chr20\t100\t200\n")
    rm = write(tmp_path / "rmsk.txt", RMSK)
    vcf = write(tmp_path / "mosaic.vcf", VCF)
    by_cli, by_api = make_store(tmp_path / "cli"), make_store(tmp_path / "api")
    r = _cli(by_cli.path, "--bed", bed, "--rmsk", rm, "--repeat-class", "LINE", "--vcf", vcf,
             "--by", "locus")
    assert r.exit_code == 0, r.output
    results = an.annotate(by_api, [an.Bed(bed, by="locus"),
                                   an.RepeatMasker(rm, by="locus", repeat_class=["LINE"]),
                                   an.Vcf(vcf, by="locus")])
    assert [res.column for res in results] == ["segdups", "rmsk_LINE", "mosaic"]
    pd.testing.assert_frame_equal(_annotations(by_api), _annotations(by_cli))
    printed = [line for line in r.output.splitlines() if not line.startswith("dvprobe: warn")]
    assert printed == [res.summary() for res in results]


def test_a_clash_in_a_later_source_writes_nothing(store, tmp_path):
    first = write(tmp_path / "first.bed", "chr20\t100\t200\n")
    an.annotate_bed(store, write(tmp_path / "taken.bed", "chr21\t0\t100\n"))
    (tmp_path / "b").mkdir()
    twin = write(tmp_path / "b" / "first.bed", "chr21\t0\t100\n")
    vcf = write(tmp_path / "m.vcf", VCF)
    refusals = [
        ([an.Bed(first), an.Bed(twin)], "would both write column 'first'"),
        ([an.Bed(first), an.Bed(twin, name="taken")], "column 'taken' already exists"),
        ([an.Bed(first), an.Vcf(vcf, by="locus", match_alleles=True)],
         "--match-alleles compares an example's own site"),
        ([an.Bed(first), an.Bed(twin, name="twin", by="window")], "by must be 'variant' or "
                                                                 "'locus'"),
        ([an.Bed(first), an.RepeatMasker(twin, repeat_class="LINE")],
         "repeat_class takes a list of names"),
        ([], "give --bed, --rmsk or --vcf"),
    ]
    for sources, message in refusals:
        with pytest.raises(an.AnnotationError, match=re.escape(message)):
            an.annotate(store, sources, overwrite=False)
    assert list(_annotations(store).columns) == ["taken"]


def test_annotating_reads_only_the_columns_it_matches_on(store, tmp_path, monkeypatch):
    # A whole genome's obs (every key and allele string) takes gigabytes; a BED or VCF
    # annotation needs a few columns of it, so the whole frame must never be loaded.
    def whole_obs(self):
        raise AssertionError("annotate loaded every obs column")

    monkeypatch.setattr(type(store), "obs", property(whole_obs))
    bed = write(tmp_path / "segdup.bed", "chr20\t100\t200\n")
    vcf = write(tmp_path / "truth.vcf", "##fileformat=VCFv4.2\n"
                "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n"
                "chr20\t5001\t.\tA\tG\t.\tPASS\t.\n")
    assert an.annotate_bed(store, bed).n_true == 2
    an.annotate_vcf(store, vcf, by="locus")
    monkeypatch.undo()
    assert col(store, "segdup") == [False, True, True, False, False, False]
    assert "truth" in store.obs.columns
