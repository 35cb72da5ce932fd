"""Enrichment numbers against hand computation, scipy's Fisher test and a hand-made BH."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import typer
from scipy.stats import fisher_exact
from typer.testing import CliRunner

from probing import enrich as en
from probing.store import LayerSpec, StoreError, StoreWriter, open_store


def test_bh_by_hand():
    # sorted p: 0.01 0.03 0.04 0.20 (m=4) -> p*m/rank: 0.04 0.06 0.0533 0.20
    # running min from the top: 0.04 0.0533 0.0533 0.20
    q = en.bh_qvalues([0.01, 0.04, 0.03, 0.20])
    np.testing.assert_allclose(q, [0.04, 0.16 / 3, 0.16 / 3, 0.20])
    q = en.bh_qvalues([0.9, np.nan, 0.5])  # NaN is not part of the family (m = 2)
    np.testing.assert_allclose(q, [0.9, np.nan, 0.9])
    assert en.bh_qvalues([0.6, 0.7]).max() <= 1.0


def test_bh_matches_scipy():
    from scipy.stats import false_discovery_control

    p = np.random.default_rng(3).uniform(size=200) ** 3
    np.testing.assert_allclose(en.bh_qvalues(p), false_discovery_control(p, method="bh"))


def test_enrichment_table_by_hand():
    # 10 examples, clusters A (4), B (6); attribute in 3 of A and 1 of B.
    labels = np.array(["A"] * 4 + ["B"] * 6)
    attr = np.array([1, 1, 1, 0, 1, 0, 0, 0, 0, 0], dtype=bool)
    t = en.enrichment_table(labels, {"LINE": attr}).set_index("cluster")
    a = t.loc["A"]
    assert (a["n"], a["count"]) == (4, 3)
    assert a["share_of_cluster"] == pytest.approx(0.75)
    assert a["share_of_attribute"] == pytest.approx(0.75)
    assert a["fold"] == pytest.approx(0.75 / 0.4)
    p_a = fisher_exact([[3, 1], [1, 5]], alternative="greater")[1]
    p_b = fisher_exact([[1, 5], [3, 1]], alternative="greater")[1]
    assert a["p"] == pytest.approx(p_a)
    assert t.loc["B", "p"] == pytest.approx(p_b)
    # hypergeometric by hand: P(X >= 3), X ~ Hypergeom(N=10, K=4, n=4)
    from math import comb

    by_hand = sum(comb(4, k) * comb(6, 4 - k) for k in (3, 4)) / comb(10, 4)
    assert a["p"] == pytest.approx(by_hand)
    np.testing.assert_allclose(t["q"].to_numpy(), en.bh_qvalues(t["p"].to_numpy()))


def test_natural_cluster_order_and_continuous():
    labels = np.array(["10", "2", "2", "10", "1"])
    t = en.enrichment_table(labels, {"x": np.array([1, 0, 0, 1, 0], bool)})
    assert t["cluster"].tolist() == ["1", "2", "10"]
    c = en.continuous_table(labels, {"depth": np.array([10.0, 1, 3, 30, 5])}).set_index("cluster")
    assert c.loc["10", "median"] == 20 and c.loc["10", "mean"] == 20
    assert c.loc["10", "q1"] == pytest.approx(15) and c.loc["10", "iqr"] == pytest.approx(10)
    assert c.loc["1", "n"] == 1


def test_landing_41_of_42():
    labels = np.array(["10"] * 41 + ["3"] + ["1"] * 100)
    mosaic = np.r_[np.ones(42, bool), np.zeros(100, bool)]
    ld = en.landing(labels, mosaic, "mosaic")
    assert ld.summary() == "mosaic: 41/42 in cluster 10 (1 in 3)"
    assert en.landing(labels[:42], None, "applied").summary().startswith("applied: 41/42 in")


def test_landing_names_four_clusters_unless_asked_for_all():
    ld = en.landing_from_counts(pd.Series({"9": 12, "3": 10, "4": 9, "1": 8, "6": 3, "2": 0}),
                                "set")
    assert ld.where() == "12/42 in cluster 9 (10 in 3, 9 in 4, 8 in 1, ...)"
    assert ld.where(limit=None) == "12/42 in cluster 9 (10 in 3, 9 in 4, 8 in 1, 3 in 6)"


def _store(tmp_path, n=200):
    rng = np.random.default_rng(0)
    obs = pd.DataFrame({"key": [f"chr1:{i}:A>G:0" for i in range(n)], "chrom": "chr1",
                        "pos": np.arange(n), "end": np.arange(n) + 1,
                        "label": pd.array(rng.integers(0, 3, n), dtype="Int64"),
                        "depth": rng.normal(30, 3, n), "mean_mapq": rng.uniform(0, 60, n)})
    w = StoreWriter.open(tmp_path / "s", {"inputs": {}}, [LayerSpec("mixed5", 2)])
    w.append(obs, {"mixed5": np.zeros((n, 2), np.float32)})
    s = w.finalize()
    cl = np.arange(n) % 4
    s.add_obs({"rmsk_LINE": cl == 1, "mosaic": np.isin(np.arange(n), [1, 5, 9, 2])})
    s.save_run("km", meta={"kind": "kmeans"},
               obs=pd.DataFrame({"key": obs["key"], "cluster": cl, "level1": cl // 2}))
    return s


def test_enrich_on_store_and_outputs(tmp_path):
    s = _store(tmp_path)
    res = en.enrich(s, "km", ["LINE", "mosaic", "label=1"])
    t = res.table
    line1 = t[(t.attribute == "rmsk_LINE") & (t.cluster == "1")].iloc[0]
    assert (line1["count"], line1["n"], line1["share_of_cluster"]) == (50, 50, 1.0)
    assert line1["share_of_attribute"] == 1.0 and line1["fold"] == pytest.approx(4.0)
    lab = s.obs["label"].astype(str) == "1"
    assert t[t.attribute == "label=1"]["count"].sum() == lab.sum()
    assert [ld.summary() for ld in res.landings][1] == "mosaic: 3/4 in cluster 1 (1 in 2)"
    lv = en.enrich(s, "km", ["LINE"], level="level1").table
    assert lv["cluster"].tolist() == ["0", "1"] and lv["count"].tolist() == [50, 0]
    assert set(res.continuous["attribute"]) == {"depth", "mean_mapq"}
    md = en.write_enrichment(res, tmp_path / "t.md").read_text()
    assert "mosaic: 3/4 in cluster 1" in md and "| rmsk_LINE | 1 | 50 | 50 | 1 | 1 | 4 |" in md
    en.write_enrichment(res, tmp_path / "t.csv")
    back = pd.read_csv(tmp_path / "t.csv")
    np.testing.assert_allclose(back["q"], t["q"])
    assert (tmp_path / "t.continuous.csv").is_file()


def test_enrich_errors(tmp_path):
    s = _store(tmp_path)
    with pytest.raises(en.EnrichmentError, match="no attribute 'SINE'"):
        en.enrich(s, "km", ["SINE"])
    with pytest.raises(en.EnrichmentError, match="not boolean"):
        en.enrich(s, "km", ["depth"])
    with pytest.raises(en.EnrichmentError, match=r"--level 'node': .* grouped by cluster \| level1$"):
        en.enrich(s, "km", ["LINE"], level="node")
    with pytest.raises(en.EnrichmentError, match=r"\.csv or \.md"):
        en.write_enrichment(en.enrich(s, "km", ["LINE"]), tmp_path / "x.txt")


def test_cli_enrich(tmp_path):
    from probing.commands_annotate import register

    s = _store(tmp_path)
    app = typer.Typer()
    register(app)
    r = CliRunner().invoke(app, ["enrich", str(s.path), "--run", "km", "--by", "LINE,mosaic",
                                 "--out", str(tmp_path / "e.csv")])
    assert r.exit_code == 0, r.output
    assert "mosaic: 3/4 in cluster 1" in r.output and "| rmsk_LINE | 1 | 50 | 50 |" in r.output
    assert (tmp_path / "e.csv").is_file()


# -- audit: valid levels, --out checked first, numeric values, partial STOREs ---------------

def _hier_store(tmp_path):
    s = _store(tmp_path)
    cl = np.arange(s.n) % 4
    s.save_run("hkm", meta={"kind": "hkmeans"},
               obs=pd.DataFrame({"cluster": cl, "level1": cl // 2, "level2": cl % 2,
                                 "node": [f"{a}.{b}" for a, b in zip(cl // 2, cl % 2,
                                                                     strict=True)]}))
    return s


def test_level2_is_not_a_grouping(tmp_path):
    s = _hier_store(tmp_path)
    assert en.run_levels(s.load_run("hkm")) == ["cluster", "level1", "node"]
    with pytest.raises(en.EnrichmentError, match=r"^--level 'level2': run 'hkm' can be "
                       r"grouped by cluster \| level1 \| node$"):
        en.enrich(s, "hkm", ["LINE"], level="level2")
    assert en.enrich(s, "hkm", ["LINE"], level="node").table["cluster"].tolist() == \
        ["0.0", "0.1", "1.0", "1.1"]


def test_numeric_attribute_error_lists_values_in_numeric_order(tmp_path):
    s = _store(tmp_path)
    s.add_obs({"nreads": np.arange(s.n) % 13 + 1})
    with pytest.raises(en.EnrichmentError, match=r"values like 1, 2, 3, 4, 5\); use "
                       r"nreads=VALUE .* or --continuous nreads"):
        en.enrich(s, "km", ["nreads"])


def _cli(tmp_path, *args):
    from probing.commands_annotate import register

    app = typer.Typer()
    register(app)
    return CliRunner().invoke(app, ["enrich", *map(str, args)])


def test_cli_enrich_checks_out_suffix_before_computing(tmp_path, monkeypatch):
    s = _store(tmp_path)
    monkeypatch.setattr(en, "enrich", lambda *a, **k: pytest.fail("computed first"))
    r = _cli(tmp_path, s.path, "--run", "km", "--by", "LINE", "--out", tmp_path / "t.txt")
    assert isinstance(r.exception, en.EnrichmentError)
    assert str(r.exception) == f"{tmp_path / 't.txt'}: output must end in .csv or .md, " \
                               "not '.txt'"
    assert r.output == ""


def test_partial_store_is_enriched_with_one_warning(tmp_path, caplog):
    w = StoreWriter.open(tmp_path / "p", {"inputs": {}}, [LayerSpec("mixed5", 2)])
    w.append(pd.DataFrame({"key": list("abcdef"), "flag": [True, False] * 3}),
             {"mixed5": np.zeros((6, 2), np.float32)})
    s = open_store(tmp_path / "p")
    s.save_run("km", meta={"kind": "kmeans"}, obs=pd.DataFrame({"cluster": [0, 1] * 3}))
    lg = logging.getLogger("probing.enrich")
    lg.addHandler(caplog.handler)  # the CLI test may have turned propagation off
    try:
        with caplog.at_level(logging.WARNING, logger="probing.enrich"):
            res = en.enrich(s, "km", ["flag"])
    finally:
        lg.removeHandler(caplog.handler)
    assert res.landings[0].summary() == "flag: 3/3 in cluster 0"
    lines = {r.getMessage() for r in caplog.records if "partial STORE" in r.getMessage()}
    assert lines == {f"{s.path}: partial STORE (6 examples): extraction did not finish; "
                     "results cover only these rows (rerun `dvprobe extract` with the same "
                     "arguments to complete it)"}


def test_continuous_must_exist_and_be_numeric(tmp_path):
    s = _store(tmp_path)
    with pytest.raises(en.EnrichmentError, match=r"^--continuous chrom: not numeric in .* "
                                                 r"\(chrom: "):
        en.enrich(s, "km", ["LINE"], continuous=["chrom"])
    with pytest.raises(en.EnrichmentError, match=r"no continuous column\(s\) \['bogus'\]"):
        en.enrich(s, "km", ["LINE"], continuous=["bogus"])
    assert set(en.enrich(s, "km", ["LINE"], continuous=["depth"]).continuous["attribute"]) \
        == {"depth"}


def test_cli_enrich_names_every_file_it_writes(tmp_path):
    s = _store(tmp_path)
    r = _cli(tmp_path, s.path, "--run", "km", "--by", "LINE", "--out", tmp_path / "x.csv")
    assert r.exit_code == 0, r.output
    assert f"wrote {tmp_path / 'x.csv'}\n" in r.output
    assert f"wrote {tmp_path / 'x.continuous.csv'}\n" in r.output


def test_p_and_q_that_underflow_are_not_printed_as_zero():
    """Fisher's p at large n underflows to 0.0; a table must not claim certainty."""
    table = en.to_markdown(pd.DataFrame({"attribute": ["LINE"], "fold": [0.0], "p": [0.0],
                                         "q": [2e-5]}))
    assert table.splitlines()[-1] == "| LINE | 0 | < 1e-300 | 2e-05 |"


