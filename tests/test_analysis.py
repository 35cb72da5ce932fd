"""Analysis engine on small synthetic STOREs (CPU, scikit-learn backend)."""

from __future__ import annotations

import logging
import pickle
import re

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.datasets import make_circles
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score as ari
from test_analysis_support import blobs, make_store, nested_blobs

from probing import analysis as pa
from probing.analysis import backends, guard
from probing.analysis.errors import AnalysisError, BackendError, ScaleError
from probing.analysis.features import FeatureModel
from probing.analysis.hierarchical import Hierarchy
from probing.store import StoreError

SK = {"backend": "sklearn"}


@pytest.fixture(scope="module")
def blob_data():
    return blobs(400, 24, 4, seed=0)


@pytest.fixture()
def blob_store(tmp_path, blob_data):
    x, y = blob_data
    return make_store(tmp_path / "blobs", {"mixed5": x}, {"truth": y})


# -- k-means / PCA agree with scikit-learn ----------------------------------------------------

def test_kmeans_blobs_recovers_truth(blob_store, blob_data):
    r = pa.kmeans(blob_store, "mixed5", k=4, pca=8, seed=0, run="km", **SK)
    assert ari(blob_data[1], r.obs["cluster"]) == 1.0
    assert "pca" not in r.arrays  # a clustering run keeps no per-row features ...
    assert pa.features(blob_store, "km").shape == (400, 8)  # ... they are recomputed
    assert r.arrays["flat.protos"].shape == (4, 8)
    assert sum(r.meta["cluster"]["sizes"].values()) == 400
    assert list(r.obs["key"][:2]) == ["chr1:0:A>C:1", "chr1:1:A>C:1"]


