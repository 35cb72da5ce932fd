"""``read_cvo`` / ``dvprobe read-cvo``: DeepVariant's call_variants output as a table whose
keys are the STORE's obs keys for the same examples."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dvtorch.errors import ExampleFormatError
from probing import protos
from probing.cvo import CVO_COLUMNS, read_cvo
from probing.examples import encode_example, read_examples
from probing.tfrecord import TFRecordWriter, write_records

ROOT = Path(__file__).resolve().parents[1]

# (chrom, 0-based start, ref, alts, alt_allele_indices, probabilities): a SNP, a deletion,
# and a multi-allelic site that call_variants scores once per alt subset.
SITES = [
    ("chr20", 10_000_116, "A", ("G",), (0,), (0.0012345678, 0.9987654321, 1e-10)),
    ("chr20", 10_000_210, "CTT", ("C",), (0,), (0.05, 0.15, 0.8)),
    ("chr20", 10_000_400, "G", ("T", "GA"), (0,), (0.1, 0.6, 0.3)),
    ("chr20", 10_000_400, "G", ("T", "GA"), (1,), (0.2, 0.7, 0.1)),
    ("chr20", 10_000_400, "G", ("T", "GA"), (0, 1), (0.0, 0.05, 0.95)),
    ("20", 7, "T", ("A",), (0,), (1.0, 0.0, 0.0)),
]


def _variant(chrom, start, ref, alts):
    """The candidate Variant as make_examples hands it to call_variants: with its end and
    the sample's call (call_variants copies the example's variant into its output)."""
    return protos.Variant(
        reference_name=chrom, start=start, end=start + len(ref), reference_bases=ref,
        alternate_bases=list(alts),
        calls=[protos.VariantCall(call_set_name="HG002", genotype=[-1, -1])],
    )


def _cvo_record(chrom, start, ref, alts, aai, probs) -> bytes:
    """One record as call_variants writes it (variant = 1, alt_allele_indices = 2,
    genotype_probabilities = 3)."""
    return protos.CallVariantsOutput(
        variant=_variant(chrom, start, ref, alts),
        alt_allele_indices=protos.AltAlleleIndices(indices=list(aai)),
        genotype_probabilities=list(probs),
    ).SerializeToString()


def _write_cvo(path: Path, sites=SITES) -> Path:
    write_records(path, [_cvo_record(*s) for s in sites])
    return path


def test_every_record_becomes_one_row_with_locus_alleles_and_probabilities(tmp_path):
    table = read_cvo(_write_cvo(tmp_path / "call_variants_output.tfrecord.gz"))

    assert list(table.columns) == list(CVO_COLUMNS)
    assert len(table) == len(SITES)
    assert table["chrom"].tolist() == [s[0] for s in SITES]
    assert table["pos"].tolist() == [s[1] + 1 for s in SITES]  # 1-based, as in a VCF
    assert table["ref"].tolist() == [s[2] for s in SITES]
    assert table["alts"].tolist() == ["G", "C", "T,GA", "T,GA", "T,GA", "A"]
    assert table["alt_allele_indices"].tolist() == ["0", "0", "0", "1", "0,1", "0"]
    probs = table[["p_hom_ref", "p_het", "p_hom_alt"]].to_numpy()
    np.testing.assert_array_equal(probs, np.array([s[5] for s in SITES]))  # exact doubles
    assert table["pos"].dtype == np.int64


def test_keys_equal_the_keys_extraction_gives_the_same_examples(tmp_path):
    cvo = read_cvo(_write_cvo(tmp_path / "cvo.tfrecord.gz"))
    image = np.zeros((100, 221, 7), np.uint8)
    examples = tmp_path / "examples.tfrecord.gz"
    write_records(examples, [
        encode_example(image, chrom=c, start=s, end=s + len(r), ref=r, alts=a,
                       alt_allele_indices=i)
        for c, s, r, a, i, _ in SITES
    ])
    # extraction's obs key is DVExample.key (probing/loader.py)
    assert cvo["key"].tolist() == [ex.key for ex in read_examples(examples)]
    assert cvo["key"].iloc[4] == "chr20:10000400:G>T,GA:0,1"
    assert cvo["key"].is_unique


def test_a_sharded_spec_reads_every_shard_in_order(tmp_path):
    for i, part in enumerate((SITES[:2], SITES[2:])):
        _write_cvo(tmp_path / f"call_variants_output-{i:05d}-of-00002.tfrecord.gz", part)
    table = read_cvo(str(tmp_path / "call_variants_output@2.tfrecord.gz"))
    assert table["pos"].tolist() == [s[1] + 1 for s in SITES]


def test_a_file_without_records_gives_an_empty_table_with_the_columns(tmp_path):
    table = read_cvo(_write_cvo(tmp_path / "none.tfrecord.gz", []))
    assert table.empty and list(table.columns) == list(CVO_COLUMNS)


def _crc_damaged(path: Path) -> Path:
    """A gzip CVO file whose second record's payload no longer matches its CRC."""
    plain = path.with_suffix(".plain")
    with TFRecordWriter(plain, compress=False) as w:
        for s in SITES[:3]:
            w.write(_cvo_record(*s))
    data = bytearray(plain.read_bytes())
    first = 12 + len(_cvo_record(*SITES[0])) + 4
    data[first + 12 + 3] ^= 0xFF  # a byte inside record 1's payload
    path.write_bytes(gzip.compress(bytes(data)))
    return path