def test_a_value_attribute_matches_numbers_as_numbers_and_text_as_text():
    from probing.enrich import resolve_attribute

    frame = pd.DataFrame({"labelf": [0.0, 1.0, np.nan, 1.0, 2.0],  # a label column with a gap
                          "label": pd.array([0, 1, None, 1, 2], dtype="Int64"),
                          "chrom": ["chr1", "1", "chr1", None, "chr2"]})
    assert resolve_attribute(frame, "labelf=1")[1].tolist() == [False, True, False, True, False]
    assert resolve_attribute(frame, "label=1")[1].tolist() == [False, True, False, True, False]
    assert resolve_attribute(frame, "chrom=chr1")[1].tolist() == [True, False, True, False,
                                                                  False]
    assert resolve_attribute(frame, "chrom=1")[1].tolist() == [False, True, False, False, False]
    assert not resolve_attribute(frame, "labelf=x")[1].any()  # text against numbers: none


# -- runs are joined to the STORE by key ----------------------------------------------------

def _copy_run(src, dst, name):
    """What `cp -r src/runs/NAME dst/runs/` does: a run made on another STORE."""
    import shutil

    (dst.path / "runs").mkdir(exist_ok=True)
    shutil.copytree(src.path / "runs" / name, dst.path / "runs" / name)