def test_kmeans_matches_sklearn(blob_store, blob_data):
    x = blob_data[0]
    r = pa.kmeans(blob_store, "mixed5", k=5, pca=None, n_init=3, seed=7, run="km", **SK)
    ref = KMeans(n_clusters=5, n_init=3, random_state=7).fit(x)
    np.testing.assert_allclose(r.arrays["flat.protos"], ref.cluster_centers_, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_array_equal(r.obs["cluster"].to_numpy(), ref.predict(x))


def test_pca_matches_sklearn_up_to_sign(blob_store, blob_data):
    """The streamed covariance PCA is scikit-learn's full PCA: the same coordinates where
    components are well defined (the 3 between 4 blobs; the others span isotropic noise, 2000x
    smaller, where any float32 PCA picks its own basis) and the same variances."""
    x = blob_data[0]
    r = pa.pca(blob_store, "mixed5", n_components=6, **SK)
    ref = PCA(n_components=6, svd_solver="full").fit(x)
    z, zr = r.arrays["pca"], ref.transform(x)
    for j in range(3):
        s = np.sign(z[:, j] @ zr[:, j])
        np.testing.assert_allclose(z[:, j], s * zr[:, j], rtol=1e-4, atol=1e-4)
    exact = np.linalg.eigvalsh(np.cov(x.astype(np.float64).T))[::-1][:6]
    np.testing.assert_allclose(r.arrays["feat.mixed5.pca.explained_variance"], exact,
                               rtol=1e-4)
    comp = r.arrays["feat.mixed5.pca.components"]
    big = comp[np.arange(6), np.abs(comp).argmax(axis=1)]
    assert (big > 0).all()  # canonical sign rule


def test_normalizers_and_bad_option(blob_store, blob_data):
    r = pa.pca(blob_store, "mixed5", n_components=3, normalize="standardize", **SK)
    np.testing.assert_allclose(r.arrays["feat.mixed5.norm_mean"], blob_data[0].mean(0),
                               rtol=1e-4, atol=1e-4)
    r = pa.pca(blob_store, "mixed5", n_components=3, normalize="l2", **SK)
    assert r.arrays["feat.mixed5.norm_mean"].size == 0
    with pytest.raises(AnalysisError, match="--normalize"):
        pa.pca(blob_store, "mixed5", normalize="zscore", **SK)


def test_same_seed_same_result(blob_store):
    a = pa.hierarchical_kmeans(blob_store, "mixed5", k=2, split="auto", pca=8, seed=3,
                               min_cluster_size=20, run="a", **SK)
    b = pa.hierarchical_kmeans(blob_store, "mixed5", k=2, split="auto", pca=8, seed=3,
                               min_cluster_size=20, run="b", **SK)
    np.testing.assert_array_equal(a.obs["cluster"], b.obs["cluster"])
    np.testing.assert_array_equal(a.arrays["h.l2.protos"], b.arrays["h.l2.protos"])


# -- hierarchical -----------------------------------------------------------------------------

def test_hkmeans_explicit_split_labels_and_sizes(tmp_path):
    x, group, fine = nested_blobs(600, 16, [2, 2, 2], seed=1)
    st = make_store(tmp_path / "s", {"mixed5": x})
    r = pa.hierarchical_kmeans(st, "mixed5", k=3, split="2,2,2", pca=None, run="h", **SK)
    assert ari(group, r.obs["level1"]) == 1.0
    assert ari(fine, r.obs["cluster"]) == 1.0
    assert all(re.fullmatch(r"[0-2]\.[01]", s) for s in r.obs["node"])
    sizes = r.meta["cluster"]["level_sizes"]
    assert sum(sizes[str(c)] for c in range(3)) == 600
    for c in range(3):
        assert sizes[f"{c}.0"] + sizes[f"{c}.1"] == sizes[str(c)]
    assert r.meta["cluster"]["split"] == [2, 2, 2]
    # flat label = position of (level1, level2) in the node table
    nodes = r.arrays["h.nodes"]
    np.testing.assert_array_equal(nodes[r.obs["cluster"]],
                                  r.obs[["level1", "level2"]].to_numpy())


def test_hkmeans_auto_split_follows_structure(tmp_path):
    x, group, fine = nested_blobs(900, 16, [2, 3, 4], seed=2)
    st = make_store(tmp_path / "s", {"mixed5": x})
    r = pa.hierarchical_kmeans(st, "mixed5", k=3, split="auto", pca=None, max_split=5,
                               min_cluster_size=20, run="h", **SK)
    assert ari(group, r.obs["level1"]) == 1.0
    assert sorted(r.meta["cluster"]["split"]) == [2, 3, 4]
    assert ari(fine, r.obs["cluster"]) == 1.0
    assert "silhouette" in r.meta["cluster"]["split_rule"]


def test_split_errors(blob_store):
    with pytest.raises(AnalysisError, match="exactly 3"):
        pa.hierarchical_kmeans(blob_store, "mixed5", k=3, split="2,2", **SK)
    with pytest.raises(AnalysisError, match="--split"):
        pa.hierarchical_kmeans(blob_store, "mixed5", k=3, split="2,x,1", **SK)


# -- spectral ---------------------------------------------------------------------------------

def test_spectral_landmarks_blobs(blob_store, blob_data):
    r = pa.spectral(blob_store, "mixed5", k=4, pca=8, n_landmarks=60, run="sp", **SK)
    assert ari(blob_data[1], r.obs["cluster"]) == 1.0
    assert r.arrays["flat.protos"].shape == (60, 8)  # landmarks, not n x n anything
    assert set(r.arrays["flat.labels"]) == {0, 1, 2, 3}


def test_spectral_separates_rings_kmeans_cannot(tmp_path):
    x, y = make_circles(n_samples=800, factor=0.4, noise=0.03, random_state=0)
    st = make_store(tmp_path / "s", {"mixed5": x.astype(np.float32)})
    sp = pa.spectral(st, "mixed5", k=2, pca=None, n_landmarks=300, n_neighbors=10,
                     run="sp", **SK)
    km = pa.kmeans(st, "mixed5", k=2, pca=None, run="km", **SK)
    assert ari(y, sp.obs["cluster"]) == 1.0
    assert ari(y, km.obs["cluster"]) < 0.1


def test_hierarchical_spectral(tmp_path):
    x, group, fine = nested_blobs(600, 16, [2, 2, 2], seed=4)
    st = make_store(tmp_path / "s", {"mixed5": x})
    r = pa.hierarchical_spectral(st, "mixed5", k=3, split=[2, 2, 2], pca=None,
                                 n_landmarks=90, run="hs", **SK)
    assert ari(fine, r.obs["cluster"]) == 1.0
    assert set(r.obs["node"]) == {f"{a}.{b}" for a in range(3) for b in range(2)}


# -- multi-layer ------------------------------------------------------------------------------

def test_multilayer_dimensions_and_clipping(tmp_path, caplog):
    rng = np.random.default_rng(0)
    x, y = blobs(150, 30, 3, seed=5)
    layers = {"mixed3": x[:, :12], "mixed5": x[:, 12:], "mixed7": rng.normal(size=(150, 40))
              .astype(np.float32)}
    st = make_store(tmp_path / "s", layers)
    with caplog.at_level(logging.WARNING, logger="dvprobe.analysis"):
        r = pa.multilayer(st, ["mixed3", "mixed5", "mixed7"], per_layer_pca=200, pca=200, k=3,
                          umap=False, run="ml", **SK)
    f = r.meta["features"]
    assert f["pca"] == {"mixed3": 12, "mixed5": 18, "mixed7": 40}  # clipped to each layer
    assert f["pca2"] == 70 and pa.features(st, "ml").shape == (150, 70)  # 12+18+40 concatenated
    assert "clipped" in caplog.text
    r = pa.multilayer(st, ["mixed3", "mixed5", "mixed7"], per_layer_pca=10, pca=12, k=3,
                      umap=False, run="ml2", **SK)
    assert r.arrays["feat.concat.pca.components"].shape == (12, 30)
    assert pa.features(st, "ml2").shape == (150, 12)
    assert len(set(r.obs["cluster"])) == 3


# -- apply, persistence -----------------------------------------------------------------------

@pytest.mark.parametrize("method", ["kmeans", "hkmeans", "spectral", "multilayer"])
def test_apply_to_training_store_reproduces_labels(blob_store, method, monkeypatch):
    if method == "kmeans":
        pa.kmeans(blob_store, "mixed5", k=4, pca=8, run="r", **SK)
    elif method == "hkmeans":
        pa.hierarchical_kmeans(blob_store, "mixed5", k=2, split="2,2", pca=8, run="r", **SK)
    elif method == "spectral":
        pa.spectral(blob_store, "mixed5", k=4, pca=8, n_landmarks=50, run="r", **SK)
    else:
        pa.multilayer(blob_store, ["mixed5"], per_layer_pca=10, pca=6, k=4, umap=False,
                      run="r", **SK)
    # re-applying plain-array models must never unpickle anything
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    res = pa.apply(blob_store, "r", blob_store, name="again", **SK)
    fitted = blob_store.load_run("r")
    np.testing.assert_array_equal(res.run.obs["cluster"], fitted.obs["cluster"])
    assert sorted(res.run.arrays) == sorted(fitted.arrays.keys() & {"umap"})
    assert int(res.counts["n"].sum()) == 400


def test_apply_new_examples_land_in_their_clusters(tmp_path):
    centers = np.random.default_rng(9).normal(0, 10, size=(4, 24))
    x, y = blobs(400, 24, centers, seed=10)
    xn, yn = blobs(60, 24, centers, seed=11)
    src = make_store(tmp_path / "src", {"mixed5": x})
    tgt = make_store(tmp_path / "tgt", {"mixed5": xn}, {"mosaic": np.where(yn == 2, "yes",
                                                                             "no")})
    fitted = pa.kmeans(src, "mixed5", k=4, pca=8, run="km10", **SK)
    res = pa.apply(src, "km10", tgt, label_col="mosaic", **SK)
    # each new point lands in the cluster its blob formed in the training STORE
    blob_to_cluster = {b: int(fitted.obs["cluster"][y == b].iloc[0]) for b in range(4)}
    np.testing.assert_array_equal(res.run.obs["cluster"], [blob_to_cluster[b] for b in yn])
    assert res.run.name == "km10-applied" and "km10-applied" in tgt.runs
    assert list(res.counts.index) == ["0", "1", "2", "3"]
    c_m = str(blob_to_cluster[2])
    assert res.crosstab.loc["yes", c_m] == (yn == 2).sum()
    assert res.crosstab.loc["yes"].sum() == res.crosstab.loc["yes", c_m]
    assert res.run.meta["applied_from"]["run"] == "km10"
    assert "examples by cluster" in str(res)


def test_apply_refuses_mismatched_layers(tmp_path, blob_store):
    pa.kmeans(blob_store, "mixed5", k=4, pca=8, run="r", **SK)
    other = make_store(tmp_path / "o", {"mixed5": np.zeros((10, 7), np.float32)})
    with pytest.raises(AnalysisError, match="7 features"):
        pa.apply(blob_store, "r", other, **SK)
    other2 = make_store(tmp_path / "o2", {"mixed4": np.zeros((10, 24), np.float32)})
    with pytest.raises(AnalysisError, match="no layer 'mixed5'"):
        pa.apply(blob_store, "r", other2, **SK)
    with pytest.raises(AnalysisError, match="label-col"):
        pa.apply(blob_store, "r", blob_store, label_col="nope", **SK)


def test_run_round_trip_is_plain_arrays(blob_store):
    r = pa.hierarchical_kmeans(blob_store, "mixed5", k=2, split="2,2", pca=8,
                               normalize="standardize", run="h", **SK)
    again = blob_store.load_run("h")  # np.load(allow_pickle=False) inside
    assert again.meta["files"] == {}
    fm = FeatureModel.from_run(again.meta, again.arrays)
    h = Hierarchy.from_arrays(again.arrays)
    feats = fm.transform(blob_store)
    np.testing.assert_array_equal(feats, pa.features(blob_store, "h"))
    np.testing.assert_array_equal(h.predict(feats)[2], r.obs["cluster"])


def test_fit_sample_fits_subset_and_labels_all(blob_store, blob_data):
    r = pa.kmeans(blob_store, "mixed5", k=4, pca=8, fit_sample=100, run="fs", **SK)
    assert r.meta["n_fit"] == 100 and len(r.arrays["fit_rows"]) == 100
    assert len(r.obs) == 400 and ari(blob_data[1], r.obs["cluster"]) == 1.0
    with pytest.raises(AnalysisError, match="at least 2"):
        pa.kmeans(blob_store, "mixed5", k=4, fit_sample=1, **SK)


# -- UMAP (one fit shared: numba compilation is slow) ----------------------------------------

@pytest.fixture(scope="module")
def umap_stores(tmp_path_factory):
    centers = np.random.default_rng(3).normal(0, 10, size=(3, 16))
    x, y = blobs(240, 16, centers, seed=12)
    xn, yn = blobs(30, 16, centers, seed=13)
    d = tmp_path_factory.mktemp("umap")
    src = make_store(d / "src", {"mixed5": x})
    tgt = make_store(d / "tgt", {"mixed5": xn})
    run = pa.kmeans(src, "mixed5", k=3, pca=8, umap=True, fit_sample=200, seed=0, run="u",
                    **SK)
    return src, tgt, run, y, yn


def test_umap_fit_transform_and_apply(umap_stores):
    src, tgt, run, y, yn = umap_stores
    emb = run.arrays["umap"]
    assert emb.shape == (240, 2) and np.isfinite(emb).all()
    assert run.meta["umap"]["impl"].startswith("umap-learn")
    assert run.meta["files"]["umap_model"]["sha256"]
    # blobs stay apart in the embedding (incl. the 40 rows placed by transform)
    cent = np.array([emb[y == b].mean(0) for b in range(3)])
    assert (np.linalg.norm(emb - cent[y], axis=1) <
            np.min([np.linalg.norm(emb - cent[b], axis=1) for b in range(3)], axis=0) + 1e-6
            ).mean() > 0.95
    res = pa.apply(src, "u", tgt, **SK)
    assert res.run.arrays["umap"].shape == (30, 2)
    new = res.run.arrays["umap"]
    assert (np.argmin(((new[:, None, :] - cent[None]) ** 2).sum(-1), 1) == yn).mean() > 0.9


def test_umap_tampered_model_is_refused(umap_stores, monkeypatch):
    src, tgt, run, _, _ = umap_stores
    blob = run.path / run.meta["files"]["umap_model"]["path"]
    original = blob.read_bytes()
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    try:
        blob.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        with pytest.raises(StoreError, match="sha256"):
            pa.apply(src, "u", tgt, name="t", **SK)
    finally:
        blob.write_bytes(original)


def test_umap_determinism_and_reduce(blob_store):
    a = pa.reduce(blob_store, "mixed5", method="umap", pca=8, seed=1, run="a", **SK)
    b = pa.reduce(blob_store, "mixed5", method="umap", pca=8, seed=1, run="b", **SK)
    np.testing.assert_array_equal(a.arrays["umap"], b.arrays["umap"])
    with pytest.raises(AnalysisError, match="pca or umap"):
        pa.reduce(blob_store, "mixed5", method="tsne", **SK)


# -- backends and scale guard -----------------------------------------------------------------

def test_backend_dispatch_and_logging(monkeypatch, caplog):
    monkeypatch.setattr(backends, "cuml_usable", lambda: False)
    with caplog.at_level(logging.INFO, logger="dvprobe.analysis"):
        assert backends.get_backend("auto").name == "sklearn"
    assert "backend auto -> sklearn" in caplog.text

    class FakeCuml:
        name = "cuml"

    monkeypatch.setattr(backends, "cuml_usable", lambda: True)
    monkeypatch.setattr(backends, "CumlBackend", FakeCuml)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dvprobe.analysis"):
        assert backends.get_backend("auto").name == "cuml"
    assert "backend auto -> cuml" in caplog.text
    with pytest.raises(AnalysisError, match="--backend"):
        backends.get_backend("gpu")


def test_cuml_backend_refused_without_cuml(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_cuml(name, *a, **k):
        if name == "cuml":
            raise ImportError("No module named 'cuml'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_cuml)
    with pytest.raises(BackendError, match="cannot import cuml"):
        backends.get_backend("cuml")


def test_umap_model_needs_its_own_library():
    sk = backends.SklearnBackend()
    assert backends.backend_for_umap("umap-learn 0.5.12", sk) is sk
    if not backends.cuml_usable():
        with pytest.raises(BackendError, match="needs cuML"):
            backends.backend_for_umap("cuml 25.10", sk)


def test_scale_guard(blob_store, monkeypatch, caplog):
    with pytest.raises(ScaleError, match="--fit-sample"):
        guard.check_scale(10_000_000, 768, "kmeans", "sklearn", available=2**30)
    with caplog.at_level(logging.WARNING, logger="dvprobe.analysis"):
        w = guard.check_scale(300_000, 50, "umap", "sklearn", available=2**40)
    assert w and "--fit-sample" in caplog.text
    assert guard.check_scale(300_000, 50, "umap", "cuml", available=2**40) == []
    assert guard.available_memory() > 0
    # the API consults the guard before reading or fitting anything
    monkeypatch.setattr(guard, "available_memory", lambda: 1000)
    with pytest.raises(ScaleError, match="needs ~"):
        pa.kmeans(blob_store, "mixed5", k=4, **SK)
    assert "kmeans10-mixed5" not in blob_store.runs


def test_scale_guard_counts_the_clustering_space_not_the_layer(blob_store, monkeypatch):
    """Features are streamed: the fit holds the sample in the space it clusters in (8 PCA
    dimensions here), so what the raw 24-wide layer would need is no reason to refuse."""
    # 400 rows x 24 x 4 B x 3 = 115 kB would not pass; 400 x 8 x 4 B x 3 = 38 kB does
    fixed = guard.fixed_bytes(400, [24])
    monkeypatch.setattr(guard, "available_memory", lambda: int((fixed + 60_000) / 0.8))
    with pytest.raises(ScaleError, match="--fit-sample"):
        pa.kmeans(blob_store, "mixed5", k=4, pca=None, **SK)
    pa.kmeans(blob_store, "mixed5", k=4, pca=8, run="ok", **SK)


def test_a_reordered_obs_cannot_scramble_a_runs_keys(blob_store):
    """A notebook sorting ``store.obs`` in place must not change which key a row gets."""
    keys = blob_store.obs["key"].to_numpy().copy()
    blob_store.obs.sort_values("key", ascending=False, inplace=True)
    r = pa.kmeans(blob_store, "mixed5", k=4, pca=8, run="sorted", **SK)
    assert (r.obs["key"].to_numpy() == keys).all()
    assert (blob_store.load_run("sorted").obs["key"].to_numpy() == keys).all()
    assert (blob_store.obs["key"].to_numpy() == keys).all()  # read again in row order


def test_user_errors(blob_store, tmp_path):
    with pytest.raises(AnalysisError, match="no layer 'mixed9'"):
        pa.kmeans(blob_store, "mixed9", k=3, **SK)
    with pytest.raises(AnalysisError, match="at least one layer"):
        pa.multilayer(blob_store, [], **SK)
    with pytest.raises(AnalysisError, match="names mixed5 more than once"):
        pa.multilayer(blob_store, ["mixed5", "mixed5"], **SK)
    with pytest.raises(AnalysisError, match="cannot form"):
        pa.kmeans(blob_store, "mixed5", k=500, pca=None, **SK)
    with pytest.raises(StoreError, match="no run"):
        pa.apply(blob_store, "missing", blob_store, **SK)


# -- audit: apply across extractions, overwriting, early option checks, partial STOREs ------

MODEL_A, MODEL_B = "a1" * 32, "b2" * 32
EXTRACTED = {"bundle_sha256": MODEL_A, "pool": "max", "dtype": "fp32"}


@pytest.fixture()
def logged(caplog):
    """caplog for the engine's logger even after a CLI test turned its propagation off."""
    lg = logging.getLogger("dvprobe.analysis")
    caplog.set_level(logging.INFO, logger="dvprobe.analysis")
    direct = not lg.propagate
    if direct:
        lg.addHandler(caplog.handler)
    yield caplog
    if direct:
        lg.removeHandler(caplog.handler)


def _fitted(tmp_path, blob_data, **inputs):
    """A STORE extracted as EXTRACTED with a fitted k-means run "km", and new examples of
    the same data extracted with ``inputs`` changed (plus how every layer was pooled)."""
    x, _ = blob_data
    pool = inputs.pop("layer_pool", "max")
    src = make_store(tmp_path / "src", {"mixed5": x}, inputs=EXTRACTED)
    tgt = make_store(tmp_path / "tgt", {"mixed5": x[:30]}, inputs={**EXTRACTED, **inputs},
                     pool=pool)
    pa.kmeans(src, "mixed5", k=4, pca=8, run="km", **SK)
    return src, tgt


def test_apply_refuses_a_store_of_another_model(tmp_path, blob_data):
    src, tgt = _fitted(tmp_path, blob_data, bundle_sha256=MODEL_B)
    with pytest.raises(pa.AnalysisError, match=r"different models \(bundle sha256 "
                       r"a1a1a1a1a1a1 vs b2b2b2b2b2b2\)"):
        pa.apply(src, "km", tgt, **SK)
    assert tgt.runs == []


def test_apply_refuses_a_store_pooled_differently(tmp_path, blob_data):
    src, tgt = _fitted(tmp_path, blob_data, pool="mean", layer_pool="mean")
    with pytest.raises(pa.AnalysisError, match=f"layer 'mixed5' is max-pooled in {src.path} "
                       f"and mean-pooled in {tgt.path}; re-extract {tgt.path} with --pool max"):
        pa.apply(src, "km", tgt, **SK)
    assert tgt.runs == []


def test_apply_across_dtypes_of_one_model_warns_once(tmp_path, blob_data, logged):
    src, tgt = _fitted(tmp_path, blob_data, dtype="bf16")
    res = pa.apply(src, "km", tgt, **SK)
    assert int(res.counts["n"].sum()) == 30
    warns = [r.getMessage() for r in logged.records if r.levelno == logging.WARNING]
    assert len(warns) == 1 and "fp32" in warns[0] and "bf16" in warns[0]


def test_apply_never_replaces_the_run_it_applies(blob_store):
    fitted = pa.kmeans(blob_store, "mixed5", k=4, pca=8, run="km", **SK)
    with pytest.raises(pa.AnalysisError, match="--name 'km' is the run being applied"):
        pa.apply(blob_store, "km", blob_store, name="km", overwrite=True, **SK)
    assert blob_store.load_run("km").meta["created"] == fitted.meta["created"]
    assert "applied_from" not in blob_store.load_run("km").meta


def test_api_replaces_runs_unless_told_not_to(blob_store):
    pa.kmeans(blob_store, "mixed5", k=4, pca=8, run="km", **SK)
    assert pa.kmeans(blob_store, "mixed5", k=3, pca=8, run="km", **SK).meta["cluster"]["k"] == 3
    with pytest.raises(pa.AnalysisError, match="run 'km' already exists .* --overwrite"):
        pa.kmeans(blob_store, "mixed5", k=5, pca=8, run="km", overwrite=False, **SK)
    pa.apply(blob_store, "km", blob_store, name="again", **SK)
    with pytest.raises(pa.AnalysisError, match="run 'again' already exists .* --name"):
        pa.apply(blob_store, "km", blob_store, name="again", overwrite=False, **SK)
    assert blob_store.load_run("km").meta["cluster"]["k"] == 3


def test_default_names_carry_k_and_the_layer_count(blob_store):
    assert pa.hierarchical_kmeans(blob_store, k=2, split="2,2", pca=8, **SK).name == \
        "hkmeans2-mixed5"
    assert pa.hierarchical_kmeans(blob_store, k=3, split="auto", pca=8, **SK).name == \
        "hkmeans3-mixed5"
    assert pa.kmeans(blob_store, k=4, pca=8, **SK).name == "kmeans4-mixed5"
    assert pa.pca(blob_store, n_components=3, **SK).name == "pca-mixed5"


def test_multilayer_default_name_is_readable(tmp_path, blob_data):
    x, _ = blob_data
    st = make_store(tmp_path / "two", {"mixed3": x[:, :12], "mixed5": x[:, 12:]})
    r = pa.multilayer(st, ["mixed3", "mixed5"], per_layer_pca=4, pca=4, k=3, umap=False, **SK)
    assert r.name == "multilayer3-2layers"


@pytest.mark.parametrize(("call", "message"), [
    (lambda s: pa.kmeans(s, k=0, **SK), "--k must be >= 1, got 0"),
    (lambda s: pa.kmeans(s, k=-2, **SK), "--k must be >= 1, got -2"),
    (lambda s: pa.kmeans(s, k=401, **SK), "--k 401: 400 fitted rows cannot form 401"),
    (lambda s: pa.kmeans(s, k=300, fit_sample=200, **SK), "200 fitted rows cannot form 300"),
    (lambda s: pa.hierarchical_kmeans(s, k=3, split="2,2", **SK), "--split gives 2"),
    (lambda s: pa.kmeans(s, normalize="zscore", **SK), "--normalize must be one of"),
    (lambda s: pa.kmeans(s, pca=-5, **SK), "--pca must be >= 1, got -5"),
    (lambda s: pa.kmeans(s, run="../km", **SK), "--run '../km': not a valid run name"),
    (lambda s: pa.kmeans(s, run=".km", **SK), "not a valid run name"),
    (lambda s: pa.reduce(s, n_components=0, **SK), "--n-components must be >= 1, got 0"),
    (lambda s: pa.reduce(s, method="umap", n_components=0, **SK), "--n-components must"),
    (lambda s: pa.multilayer(s, ["mixed5"], per_layer_pca=0, **SK), "--layer-pca must"),
])
def test_bad_options_fail_before_any_fitting(blob_store, monkeypatch, call, message):
    from probing.analysis import fit

    monkeypatch.setattr(fit, "fit_features", lambda *a, **k: pytest.fail("fitted first"))
    with pytest.raises(pa.AnalysisError, match=re.escape(message)):
        call(blob_store)
    assert blob_store.runs == []


def test_apply_checks_label_col_before_transforming(blob_store, monkeypatch):
    pa.kmeans(blob_store, "mixed5", k=4, pca=8, run="km", **SK)
    monkeypatch.setattr(FeatureModel, "transform", lambda *a: pytest.fail("transformed"))
    with pytest.raises(pa.AnalysisError, match="no obs column 'mosiac' for --label-col"):
        pa.apply(blob_store, "km", blob_store, name="x", label_col="mosiac", **SK)


def test_partial_store_is_analysed_with_one_warning(tmp_path, blob_data, logged):
    x, _ = blob_data
    part = make_store(tmp_path / "part", {"mixed5": x[:300]}, complete=False)
    assert not part.complete
    r = pa.kmeans(tmp_path / "part", "mixed5", k=4, pca=8, run="km", **SK)
    assert len(r.obs) == 300

    def partial_lines():
        return [m for m in logged.messages if "partial STORE" in m]

    (line,) = partial_lines()
    assert f"{part.path}: partial STORE (300 examples): extraction did not finish" in line
    assert "rerun `dvprobe extract`" in line
    logged.clear()
    pa.reduce(tmp_path / "part", n_components=3, **SK)
    pa.apply(tmp_path / "part", "km", tmp_path / "part", name="again", **SK)
    assert len(partial_lines()) == 2  # one per call, also when apply reads it twice


def test_complete_store_gives_no_partial_warning(blob_store, logged):
    pa.kmeans(blob_store, "mixed5", k=4, pca=8, run="km", **SK)
    assert not [m for m in logged.messages if "partial STORE" in m]


def test_apply_prints_where_examples_landed(tmp_path):
    centers = np.random.default_rng(9).normal(0, 10, size=(4, 24))
    x, y = blobs(400, 24, centers, seed=10)
    xn, yn = blobs(40, 24, centers[:3], seed=11)  # 14 from blob 0, 13 each from 1 and 2
    src = make_store(tmp_path / "src", {"mixed5": x})
    tgt = make_store(tmp_path / "tgt", {"mixed5": xn}, {"mosaic": yn == 0})
    fitted = pa.kmeans(src, "mixed5", k=4, pca=8, run="km", **SK)
    c0 = int(fitted.obs["cluster"][y == 0].iloc[0])
    text = str(pa.apply(src, "km", tgt, label_col="mosaic", **SK))
    assert "fraction" not in text  # no raw pandas frame
    assert f"\n40 examples by cluster: 14/40 in cluster {c0} (13 in " in text
    assert re.search(rf"^mosaic=True: 14/14 in cluster {c0}$", text, re.M)
    assert re.search(r"^mosaic=False: 13/26 in cluster \d \(13 in \d\)$", text, re.M)


def test_silhouettes_are_logged_with_three_digits():
    from probing.analysis.hierarchical import format_scores

    assert format_scores({2: 0.27903512120246887, 3: 0.16125114262104034}) == \
        "{2: 0.279, 3: 0.161}"


# -- one entry: pa.cluster(store, method, **options) over the method registry ---------------

def test_an_unknown_method_is_refused_with_the_valid_ones(blob_store):
    with pytest.raises(AnalysisError) as err:
        pa.cluster(blob_store, "dbscan", k=3, **SK)
    assert str(err.value) == ("method must be pca, umap, kmeans, hkmeans, spectral, hspectral "
                              "or multilayer, not 'dbscan'")
    assert pa.method_names() == list(pa.METHODS)
    assert blob_store.runs == []


def test_an_unknown_option_is_refused_with_the_methods_options(blob_store, monkeypatch):
    from probing.analysis import fit

    monkeypatch.setattr(fit, "fit_features", lambda *a, **k: pytest.fail("fitted first"))
    with pytest.raises(AnalysisError) as err:
        pa.cluster(blob_store, "kmeans", n_clusters=3, **SK)
    assert str(err.value) == (
        "method 'kmeans' has no option 'n_clusters' (kmeans options: layer, normalize, pca, "
        "umap, k, n_init; every method: run, overwrite, backend, seed, fit_sample, "
        "scheduler)")
    # an option of another method says which methods take it
    with pytest.raises(AnalysisError, match=r"^--split is for --method hkmeans or hspectral, "
                                            r"not kmeans \(kmeans options: layer,"):
        pa.kmeans(blob_store, split="2,2", **SK)
    with pytest.raises(AnalysisError, match=r"^--landmarks is for --method spectral or "
                                            r"hspectral, not hkmeans"):
        pa.hierarchical_kmeans(blob_store, n_landmarks=50, **SK)
    assert blob_store.runs == []


@pytest.mark.parametrize("method", list(pa.METHODS))
def test_every_option_a_method_lists_is_accepted_with_its_default(method):
    from probing.analysis.methods import options_for

    m = pa.METHODS[method]
    defaults = {name: m.default(name) for name in m.option_names}
    assert options_for(method, defaults) == options_for(method, {})


def test_the_shortcuts_are_cluster_calls_and_runs_record_every_option(blob_store):
    by_entry = pa.cluster(blob_store, "hkmeans", k=2, split="2,2", pca=8, run="a", **SK)
    by_name = pa.hierarchical_kmeans(blob_store, "mixed5", k=2, split="2,2", pca=8, run="b",
                                     **SK)
    np.testing.assert_array_equal(by_entry.obs["node"], by_name.obs["node"])
    assert by_entry.meta["params"] == by_name.meta["params"] == {
        "method": "hkmeans", "layer": "mixed5", "normalize": "none", "pca": 8, "umap": False,
        "k": 2, "split": "2,2", "max_split": 5, "min_cluster_size": 50, "n_init": 10}


def test_multilayer_refuses_to_cluster_without_its_second_pca(blob_store):
    with pytest.raises(AnalysisError, match=re.escape("--method multilayer needs --pca > 0")):
        pa.multilayer(blob_store, ["mixed5"], pca=None, **SK)
