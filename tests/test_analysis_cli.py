"""``dvprobe reduce / cluster / apply`` on small synthetic STOREs (commands registered alone)."""

from __future__ import annotations

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
    assert st.load_run("ml").arrays["pca"].shape == (200, 4)
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
