"""Analysis at scale: sample-by-default fits, chunked passes equal to unchunked ones, a guard
whose advice the next run follows, enrichment that reads only what it needs."""

from __future__ import annotations

import logging
import re

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score as ari
from test_analysis_support import blobs, make_store

from probing import analysis as pa
from probing.analysis import fit, guard, sample, stream
from probing.analysis.errors import AnalysisError, ScaleError
from probing.analysis.features import FeatureModel, fit_features
from probing.analysis.normalize import NORMALIZE
from probing.enrich import enrich
from probing.store import Store

SK = {"backend": "sklearn"}


@pytest.fixture()
def genome_store(tmp_path):
    """600 rows on three chromosomes of unequal size (400 / 150 / 50), 4 blobs."""
    x, y = blobs(600, 16, 4, seed=3)
    chrom = np.repeat(["chr1", "chr2", "chrM"], [400, 150, 50])
    st = make_store(tmp_path / "g", {"mixed5": x, "mixed7": x[:, :10] * 2},
                    {"chrom": chrom, "pos": np.arange(600) * 1000, "truth": y,
                     "planted": y == 2})
    return st, y


# -- fit on a sample by default, and say so ---------------------------------------------------

def test_large_store_fits_on_a_stratified_sample_by_default(genome_store, monkeypatch, caplog):
    st, y = genome_store
    monkeypatch.setitem(sample.FIT_ROWS, "kmeans", 300)
    with caplog.at_level(logging.INFO, logger="dvprobe.analysis"):
        r = pa.kmeans(st, "mixed5", k=4, pca=8, seed=5, run="km", **SK)
    fs = r.meta["fit_sample"]
    assert fs["rows"] == 300 and fs["of"] == 600 and fs["seed"] == 5
    assert fs["stratified_by"] == "chrom" and "default for kmeans above 300 rows" in fs["why"]
    assert "fitted on a sample of 300 of 600 rows" in caplog.text
    rows = r.arrays["fit_rows"]
    per_chrom = pd.Series(np.asarray(st.obs["chrom"])[rows]).value_counts().to_dict()
    assert per_chrom == {"chr1": 200, "chr2": 75, "chrM": 25}  # each contig its share
    assert len(r.obs) == 600 and ari(y, r.obs["cluster"]) == 1.0  # every row labelled
    again = pa.kmeans(st, "mixed5", k=4, pca=8, seed=5, run="km2", **SK)
    np.testing.assert_array_equal(again.arrays["fit_rows"], rows)  # seeded


def test_fit_sample_all_and_n_override_the_default(genome_store, monkeypatch):
    st, _ = genome_store
    monkeypatch.setitem(sample.FIT_ROWS, "kmeans", 300)
    r = pa.kmeans(st, "mixed5", k=4, pca=8, fit_sample="all", run="a", **SK)
    assert r.meta["n_fit"] == 600 and r.meta["fit_sample"]["why"] == "--fit-sample all"
    r = pa.kmeans(st, "mixed5", k=4, pca=8, fit_sample="120", run="b", **SK)
    assert r.meta["n_fit"] == 120 and r.meta["fit_sample"]["stratified_by"] == "chrom"
    small = pa.kmeans(st, "mixed5", k=4, pca=8, fit_sample=None, run="c", **SK)
    assert small.meta["n_fit"] == 300
    for bad in ("some", 1, "0"):
        with pytest.raises(AnalysisError, match="--fit-sample"):
            pa.kmeans(st, "mixed5", k=4, fit_sample=bad, run="d", **SK)
    assert "d" not in st.runs


def test_stratified_sample_is_proportional_and_uniform_without_chrom(blob_store_no_chrom):
    rows = sample.stratified_sample(np.repeat([0, 1, 2], [70, 20, 10]), 10, seed=1)
    assert len(rows) == 10 and list(np.bincount(np.repeat([0, 1, 2], [70, 20, 10])[rows])) \
        == [7, 2, 1]
    fs = sample.choose_fit_rows(blob_store_no_chrom, "kmeans", 50, seed=0)
    assert fs.n_fit == 50 and fs.stratified_by is None


@pytest.fixture()
def blob_store_no_chrom(tmp_path):
    x, _ = blobs(200, 8, 2, seed=1)
    return make_store(tmp_path / "b", {"mixed5": x})


# -- chunked passes equal unchunked ones ------------------------------------------------------

@pytest.mark.parametrize("normalize", NORMALIZE)
def test_streamed_features_equal_one_chunk(genome_store, normalize):
    """Normaliser, per-layer PCA, concat PCA fitted over chunks of 7 rows = one chunk."""
    st, _ = genome_store
    rows = np.sort(np.random.default_rng(0).choice(600, 300, replace=False))
    kw = dict(normalize=normalize, pca=5, pca2=4, rows=rows)
    one = fit_features(st, ["mixed5", "mixed7"], chunk=10_000, **kw)
    many = fit_features(st, ["mixed5", "mixed7"], chunk=7, **kw)
    for k, v in one.to_arrays().items():
        np.testing.assert_allclose(many.to_arrays()[k], v, rtol=2e-4, atol=2e-5, err_msg=k)
    np.testing.assert_allclose(many.transform(st, chunk=13), one.transform(st), atol=1e-3)