def test_a_run_of_other_examples_is_refused_naming_the_run_the_store_and_the_keys(tmp_path):
    s = _store(tmp_path)
    w = StoreWriter.open(tmp_path / "other", {"inputs": {}}, [LayerSpec("mixed5", 2)])
    keys = [f"chr1:{i}:A>G:0" for i in range(s.n)]
    keys[3], keys[150] = "chr2:3:A>G:0", "chr2:150:A>G:0"
    w.append(pd.DataFrame({"key": keys}), {"mixed5": np.zeros((s.n, 2), np.float32)})
    other = w.finalize()
    other.save_run("foreign", meta={"kind": "kmeans"},
                   obs=pd.DataFrame({"cluster": np.arange(s.n) % 4}))
    _copy_run(other, s, "foreign")
    with pytest.raises(StoreError) as refused:
        en.enrich(s, "foreign", ["LINE"])
    assert str(refused.value) == (
        f"run 'foreign' does not hold the examples of STORE {s.path}: 2 of its 200 keys are "
        "not in the STORE (e.g. 'chr2:3:A>G:0', 'chr2:150:A>G:0'), and 2 of the STORE's 200 "
        "keys are not in it (e.g. 'chr1:3:A>G:0', 'chr1:150:A>G:0') (rows are joined by "
        "key); was it made on another STORE, or before this one was extracted again? Rerun "
        "the analysis on this STORE")


