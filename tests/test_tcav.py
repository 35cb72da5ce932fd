"""Specification of ``dvprobe tcav`` (:mod:`probing.tcav`): planted truth, so it can fail."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_analysis_support import make_store
from test_explain import SHAPE, pileups, write_examples
from torch import nn
from typer.testing import CliRunner

import dvtorch
from probing.examples import example_key
from probing.explain import ExplainError, StoreBundleWarning, scaled
from probing.store import open_store
from probing.tcav import (
    TcavError,
    draw_sets,
    fit_cav,
    load_tcav,
    save_tcav,
    significance,
    tcav,
)

K, R1, R2 = 4, 10, 30  # the planted model reads channel K in rows R1..R2, nothing else


class Head(nn.Module):
    """Logits from feature 0 of the map only: hom_alt rises with it, hom_ref falls."""

    def forward(self, f):
        s = f[:, 0, R1:R2 + 1].mean(dim=(1, 2))
        return torch.stack([-3 * s, torch.zeros_like(s), 3 * s], 1)


class PlantedNet(nn.Module):
    """Provably uses one thing: a 1x1 conv ``mixed5`` whose feature 0 is channel K (the
    other five mix the other channels), then ``logits`` that read feature 0 in rows R1..R2."""

    def __init__(self):
        super().__init__()
        self.mixed5 = nn.Conv2d(7, 6, 1)
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(6, 7, 1, 1, generator=gen)
        w[:, K] = 0
        w[0] = 0
        w[0, K] = 1
        with torch.no_grad():
            self.mixed5.weight.copy_(w)
            self.mixed5.bias.zero_()
        self.logits = Head()

    def forward(self, x):
        return torch.softmax(self.logits(self.mixed5(x.permute(0, 3, 1, 2))), dim=1)


def planted_store(tmp_path: Path, n: int = 80, seed: int = 0):
    """Examples with many alt reads (the concept ``alt_rich``, every other one) or few, a
    random yes/no column ``coin``, and a STORE of PlantedNet's mean-pooled ``mixed5`` rows
    (keys, shard, record and the examples file recorded, as extract records them)."""
    rich = np.arange(n) % 2 == 0
    images = np.concatenate([pileups(1, seed=seed + i, alt_frac=0.9 if r else 0.1)
                             for i, r in enumerate(rich)])
    spec = write_examples(tmp_path / "ex.tfrecord.gz", images)
    model = PlantedNet().eval()
    with torch.no_grad():
        rows = model.mixed5(scaled(images).permute(0, 3, 1, 2)).mean(dim=(2, 3)).numpy()
        probs = model(scaled(images)).numpy()
    keys = [example_key("chr20", 1000 + 10 * i, "A", ["C"], [0]) for i in range(n)]
    coin = np.random.default_rng(seed + 1).random(n) < 0.5
    st = make_store(tmp_path / "store", {"mixed5": rows},
                    {"key": keys, "shard": np.zeros(n, int), "record": np.arange(n),
                     "chrom": ["chr20"] * n, "pos": 1000 + 10 * np.arange(n) * 100_000,
                     "pred_genotype": probs.argmax(1), "alt_rich": rich, "coin": coin},
                    pool="mean")
    meta = json.loads((st.path / "store.json").read_text())
    meta["shards"] = [str(Path(spec).resolve())]
    (st.path / "store.json").write_text(json.dumps(meta))
    return open_store(st.path), model


def test_a_concept_the_model_uses_scores_near_one_and_a_coin_is_not_significant(tmp_path):
    store, model = planted_store(tmp_path)
    res = tcav(store, model=model, concepts=["alt_rich", "coin"], target="hom_alt",
               n_examples=30, n_concept=20, block_bp=100_000, progress=False)
    t = res.table.set_index("concept")
    used = t.loc["alt_rich"]
    assert used["score_mean"] >= 0.95
    assert used["significant"] and used["p_bonferroni"] < 0.05
    assert used["cav_auroc"] > 0.9
    coin = t.loc["coin"]
    assert not coin["significant"]
    random = res.scores.query("kind == 'random'")["score"]
    assert 0.25 <= random.mean() <= 0.75  # random directions: up as often as down
    called = int((store.obs["pred_genotype"] == 2).sum())  # only examples called hom_alt
    assert (res.table["n_examples"] == min(30, called)).all()
    assert res.params["targets"] == {"hom_ref": 0, "het": 0, "hom_alt": min(30, called)}


def test_tcav_scores_are_the_share_of_positive_directional_derivatives():
    grads = np.array([[1.0, 0.0], [-1.0, 0.0], [2.0, 1.0], [0.0, 0.0]])
    from probing.tcav import tcav_score

    assert tcav_score(grads, np.array([1.0, 0.0])) == 0.5  # a zero derivative is not positive
    assert tcav_score(grads, np.array([0.0, 1.0])) == 0.25


def test_a_cav_points_from_the_random_set_to_the_concept_in_activation_units():
    rng = np.random.default_rng(0)
    neg = rng.normal(0, 1, (50, 3)) * [1, 100, 1]
    pos = neg + [0, 0, 3]
    v = fit_cav(pos, neg, seed=0)
    assert np.linalg.norm(v) == pytest.approx(1)
    assert np.argmax(np.abs(v)) == 2 and v[2] > 0


def test_random_sets_are_disjoint_and_never_hold_the_concept():
    has = np.arange(100) % 4 == 0
    sets = draw_sets(has, n_concept=30, n_random=10, seed=1)
    assert len(sets.concept) == 10 and len(sets.concept[0]) == 25
    for c, a, b in zip(sets.concept, sets.random_a, sets.random_b, strict=True):
        assert has[c].all() and not has[a].any() and not has[b].any()
        assert not set(a) & set(b)


def test_significance_is_a_two_sided_welch_test():
    from scipy.stats import ttest_ind

    a, b = np.array([0.9, 0.95, 1.0, 0.85]), np.array([0.4, 0.6, 0.5, 0.55])
    t, p = significance(a, b)
    assert p == pytest.approx(ttest_ind(a, b, equal_var=False).pvalue)
    assert significance(b, a)[1] == pytest.approx(p) and t > 0
    assert significance(np.ones(10), np.ones(10)) == (0.0, 1.0)
    assert significance(np.ones(10), np.zeros(10))[1] == 0.0


def test_results_are_saved_in_the_store_without_pickle(tmp_path):
    store, model = planted_store(tmp_path, n=40)
    res = tcav(store, model=model, concepts=["alt_rich"], n_examples=6, n_concept=10,
               block_bp=0, progress=False)
    path = save_tcav(store, res, "planted")
    assert path == store.path / "tcav" / "planted.json"
    [(name, doc)] = load_tcav(store).items()
    assert name == "planted" and list(doc["table"]["layer"]) == ["mixed5"]
    assert len(doc["scores"]) == 20
    cavs = np.load(path.with_suffix(".npz"), allow_pickle=False)
    assert cavs["mixed5|alt_rich|concept"].shape == (10, 6)


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


def test_a_concept_missing_or_too_rare_is_refused_with_the_counts(tmp_path):
    store, model = planted_store(tmp_path, n=40)
    with pytest.raises(TcavError, match="no concept 'nope'"):
        tcav(store, model=model, concepts=["nope"], progress=False)
    store.add_obs({"rare": np.arange(40) < 4})
    with pytest.raises(TcavError, match=r"rare: 4 example\(s\) have it and 36 do not; TCAV "
                                        r"needs at least 10 with"):
        tcav(store, model=model, concepts=["rare"], progress=False)
    with pytest.raises(TcavError, match="n_random must be >= 10"):
        tcav(store, model=model, concepts=["alt_rich"], n_random=5, progress=False)


@pytest.fixture(scope="module")
def ref_bundle(tmp_path_factory) -> Path:
    """The real architecture, random weights, at the small input (copy it to change it)."""
    return dvtorch.reference_bundle(tmp_path_factory.mktemp("ref") / "b", seed=0,
                                    input_shape=SHAPE)


def other_bundle(bundle: Path, where: Path) -> Path:
    """The same weights under another bundle.json: a bundle that is not the STORE's."""
    shutil.copytree(bundle, where)
    meta = json.loads((bundle / "bundle.json").read_text())
    (where / "bundle.json").write_text(json.dumps({**meta, "note": "another model"}))
    return where


