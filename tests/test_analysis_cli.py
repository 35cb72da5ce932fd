"""``dvprobe reduce / cluster / apply`` on small synthetic STOREs (commands registered alone)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import typer
from sklearn.metrics import adjusted_rand_score as ari
from test_analysis_support import blobs, make_store, nested_blobs
from typer.testing import CliRunner

from probing.analysis.errors import AnalysisError
from probing.commands_analysis import register
from probing.store import open_store


@pytest.fixture(scope="module")
def app():
    a = typer.Typer()
    register(a)
    return a


def _ok(app, args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res.output


def test_cluster_hkmeans_and_apply(app, tmp_path):
    x, group, fine = nested_blobs(300, 12, [2, 2, 2], seed=0)
    src = make_store(tmp_path / "src", {"mixed5": x})
    out = _ok(
        app,
        [
            "cluster",
            tmp_path / "src",
            "--method",
            "hkmeans",
            "--k",
            3,
            "--split",
            "2,2,2",
            "--pca",
            0,
            "--run",
            "hkm",
            "--backend",
            "sklearn",
        ],
    )
    assert "run 'hkm' (hkmeans" in out and "split=[2, 2, 2]" in out
    r = src.load_run("hkm")
    assert ari(fine, r.obs["cluster"]) == 1.0

    xn = x[:20] + 0.01
    make_store(tmp_path / "tgt", {"mixed5": xn}, {"mosaic": ["y"] * 5 + ["n"] * 15})
    out = _ok(
        app,
        [
            "apply",
            tmp_path / "src",
            "--run",
            "hkm",
            "--to",
            tmp_path / "tgt",
            "--label-col",
            "mosaic",
            "--backend",
            "sklearn",
        ],
    )
    assert "20 examples by node" in out and "mosaic" in out
    applied = open_store(tmp_path / "tgt").load_run("hkm-applied")
    np.testing.assert_array_equal(applied.obs["node"], r.obs["node"][:20])


def test_cluster_kmeans_multilayer_and_reduce(app, tmp_path):
    x, y = blobs(200, 20, 3, seed=1)
    st = make_store(tmp_path / "s", {"mixed3": x[:, :8], "mixed5": x[:, 8:]})
    _ok(
        app,
        [
            "cluster",
            tmp_path / "s",
            "--k",
            3,
            "--pca",
            5,
            "--backend",
            "sklearn",
            "--fit-sample",
            150,
        ],
    )
    r = st.load_run("kmeans3-mixed5")
    assert r.meta["n_fit"] == 150 and ari(y, r.obs["cluster"]) == 1.0
    assert r.meta["fit_sample"]["why"] == "--fit-sample 150"
    out = _ok(
        app,
        [
            "cluster",
            tmp_path / "s",
            "--method",
            "multilayer",
            "--layers",
            "mixed3,mixed5",
            "--layer-pca",
            6,
            "--pca",
            4,
            "--k",
            3,
            "--no-umap",
            "--run",
            "ml",
            "--backend",
            "sklearn",
        ],
    )
    assert "pca2=4" in out
    assert "pca" not in st.load_run("ml").arrays  # recomputed by pa.features, not kept
    assert "fit: all 200 rows" in out
    _ok(
        app,
        [
            "reduce",
            tmp_path / "s",
            "--method",
            "pca",
            "--n-components",
            3,
            "--normalize",
            "l2",
            "--backend",
            "sklearn",
        ],
    )
    assert st.load_run("pca-mixed5").arrays["pca"].shape == (200, 3)


def test_user_errors_are_dvprobe_errors(app, tmp_path):
    x, _ = blobs(50, 6, 2, seed=2)
    make_store(tmp_path / "s", {"mixed5": x})
    for args in (
        ["cluster", tmp_path / "s", "--method", "dbscan"],
        ["cluster", tmp_path / "s", "--method", "multilayer"],
        ["cluster", tmp_path / "s", "--backend", "tpu"],
    ):
        res = CliRunner().invoke(app, [str(a) for a in args])
        assert isinstance(res.exception, AnalysisError), res.output


# -- audit: overwriting, 0 is not "default", options a method would ignore, output order ----

def _fails(app, args) -> BaseException:
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code != 0, res.output
    return res.exception


SK = ["--backend", "sklearn"]


@pytest.fixture()
def store12(tmp_path):
    x, y = blobs(240, 10, 12, seed=3)
    return make_store(tmp_path / "s", {"mixed3": x[:, :5], "mixed5": x}), tmp_path / "s"


def test_cluster_reduce_apply_refuse_to_replace_a_run_without_overwrite(app, store12):
    st, path = store12
    _ok(app, ["cluster", path, "--k", 3, "--pca", 4, "--run", "km", *SK])
    exc = _fails(app, ["cluster", path, "--k", 4, "--pca", 4, "--run", "km", *SK])
    assert isinstance(exc, AnalysisError)
    assert str(exc) == (f"run 'km' already exists in {path}; pass --overwrite (overwrite=True "
                        "from Python) to replace it or choose another --run")
    assert st.load_run("km").meta["cluster"]["k"] == 3
    _ok(app, ["cluster", path, "--k", 4, "--pca", 4, "--run", "km", "--overwrite", *SK])
    assert st.load_run("km").meta["cluster"]["k"] == 4

    _ok(app, ["reduce", path, "--n-components", 2, *SK])
    assert "--overwrite" in str(_fails(app, ["reduce", path, "--n-components", 3, *SK]))
    _ok(app, ["reduce", path, "--n-components", 3, "--overwrite", *SK])

    _ok(app, ["apply", path, "--run", "km", "--to", path, "--name", "again", *SK])
    exc = _fails(app, ["apply", path, "--run", "km", "--to", path, "--name", "again", *SK])
    assert "run 'again' already exists" in str(exc) and "--name" in str(exc)
    _ok(app, ["apply", path, "--run", "km", "--to", path, "--name", "again", "--overwrite",
              *SK])
    exc = _fails(app, ["apply", path, "--run", "km", "--to", path, "--name", "km",
                       "--overwrite", *SK])
    assert "is the run being applied" in str(exc)
    assert "applied_from" not in st.load_run("km").meta


def test_hkmeans_default_names_differ_by_k(app, store12):
    st, path = store12
    _ok(app, ["cluster", path, "--method", "hkmeans", "--k", 2, "--pca", 4, *SK])
    _ok(app, ["cluster", path, "--method", "hkmeans", "--k", 3, "--pca", 4, *SK])
    out = _ok(app, ["cluster", path, "--method", "multilayer", "--layers", "mixed3,mixed5",
                    "--layer-pca", 4, "--pca", 4, "--k", 12, "--no-umap", *SK])
    assert "run 'multilayer12-2layers'" in out
    assert {"hkmeans2-mixed5", "hkmeans3-mixed5", "multilayer12-2layers"} <= set(st.runs)


@pytest.mark.parametrize(("args", "message"), [
    (["cluster", "--k", 0], "--k must be >= 1, got 0"),
    (["cluster", "--k", -3], "--k must be >= 1, got -3"),
    (["cluster", "--k", 241], "--k 241: 240 fitted rows cannot form 241 clusters"),
    (["cluster", "--normalize", "zscore"], "--normalize must be one of none, l2, standardize"),
    (["cluster", "--run", "a/b"], "--run 'a/b': not a valid run name"),
    (["cluster", "--method", "hkmeans", "--k", 3, "--split", "2,2"], "--split gives 2"),
    (["cluster", "--split", "2,2"], "--split is for --method hkmeans or hspectral"),
    (["cluster", "--layers", "mixed3", "--k", 4], "--layers is for --method multilayer, not kmeans"),
    (["cluster", "--method", "multilayer", "--layer", "mixed3"],
     "--layer is for --method pca, umap, kmeans, hkmeans, spectral or hspectral, not multilayer"),
    (["cluster", "--method", "multilayer", "--layers", "mixed3", "--pca", 0],
     "--method multilayer needs --pca > 0"),
    (["cluster", "--method", "multilayer"], "multilayer needs at least one layer (--layers a,b,c"),
    (["cluster", "--landmarks", 50], "--landmarks is for --method spectral or hspectral, not kmeans"),
    (["cluster", "--method", "spectral", "--n-init", 3],
     "--n-init is for --method kmeans, hkmeans or multilayer, not spectral"),
    (["cluster", "--method", "pca"],
     "--method must be kmeans, hkmeans, spectral, hspectral or multilayer, not 'pca'"),
    (["reduce", "--method", "pca", "--pca", 7], "--pca is for --method umap, kmeans"),
    (["reduce", "--method", "kmeans"], "--method must be pca or umap, not 'kmeans'"),
    (["reduce", "--n-components", 0], "--n-components must be >= 1, got 0"),
])
def test_bad_cluster_and_reduce_options_fail_before_fitting(app, store12, monkeypatch, args,
                                                            message):
    from probing.analysis import fit

    st, path = store12
    monkeypatch.setattr(fit, "fit_features", lambda *a, **k: pytest.fail("fitted first"))
    exc = _fails(app, [args[0], path, *args[1:], *SK])
    assert isinstance(exc, AnalysisError) and message in str(exc), exc
    assert st.runs == []


def test_apply_unknown_label_col_fails_before_transforming(app, store12, monkeypatch):
    from probing.analysis.features import FeatureModel

    st, path = store12
    _ok(app, ["cluster", path, "--k", 3, "--pca", 4, "--run", "km", *SK])
    monkeypatch.setattr(FeatureModel, "transform", lambda *a: pytest.fail("transformed"))
    exc = _fails(app, ["apply", path, "--run", "km", "--to", path, "--name", "x",
                       "--label-col", "mosiac", *SK])
    assert "no obs column 'mosiac' for --label-col" in str(exc)


def test_cluster_sizes_print_in_numeric_order(app, store12):
    _, path = store12
    out = _ok(app, ["cluster", path, "--k", 12, "--pca", 6, "--run", "k12", *SK])
    sizes = re.search(r"sizes=\{(.*)\}", out).group(1)
    assert [int(kv.split(":")[0]) for kv in sizes.split(", ")] == list(range(12))
    out = _ok(app, ["cluster", path, "--method", "hkmeans", "--k", 2, "--split", "2,2",
                    "--pca", 6, *SK])
    sizes = re.search(r"sizes=\{(.*)\}", out).group(1)
    assert [kv.split(":")[0] for kv in sizes.split(", ")] == ["0", "0.0", "0.1", "1", "1.0",
                                                              "1.1"]


def test_options_left_out_take_the_apis_defaults(app, store12):
    """The command passes only what was typed: a run's recorded options are the API's."""
    from probing.analysis import METHODS

    st, path = store12
    _ok(app, ["cluster", path, "--method", "multilayer", "--layers", "mixed3,mixed5",
              "--layer-pca", 4, "--pca", 4, "--no-umap", "--run", "ml", *SK])
    _ok(app, ["cluster", path, "--method", "hspectral", "--split", "2,2,2", "--pca", 0,
              "--run", "hsp", *SK])
    for run, method, typed in (("ml", "multilayer", {"layers": ["mixed3", "mixed5"],
                                                      "per_layer_pca": 4, "pca": 4,
                                                      "umap": False}),
                               ("hsp", "hspectral", {"split": "2,2,2", "pca": None})):
        m = METHODS[method]
        expected = {"method": method, **{o: m.default(o) for o in m.option_names}, **typed}
        assert st.load_run(run).meta["params"] == expected