def test_a_run_with_fewer_examples_is_refused(tmp_path):
    s = _store(tmp_path)
    w = StoreWriter.open(tmp_path / "short", {"inputs": {}}, [LayerSpec("mixed5", 2)])
    w.append(s.obs[["key"]].iloc[:150], {"mixed5": np.zeros((150, 2), np.float32)})
    short = w.finalize()
    short.save_run("short", meta={"kind": "kmeans"}, obs=pd.DataFrame({"cluster": [0] * 150}))
    _copy_run(short, s, "short")
    with pytest.raises(StoreError, match=r"0 of its 150 keys are not in the STORE, and 50 of "
                                         r"the STORE's 200 keys are not in it \(e.g. "
                                         r"'chr1:150:A>G:0', 'chr1:151:A>G:0', 'chr1:152:A>G:0', "
                                         r"\.\.\.\)"):
        en.enrich(s, "short", ["LINE"])


def test_a_run_holding_the_examples_in_another_order_is_read_in_store_order(tmp_path):
    s = _store(tmp_path)
    order = np.random.default_rng(5).permutation(s.n)
    run = s.load_run("km").obs.iloc[order]
    s.save_run("shuffled", meta={"kind": "kmeans"}, obs=run)
    expected = en.enrich(s, "km", ["LINE", "mosaic", "label=1"])
    got = en.enrich(s, "shuffled", ["LINE", "mosaic", "label=1"])
    pd.testing.assert_frame_equal(got.table, expected.table)
    pd.testing.assert_frame_equal(got.continuous, expected.continuous)
    assert [ld.summary() for ld in got.landings] == [ld.summary() for ld in expected.landings]