def test_the_cli_takes_the_stores_bundle_and_refuses_it_missing_or_replaced(tmp_path,
                                                                            ref_bundle):
    """End to end on the real architecture: extract, tcav from the STORE's own bundle,
    saved and printed; then the bundle replaced, moved, or another one given."""
    from cli import app
    from probing.extract import ExtractConfig, extract

    bundle = Path(shutil.copytree(ref_bundle, tmp_path / "b"))
    spec = write_examples(tmp_path / "ex.tfrecord.gz", pileups(30, seed=3))
    st = extract(ExtractConfig(bundle, spec, tmp_path / "store", layers=["mixed3", "mixed5"],
                               device="cpu", workers=0, batch_size=16), progress=False)
    st.add_obs({"planted": np.arange(30) % 3 == 0})
    runner = CliRunner()
    args = ["tcav", str(st.path), "--concepts", "planted", "--n-examples", "4",
            "--n-concept", "10", "--block-bp", "0", "--no-progress"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "mixed3" in r.output and "planted: TCAV" in r.output
    assert set(load_tcav(st)) == {"tcav"}
    other = other_bundle(bundle, tmp_path / "other")
    with pytest.warns(StoreBundleWarning, match="is not the bundle"):
        tcav(st, model=other, concepts=["planted"], n_examples=2, n_concept=10, block_bp=0,
             progress=False)
    shutil.copy(other / "bundle.json", bundle / "bundle.json")
    with pytest.raises(ExplainError, match="was replaced since the extraction.*--model"):
        tcav(st, concepts=["planted"], progress=False)
    shutil.rmtree(bundle)
    r = runner.invoke(app, args)
    assert isinstance(r.exception, ExplainError)
    assert "is missing" in str(r.exception) and "--model" in str(r.exception)


def test_explain_from_a_store_cluster_warns_when_the_bundle_is_not_the_stores(tmp_path,
                                                                              ref_bundle):
    from test_explain import _clustered_store

    spec = write_examples(tmp_path / "ex.tfrecord.gz", pileups(4, seed=4))
    st = _clustered_store(tmp_path, spec, 4)
    meta = json.loads((st.path / "store.json").read_text())
    meta["inputs"]["bundle_sha256"] = "0" * 64  # extracted with some other model
    (st.path / "store.json").write_text(json.dumps(meta))
    st = open_store(st.path)
    from probing.explain import Selection, explain

    with pytest.warns(StoreBundleWarning):
        explain(ref_bundle, None, Selection(store=st, run="k", cluster="1", n=1), steps=1,
                progress=False)


# --------------------------------------------------------------------------------------
# The report's attribution view
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def attributed_store(tmp_path_factory):
    """The report tests' STORE, with what explain, ablate and tcav save in it: a cluster's
    examples explained and ablated (the planted-region model), and a TCAV result."""
    from test_explain import RegionModel
    from test_report import build_store

    from probing.ablate import ablate
    from probing.explain import Selection, explain
    from probing.tcav import TcavResult

    st = build_store(tmp_path_factory.mktemp("attributed"), n=60)
    pick = Selection(store=st, run="kmeans5-mixed5", cluster="2", n=3)
    explain(RegionModel(), None, pick, steps=4, save_in=st, name="cluster2", progress=False)
    ablate(RegionModel(), None, select=pick, n=12, bootstrap=50, save_in=st, progress=False)
    layers = ["mixed1", "mixed5", "mixed10"]
    table = pd.DataFrame([{"layer": layer, "concept": c, "score_mean": s, "score_sd": 0.05,
                           "random_mean": 0.5, "random_sd": 0.2, "t": 3.0, "p": p,
                           "cav_auroc": 0.8, "n_set": 8, "n_with": 8, "n_examples": 20,
                           "p_bonferroni": min(1.0, 6 * p), "significant": 6 * p < 0.05}
                          for layer in layers for c, s, p in (("mosaic", 0.9, 0.001),
                                                               ("rmsk_LINE", 0.55, 0.5))])
    scores = pd.DataFrame([{"layer": "mixed5", "concept": "mosaic", "kind": k, "cav": i,
                            "score": 0.5} for k in ("concept", "random") for i in range(10)])
    save_tcav(st, TcavResult(table, scores, {"mixed5|mosaic|concept": np.zeros((10, 2))},
                             {"n_examples": 20, "n_random": 10, "output": "logit",
                              "target": "predicted"}), "tcav")
    return open_store(st.path)


def test_the_report_draws_tcav_beside_the_probes_ablation_bars_and_attributions(
        attributed_store, tmp_path):
    import re

    from probing import report as rp

    st = attributed_store
    res = rp.build_report(st, tmp_path / "r.html", max_points=20, thumbnails=4)
    page = (tmp_path / "r.html").read_text()
    titles = "\n".join(res.figures)
    assert "tcav: concepts encoded and used" in titles
    assert "ablation: channel importance" in titles
    assert "Significant: mosaic at mixed1 (0.90), mosaic at mixed5 (0.90)" in page
    assert "encoded: probe AUROC" in page and "used: TCAV score" in page
    # every explained example is plotted, flagged, and has its attribution images
    explained = pd.read_csv(st.path / "attributions" / "cluster2" / "explain.csv")
    rows = set(st.align_keys(st.keys, "x")[np.isin(st.keys, explained["key"])].tolist())
    pts = json.loads(re.search(r"const POINTS = (\[.*?\]);\n", page).group(1))
    assert rows <= {p["row"] for p in pts}
    assert {p["row"] for p in pts if p["attribution"]} == rows
    attr = json.loads(re.search(r"const ATTR = (\{.*?\});\n", page).group(1))
    assert {int(r) for r in attr} == rows
    one = next(iter(attr.values()))
    assert len(one["ch"]) == 8 and one["ch"][0][1].startswith("data:image/png;base64,")
    assert "IG of p(" in one["title"]
    assert not re.search(r"<script[^>]*\bsrc=", page) and "default-src 'none'" in page


def test_results_of_examples_not_in_the_store_are_not_saved_there(attributed_store,
                                                                   tmp_path):
    from test_explain import RegionModel

    from probing.explain import explain

    spec = write_examples(tmp_path / "ex.tfrecord.gz", pileups(1, seed=1))
    with pytest.raises(ExplainError, match=r"1 explained example\(s\) are not in"):
        explain(RegionModel(), spec, steps=2, save_in=attributed_store, progress=False)


def test_the_attribution_view_renders_offline_in_chromium(attributed_store, tmp_path):
    from test_report import CHROMIUM, _chromium

    from probing import report as rp

    if CHROMIUM is None:
        pytest.skip("Chromium not installed (apt-get install chromium; scripts/test.sh "
                    "does this in CI)")
    res = rp.build_report(attributed_store, tmp_path / "r.html", max_points=20, thumbnails=4)
    dom = _chromium((tmp_path / "r.html").as_uri(), tmp_path, "--dump-dom")
    n = len(res.figures)
    assert f'data-rendered="{n}"' in dom.stdout and 'data-failed="0"' in dom.stdout, \
        dom.stdout[-3000:]
    assert 'alt="attribution: all channels (sum)"' in dom.stdout  # the first point's panel