def test_chunked_labels_equal_unchunked(genome_store):
    st, _ = genome_store
    r = pa.hierarchical_kmeans(st, "mixed5", k=2, split="2,2", pca=6, run="h", **SK)
    fm = FeatureModel.from_run(r.meta, r.arrays)
    from probing.analysis.hierarchical import Hierarchy

    predict = fit.tree_predict(Hierarchy.from_arrays(r.arrays))
    whole = predict(fm.transform(st))
    for size in (1, 17, 600):
        out = stream.label_rows(st.n, fm.reader(st), predict, fm.out_dim, chunk=size)
        # float32 BLAS rounds by block shape: features agree to rounding, labels exactly
        np.testing.assert_allclose(out.arrays["pca"], fm.transform(st), rtol=1e-5, atol=1e-4)
        for col in ("cluster", "level1", "level2", "node"):
            np.testing.assert_array_equal(out.columns[col], whole[col])
            np.testing.assert_array_equal(out.columns[col], r.obs[col].to_numpy())


def test_umap_calls_never_leave_a_small_tail():
    rows = np.arange(120_000)
    parts = stream.umap_chunks(rows, 50_000)
    assert [len(p) for p in parts] == [50_000, 50_000, 20_000]  # a 20k tail: its own call
    assert [len(p) for p in stream.umap_chunks(np.arange(105_000), 50_000)] == [50_000, 55_000]
    np.testing.assert_array_equal(np.concatenate(parts), rows)  # ... every row once


def test_umap_rows_transform_only_rows_outside_the_fit():
    seen = []

    def transform(x):
        seen.append(len(x))
        return np.c_[x[:, 0], -x[:, 0]]

    fitted = (np.array([1, 3]), np.full((2, 2), 9.0, np.float32))
    emb = stream.umap_rows(6, lambda sel: np.arange(6.0)[sel][:, None], transform, 2, fitted,
                           size=3)
    assert seen == [4] and emb[1].tolist() == [9, 9] and emb[5].tolist() == [5, -5]


# -- the guard: advice that the next run follows ----------------------------------------------

@pytest.mark.parametrize("method", sorted(guard.MEMORY_FACTOR))
def test_refusal_advice_passes_without_a_warning(method, caplog):
    avail = 2**33
    try:
        guard.check_scale(50_000_000, 50, method, "sklearn", available=avail)
    except ScaleError as exc:
        n = int(re.search(r"--fit-sample (\d+)", str(exc)).group(1))
    else:
        assert method == "pca"  # fitted from streamed moments: no rows held
        return
    assert n <= sample.FIT_ROWS[method]
    with caplog.at_level(logging.WARNING, logger="dvprobe.analysis"):
        assert guard.check_scale(n, 50, method, "sklearn", available=avail) == []
    assert caplog.text == ""


def test_hierarchical_methods_are_sized_like_kmeans_after_pca():
    """They cluster the same 50 PCA dimensions: a sample k-means may fit, they may too."""
    fixed = guard.fixed_bytes(2_000_000, [768])
    for method in ("kmeans", "hkmeans", "hspectral"):
        n = sample.FIT_ROWS[method]
        assert guard.check_scale(n, 50, method, "sklearn", fixed=fixed, available=8 * 2**30) \
            == []


def test_slow_fit_warning_names_the_default_sample(caplog):
    with caplog.at_level(logging.WARNING, logger="dvprobe.analysis"):
        guard.check_scale(400_000, 50, "umap", "sklearn", available=2**40)
    assert f"sample of {sample.FIT_ROWS['umap']:,}" in caplog.text
    note = guard.umap_transform_note(1_000_000, "sklearn")
    assert "1,000,000 rows" in note and "time left" in note
    assert guard.umap_transform_note(1_000_000, "cuml") is None


def test_multilayer_drops_its_default_umap_on_a_large_store(genome_store, monkeypatch,
                                                            caplog):
    st, _ = genome_store
    monkeypatch.setattr(fit, "DISPLAY_UMAP_ROWS", 500)
    with caplog.at_level(logging.WARNING, logger="dvprobe.analysis"):
        r = pa.multilayer(st, ["mixed5", "mixed7"], per_layer_pca=6, pca=4, k=4, run="ml",
                          **SK)
    assert r.meta["umap"] is None and "no display UMAP by default above 500" in caplog.text


# -- apply and enrich at scale ---------------------------------------------------------------

def test_apply_labels_chunk_by_chunk_like_the_fit(genome_store, monkeypatch):
    st, _ = genome_store
    monkeypatch.setattr(stream, "ROW_CHUNK", 11)
    fitted = pa.kmeans(st, "mixed5", k=4, pca=8, run="km", **SK)
    res = pa.apply(st, "km", st, name="again", **SK)
    np.testing.assert_array_equal(res.run.obs["cluster"], fitted.obs["cluster"])
    assert res.run.meta["cluster"]["sizes"] == fitted.meta["cluster"]["sizes"]


def test_enrich_reads_only_the_columns_it_needs(genome_store, monkeypatch):
    st, y = genome_store
    pa.kmeans(st, "mixed5", k=4, pca=8, run="km", **SK)
    reread = Store(st.path)
    monkeypatch.setattr(Store, "obs", property(lambda self: pytest.fail("whole obs read")))
    asked = []
    real = Store.read_obs
    monkeypatch.setattr(Store, "read_obs", lambda self, cols: asked.append(list(cols))
                        or real(self, cols))
    res = enrich(reread, "km", ["planted"], continuous=["pos"])
    assert sorted(sum(asked, [])) == ["key", "planted", "pos"]  # the join key + what is asked
    best = res.table.sort_values("share_of_cluster").iloc[-1]
    assert best["attribute"] == "planted" and best["share_of_attribute"] == 1.0
    assert set(res.continuous["attribute"]) == {"pos"}