@pytest.mark.parametrize("damage, reason", [
    ("crc", "payload CRC mismatch"),
    ("not-a-proto", "not a CallVariantsOutput proto"),
    ("two-probabilities", "2 genotype probabilities, expected 3"),
    ("index-out-of-range", "alt_allele_indices [1] outside the variant's 1 alt alleles"),
])
def test_a_damaged_record_is_named_by_file_and_record(tmp_path, damage, reason):
    path = tmp_path / "cvo.tfrecord.gz"
    bad = {
        "not-a-proto": b"\xff\xff\xff",
        "two-probabilities": _cvo_record("chr1", 5, "A", ("C",), (0,), (0.5, 0.5)),
        "index-out-of-range": _cvo_record("chr1", 5, "A", ("C",), (1,), (0.2, 0.3, 0.5)),
    }
    if damage == "crc":
        _crc_damaged(path)
    else:
        write_records(path, [_cvo_record(*SITES[0]), bad[damage]])
    with pytest.raises(ExampleFormatError) as err:
        read_cvo(path)
    assert err.value.path == str(path) and err.value.record == 1
    assert reason in err.value.reason


# ---------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------

ENTRY = "import sys, cli; sys.argv[0] = 'dvprobe'; cli.main()"  # as the console script


def _dvprobe(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", ENTRY, *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("suffix", [".tsv", ".parquet"])
def test_cli_writes_the_table_as_tsv_or_parquet(tmp_path, suffix):
    src = _write_cvo(tmp_path / "call_variants_output.tfrecord.gz")
    out = tmp_path / f"table{suffix}"
    proc = _dvprobe("read-cvo", src, "--out", out)
    assert proc.returncode == 0, proc.stderr
    back = (pd.read_parquet(out) if suffix == ".parquet"
            else pd.read_csv(out, sep="\t", dtype={"alt_allele_indices": str}))
    pd.testing.assert_frame_equal(back, read_cvo(src))


def test_cli_without_out_prints_tsv(tmp_path):
    src = _write_cvo(tmp_path / "cvo.tfrecord.gz", SITES[:2])
    proc = _dvprobe("read-cvo", src)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split("\t") == list(CVO_COLUMNS)
    assert lines[1].split("\t")[:6] == ["chr20:10000116:A>G:0", "chr20", "10000117", "A",
                                        "G", "0"]


def test_cli_damaged_record_is_one_line_naming_file_and_record(tmp_path):
    path = _crc_damaged(tmp_path / "cvo.tfrecord.gz")
    proc = _dvprobe("read-cvo", path, "--out", tmp_path / "t.tsv")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1
    assert f"{path}, record 1: payload CRC mismatch" in proc.stderr
    assert not (tmp_path / "t.tsv").exists()


def test_cli_refuses_an_unknown_table_suffix_before_reading(tmp_path):
    proc = _dvprobe("read-cvo", tmp_path / "missing.tfrecord.gz", "--out", tmp_path / "t.csv")
    assert proc.returncode == 2 and "must end in .tsv or .parquet" in proc.stderr


# --------------------------------------------------------------------- annotate --cvo


def _store(tmp_path: Path, sites, probs_mine):
    """A STORE of ``sites`` (keys as extraction makes them) with the rebuilt model's
    probabilities ``probs_mine``."""
    from probing.examples import example_key
    from probing.store import LayerSpec, StoreWriter

    rows = []
    for i, ((chrom, start, ref, alts, aai, _), p) in enumerate(zip(sites, probs_mine,
                                                                   strict=True)):
        rows.append({"key": example_key(chrom, start, ref, alts, aai), "shard": 0, "record": i,
                     "chrom": chrom, "pos": start, "end": start + len(ref), "ref": ref,
                     "alt": ",".join(alts), "alt_allele_indices": ",".join(map(str, aai)),
                     "p_hom_ref": p[0], "p_het": p[1], "p_hom_alt": p[2],
                     "pred_genotype": int(np.argmax(p))})
    w = StoreWriter.open(tmp_path / "store", {"inputs": {}, "shards": []},
                         [LayerSpec("mixed5", 2)])
    w.append(pd.DataFrame(rows), {"mixed5": np.zeros((len(rows), 2), np.float32)})
    return w.finalize()


def test_annotate_cvo_joins_deepvariants_probabilities_by_key(tmp_path):
    """The STORE holds SITES[:5] plus one example DeepVariant did not score; the CVO file
    holds SITES[1:] in another order (so SITES[0]'s row must not take a neighbour's
    values), plus a record of no STORE example."""
    from probing.annotate import Cvo, annotate

    extra = ("chr21", 5, "C", ("T",), (0,), (0.3, 0.3, 0.4))
    in_store = [*SITES[:5], extra]
    mine = [np.array(s[5]) + [0.0, 1e-3, -1e-3] for s in in_store]
    store = _store(tmp_path, in_store, mine)
    cvo = _write_cvo(tmp_path / "cvo.tfrecord.gz", SITES[:0:-1])  # SITES[5..1], reversed
    (result,) = annotate(store, [Cvo(cvo)])

    obs = store.obs
    probs = obs[["dv_p_hom_ref", "dv_p_het", "dv_p_hom_alt"]].to_numpy()
    for row, site in enumerate(in_store):
        if site in SITES[1:]:
            np.testing.assert_array_equal(probs[row], site[5])  # exact doubles, by key
            assert obs["dv_genotype"].iat[row] == int(np.argmax(site[5]))
        else:
            assert np.isnan(probs[row]).all() and pd.isna(obs["dv_genotype"].iat[row])
    assert str(obs["dv_genotype"].dtype) == "Int64"
    assert (result.n_true, result.n_records, result.unmatched) == (4, 5, 1)
    line = result.summary()
    assert line.startswith("dv_p_hom_ref,dv_p_het,dv_p_hom_alt,dv_genotype: 4/6 examples")
    assert "1 of 5 call_variants records match no example" in line
    assert "max |p - DeepVariant's p| = 0.001" in line and "same genotype on 4/4" in line


def test_annotate_cvo_refuses_what_cannot_be_joined(tmp_path):
    from probing.annotate import AnnotationError, Cvo, annotate

    store = _store(tmp_path, SITES[:2], [s[5] for s in SITES[:2]])
    elsewhere = _write_cvo(tmp_path / "other.tfrecord.gz", SITES[2:])
    with pytest.raises(AnnotationError, match=r"none of its 4 records has a key of .*store"):
        annotate(store, [Cvo(elsewhere)])
    clash = _write_cvo(tmp_path / "clash.tfrecord.gz",
                       [SITES[0], (*SITES[0][:5], (0.5, 0.5, 0.0))])
    with pytest.raises(AnnotationError, match="different probabilities"):
        annotate(store, [Cvo(clash)])
    twice = _write_cvo(tmp_path / "twice.tfrecord.gz", [SITES[0], SITES[0]])
    assert annotate(store, [Cvo(twice)])[0].n_true == 1  # the same record twice is one
    with pytest.raises(AnnotationError, match="--by does not apply to --cvo"):
        annotate(store, [Cvo(twice, by="locus")])
    assert "dv_p_het" in store.obs.columns


def test_cli_annotate_cvo_reads_a_sharded_spec_and_names_the_prefix(tmp_path):
    import typer
    from typer.testing import CliRunner

    from probing.commands_annotate import register

    store = _store(tmp_path, SITES, [s[5] for s in SITES])
    for i, part in enumerate((SITES[:3], SITES[3:])):
        _write_cvo(tmp_path / f"call_variants_output-{i:05d}-of-00002.tfrecord.gz", part)
    spec = str(tmp_path / "call_variants_output@2.tfrecord.gz")
    app = typer.Typer()
    register(app)
    res = CliRunner().invoke(app, ["annotate", str(store.path), "--cvo", spec,
                                   "--name", "dv110"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "6/6 examples have DeepVariant's probabilities" in res.output
    assert "same genotype on 6/6" in res.output
    from probing.store import open_store

    assert open_store(store.path).obs["dv110_genotype"].tolist() == [1, 2, 1, 1, 2, 0]
    res = CliRunner().invoke(app, ["annotate", str(store.path), "--cvo", spec,
                                   "--name", "dv110"])
    assert res.exit_code != 0 and "--overwrite" in str(res.exception)


# --------------------------------------------------------------------- the small model


def _examples_dir(d: Path) -> str:
    d.mkdir(parents=True)
    image = np.zeros((100, 221, 7), np.uint8)
    shard = d / "make_examples.tfrecord-00000-of-00001.gz"
    write_records(shard, [encode_example(image, chrom="chr20", start=5, end=6, ref="A",
                                         alts=("G",), alt_allele_indices=(0,))])
    # call_variants' own output beside them is not the small model's
    _write_cvo(d / "call_variants_output-00000-of-00001.tfrecord.gz")
    return str(shard)


def test_small_model_calls_beside_the_examples_are_found(tmp_path):
    from probing.cvo import small_model_calls

    spec = _examples_dir(tmp_path / "run")
    assert small_model_calls(spec) is None  # small model off (or its files not here)
    empty = tmp_path / "run" / "make_examples_call_variant_outputs.tfrecord-00000-of-00002.gz"
    _write_cvo(empty, [])
    found = small_model_calls(spec)
    assert found.files == (empty,) and not found.called_sites
    assert "are empty: no site is missing" in found.summary()
    full = empty.with_name("make_examples_call_variant_outputs.tfrecord-00001-of-00002.gz")
    _write_cvo(full, SITES[:1])
    found = small_model_calls(spec)
    assert found.files == (empty, full) and found.first_record_in == full
    assert "small model: ON" in found.summary()
    assert "--disable_small_model" in found.summary()
    # what the small model called reads like any call_variants output
    assert read_cvo(full)["key"].tolist() == ["chr20:10000116:A>G:0"]


def test_small_model_flags_of_a_model_example_info():
    from probing.cvo import small_model_flags

    info = {"version": "1.10.0", "shape": [100, 221, 7], "channels": [1, 2, 3, 4, 5, 6, 19],
            "flags_for_calling": {"trained_small_model_path": "/opt/smallmodels/wgs",
                                  "small_model_snp_gq_threshold": 25,
                                  "sort_by_haplotypes": True}}
    assert small_model_flags(info) == {"trained_small_model_path": "/opt/smallmodels/wgs",
                                       "small_model_snp_gq_threshold": 25}
    assert small_model_flags({"shape": [100, 221, 7]}) == {}
    assert small_model_flags({"flags_for_calling": "not a mapping"}) == {}
