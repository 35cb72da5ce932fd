"""Specification of the per-layer linear probes (``dvprobe probe``, :mod:`probing.probe`)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_analysis_support import make_store
from typer.testing import CliRunner

from probing import probe as pr
from probing.probe import ProbeError, genomic_folds, probe_layers, resolve_concepts

N = 1200
DIM = 64


def _layout(n: int = N, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two chromosomes, 60 Mb of positions: 60 blocks of 1 Mb."""
    rng = np.random.default_rng(seed)
    chrom = np.where(np.arange(n) < n // 2, "chr1", "chr2")
    pos = np.sort(rng.integers(0, 30_000_000, n))
    return chrom, pos


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """``early`` (yes/no) is written into mixed1 only, ``depth`` (a number) into mixed10 only;
    each layer is noise otherwise."""
    rng = np.random.default_rng(1)
    chrom, pos = _layout()
    early = rng.random(N) < 0.3
    depth = rng.normal(30, 8, N)
    mixed1 = rng.normal(size=(N, DIM)).astype(np.float32)
    mixed1[:, :4] += 1.5 * early[:, None]
    mixed10 = rng.normal(size=(N, DIM)).astype(np.float32)
    mixed10[:, 7] += (depth - 30) / 2
    path = tmp_path_factory.mktemp("probe") / "s"
    return make_store(path, {"mixed1": mixed1, "mixed10": mixed10},
                      {"chrom": chrom, "pos": pos, "early": early, "depth": depth,
                       "label": rng.integers(0, 3, N)},
                      inputs={"layers": ["mixed1", "mixed10"]})


def _score(res, layer: str, concept: str) -> float:
    t = res.table
    return float(t[(t["layer"] == layer) & (t["concept"] == concept)]["mean"].iloc[0])


def test_a_concept_is_found_in_the_layer_that_carries_it_and_not_elsewhere(planted):
    res = probe_layers(planted, ["early", "depth"])
    assert _score(res, "mixed1", "early") > 0.9
    assert abs(_score(res, "mixed10", "early") - 0.5) < 0.1  # chance
    assert _score(res, "mixed10", "depth") > 0.8
    assert _score(res, "mixed1", "depth") < 0.05  # no better than the mean
    t = res.table.set_index(["layer", "concept"])
    assert t.loc[("mixed1", "early"), "metric"] == "AUROC"
    assert t.loc[("mixed10", "depth"), "metric"] == "R2"
    assert (res.table["folds"] == 5).all() and (res.table["sd"] >= 0).all()
    assert t.loc[("mixed1", "early"), "n_with"] == int(planted.obs["early"].sum())
    assert res.peaks()[0].startswith("early: best mixed1 (AUROC 0.9")
    assert "mixed10" in res.peaks()[0]  # what the last layer keeps of it
    # layers in extraction order (mixed1 before mixed10), not the STORE's sorted names
    assert list(res.profile().index) == ["mixed1", "mixed10"]


def test_examples_of_one_genomic_block_never_straddle_folds():
    chrom, pos = _layout()
    fold = genomic_folds(chrom, pos, 5, 1_000_000, seed=3)
    blocks = pd.DataFrame({"c": chrom, "b": pos // 1_000_000, "f": fold})
    assert (blocks.groupby(["c", "b"])["f"].nunique() == 1).all()
    sizes = np.bincount(fold, minlength=5)
    largest_block = blocks.groupby(["c", "b"]).size().max()
    assert sizes.max() - sizes.min() <= largest_block  # dealt largest first: near equal
    assert (genomic_folds(chrom, pos, 5, 1_000_000, seed=3) == fold).all()
    assert (genomic_folds(chrom, pos, 5, 1_000_000, seed=4) != fold).any()
    # the same position on two chromosomes is two blocks
    two = genomic_folds(np.array(["a", "b"] * 5), np.zeros(10), 2, 1_000_000)
    assert set(two[::2]) != set(two[1::2]) or len(set(two)) == 2
    with pytest.raises(ProbeError, match="only 2 genomic block"):
        genomic_folds(["chr1"] * 4 + ["chr2"] * 4, [0] * 8, 5, 1_000_000)
    with pytest.raises(ProbeError, match="--folds must be >= 2"):
        genomic_folds(chrom, pos, 1, 1_000_000)


def test_block_folds_stop_a_probe_from_scoring_by_remembering_neighbours(tmp_path):
    """A block-level property with no signal but block identity: random folds put the same
    block on both sides and score it near 1; block folds score chance."""
    rng = np.random.default_rng(2)
    chrom, pos = _layout()
    block = pd.Series(list(zip(chrom, pos // 1_000_000, strict=True))).factorize()[0]
    n_blocks = block.max() + 1
    prop = rng.random(n_blocks) < 0.5
    signature = rng.normal(size=(n_blocks, DIM))
    layer = (signature[block] + 0.05 * rng.normal(size=(N, DIM))).astype(np.float32)
    s = make_store(tmp_path / "s", {"mixed5": layer},
                   {"chrom": chrom, "pos": pos, "prop": prop[block]})
    leaky = probe_layers(s, ["prop"], block_bp=0)
    honest = probe_layers(s, ["prop"])
    assert _score(leaky, "mixed5", "prop") > 0.9
    assert _score(honest, "mixed5", "prop") < 0.7
    assert "folds by position" in leaky.header() and "1,000,000 bp genomic block" in honest.header()


def test_scaling_and_pca_are_fitted_on_the_training_folds_only(planted, monkeypatch):
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    seen = {"pca": [], "scaler": []}
    for key, cls in (("pca", PCA), ("scaler", StandardScaler)):
        fit = cls.fit

        def spy(self, x, *a, _fit=fit, _key=key, **k):
            seen[_key].append(len(x))
            return _fit(self, x, *a, **k)

        monkeypatch.setattr(cls, "fit", spy)
    probe_layers(planted, ["early"], ["mixed1"], pca=10)
    fold = genomic_folds(planted.obs["chrom"], planted.obs["pos"], 5, 1_000_000)
    train_sizes = sorted(int((fold != f).sum()) for f in range(5))
    assert sorted(seen["pca"]) == train_sizes and sorted(seen["scaler"]) == train_sizes
    assert max(train_sizes) < N


def test_a_sample_bounds_the_rows_and_is_said(planted):
    res = probe_layers(planted, ["early"], ["mixed1"], max_rows=500, seed=1)
    assert res.n_rows == 500 and res.n_store == N
    assert (res.table["n"] == 500).all()
    assert "500 of 1,200 examples (seed 1)" in res.header()


def test_concepts_resolve_like_enrich_and_numbers_become_regressions(planted):
    obs = planted.obs.assign(rmsk_LINE=planted.obs["early"])
    got = {c.name: c.kind for c in resolve_concepts(obs, ["LINE", "depth", "label=2"])}
    assert got == {"rmsk_LINE": "binary", "depth": "continuous", "label=2": "binary"}
    default = {c.name for c in resolve_concepts(obs, None)}
    assert default == {"early", "rmsk_LINE", "depth"}  # booleans + the numeric defaults there
    with pytest.raises(ProbeError, match="no concept 'LIME'"):
        resolve_concepts(obs, ["LIME"])
    with pytest.raises(ProbeError, match="chrom: a text column .* e.g. chrom=chr1"):
        resolve_concepts(obs, ["chrom"])
    with pytest.raises(ProbeError, match="more than once"):
        resolve_concepts(obs, ["LINE", "rmsk_LINE"])
    # a genotype label is a category: regressing 0/1/2 as a number would be meaningless
    with pytest.raises(ProbeError, match=r"only 3 whole numbers \(0, 1, 2\) is a category.*"
                                         r"label=2"):
        resolve_concepts(obs, ["label"])
    # the same category stored as floats (a column with gaps) is no quantity either, and
    # label=1 matches 1.0
    floats = obs.assign(labelf=obs["label"].astype(float))
    with pytest.raises(ProbeError, match="is a category"):
        resolve_concepts(floats, ["labelf"])
    (one,) = resolve_concepts(floats, ["labelf=1"])
    assert np.array_equal(one.values, (obs["label"] == 1).to_numpy(float))
    with pytest.raises(ProbeError, match="has no values"):
        resolve_concepts(obs.assign(empty=np.nan), ["empty"])


def test_a_concept_too_rare_for_the_folds_is_reported_not_scored(tmp_path):
    chrom, pos = _layout()
    rare = np.zeros(N, dtype=bool)
    rare[[5, 600, 900]] = True
    s = make_store(tmp_path / "s", {"mixed5": np.random.default_rng(0).normal(
        size=(N, 8)).astype(np.float32)}, {"chrom": chrom, "pos": pos, "rare": rare,
                                           "depth": np.arange(N, dtype=float)})
    res = probe_layers(s, ["rare", "depth"])
    assert set(res.table["concept"]) == {"depth"}
    assert res.notes[0] == ("rare: not probed: 3 of the 1200 sampled examples with a value "
                            "have it and 1197 do not; each side needs at least 5 (one per fold)")
    assert res.notes[1].startswith("only 31 genomic blocks of 1,000,000 bp: a concept that "
                                   "covers whole regions")
    with pytest.raises(ProbeError, match="no concept can be probed: rare: not probed: 3 of"):
        probe_layers(s, ["rare"])


def test_bad_options_are_refused_before_any_fitting(planted, tmp_path):
    with pytest.raises(ProbeError, match=r"layer\(s\) mixed7 not in .*mixed1, mixed10"):
        probe_layers(planted, ["early"], ["mixed7"])
    with pytest.raises(ProbeError, match="each layer once"):
        probe_layers(planted, ["early"], ["mixed1", "mixed1"])
    with pytest.raises(ProbeError, match="--pca must be >= 0"):
        probe_layers(planted, ["early"], pca=-1)
    with pytest.raises(ProbeError, match="--max-rows 200 or less"):
        probe_layers(planted, ["early"], available=200 * DIM * 4 * 3 * 4)
    with pytest.raises(ProbeError, match="too little memory for a probe of this layer"):
        probe_layers(planted, ["early"], available=3 * DIM * 4 * 3 * 4)
    with pytest.raises(ProbeError, match=r"--block-bp 2000000 gives at least 10 blocks"):
        probe_layers(planted, ["early"], block_bp=20_000_000)
    with pytest.raises(ProbeError, match="must end in .csv or .md"):
        pr.check_output(tmp_path / "probes.txt")
    no_pos = make_store(tmp_path / "np", {"mixed5": np.zeros((20, 2), np.float32)},
                        {"flag": np.arange(20) % 2 == 0})
    with pytest.raises(ProbeError, match="no chrom/pos .* --block-bp 0"):
        probe_layers(no_pos, ["flag"])


def test_cli_prints_the_profile_and_writes_csv_and_markdown(planted, tmp_path):
    import cli

    md, csv = tmp_path / "p.md", tmp_path / "p.csv"
    for out in (md, csv):
        res = CliRunner().invoke(cli.app, ["probe", str(planted.path), "--concepts",
                                           "early,depth", "--no-progress", "--out", str(out),
                                           "--name", f"cli-{out.suffix[1:]}"])
        assert res.exit_code == 0, res.output + repr(res.exception)
    assert "examples with each yes/no concept: early " in res.output
    assert "| layer | early (AUROC) | depth (R2) |" in res.output
    assert "early: best mixed1" in res.output and f"wrote {csv}" in res.output
    table = pd.read_csv(csv)
    assert list(table.columns) == ["layer", "concept", "metric", "mean", "sd", "folds", "n",
                                   "n_with"]
    assert len(table) == 4
    text = md.read_text()
    assert text.startswith("# Linear probes per layer") and "## Where each concept" in text

    bad = CliRunner().invoke(cli.app, ["probe", str(planted.path), "--out",
                                       str(tmp_path / "x.txt")])
    assert bad.exit_code != 0 and isinstance(bad.exception, ProbeError)
    for name in ("cli-md", "cli-csv"):
        (planted.path / "probes" / f"{name}.json").unlink()


def test_results_are_saved_in_the_store_as_json_and_read_back(planted, tmp_path, caplog):
    from probing.probe import load_probes, save_probes

    res = probe_layers(planted, ["early", "depth"])
    path = save_probes(planted, res, "first")
    assert path == planted.path / "probes" / "first.json"
    assert path.read_text().startswith('{\n "format": "dvprobe-probes"')  # JSON, no pickle
    back = load_probes(planted)["first"]
    pd.testing.assert_frame_equal(back.table, res.table, check_dtype=False)
    assert (back.n_rows, back.folds, back.block_bp, back.pca) == (N, 5, 1_000_000, 50)
    assert back.peaks() == res.peaks()

    # made on another number of rows (a STORE that grew), or not ours: skipped, said
    other = dict(__import__("json").loads(path.read_text()), n_store=N - 1)
    (path.parent / "old.json").write_text(__import__("json").dumps(other))
    (path.parent / "junk.json").write_text("{")
    with caplog.at_level("WARNING", logger="probing.probe"):
        assert set(load_probes(planted)) == {"first"}
    assert "made on 1199 examples, the STORE has 1200" in caplog.text
    assert "junk.json: not a readable probe result" in caplog.text
    for name in ("old", "junk", "first"):
        (path.parent / f"{name}.json").unlink()


def test_cli_saves_under_a_name_and_refuses_to_replace_it_without_overwrite(planted):
    import cli

    args = ["probe", str(planted.path), "--concepts", "early", "--no-progress", "--name", "p1"]
    first = CliRunner().invoke(cli.app, args)
    assert first.exit_code == 0, first.output + repr(first.exception)
    assert f"saved {planted.path / 'probes' / 'p1.json'}" in first.output
    again = CliRunner().invoke(cli.app, args)
    assert isinstance(again.exception, ProbeError)
    assert "probes 'p1' already exist" in str(again.exception)
    assert CliRunner().invoke(cli.app, [*args, "--overwrite"]).exit_code == 0
    bad = CliRunner().invoke(cli.app, [*args[:-1], "../x"])
    assert isinstance(bad.exception, ProbeError) and "not a valid name" in str(bad.exception)
    (planted.path / "probes" / "p1.json").unlink()


def test_a_baseline_store_is_probed_on_the_same_rows_and_folds_and_the_gain_reported(
        planted, tmp_path):
    """The honest reference for a trained model is the untrained one on the same examples:
    here the baseline's mixed1 lacks the planted signal, so the gain is the whole signal."""
    from probing.probe import load_probes, save_probes

    rng = np.random.default_rng(9)
    noise = {name: rng.normal(size=(N, DIM)).astype(np.float32) for name in ("mixed1", "mixed10")}
    base = make_store(tmp_path / "base", noise, {"chrom": planted.obs["chrom"],
                                                 "pos": planted.obs["pos"]})
    res = probe_layers(planted, ["early"], baseline=base, max_rows=800)
    t = res.table.set_index("layer")
    assert t.loc["mixed1", "baseline_mean"] == pytest.approx(0.5, abs=0.1)
    assert t.loc["mixed1", "gain"] == pytest.approx(t.loc["mixed1", "mean"]
                                                    - t.loc["mixed1", "baseline_mean"])
    assert t.loc["mixed1", "gain"] > 0.3 and abs(t.loc["mixed10", "gain"]) < 0.1
    # the baseline's cells are what probing it on its own gives: same rows, same folds
    base.add_obs({"early": planted.obs["early"].to_numpy()})
    alone = probe_layers(base, ["early"], max_rows=800).table.set_index("layer")
    assert (t["baseline_mean"] == alone["mean"]).all()
    assert res.baseline == str(base.path) and "gain over the same probe" in res.header()
    assert "over the baseline at mixed1: +0." in res.peaks()[0]
    assert "(+0." in pr.profile_markdown(res)
    save_probes(planted, res, "with-baseline")
    back = load_probes(planted)["with-baseline"]
    assert back.baseline == str(base.path) and "gain" in back.table.columns
    (planted.path / "probes" / "with-baseline.json").unlink()


def test_a_baseline_of_other_examples_or_layers_is_refused(planted, tmp_path):
    rng = np.random.default_rng(3)

    def store(name, n=N, layers=("mixed1", "mixed10"), dim=DIM, keys=None):
        extra = {"key": keys} if keys is not None else {}
        return make_store(tmp_path / name, {k: rng.normal(size=(n, dim)).astype(np.float32)
                                            for k in layers}, extra)

    with pytest.raises(ProbeError, match="has 1,100 examples, .* 1,200: extract the same"):
        probe_layers(planted, ["early"], baseline=store("short", n=1100))
    keys = [f"chr1:{i}:A>C:1" for i in range(N)]
    keys[7] = "chr9:7:G>T:1"
    other = store("other", keys=keys)
    with pytest.raises(ProbeError) as refused:
        probe_layers(planted, ["early"], baseline=other)
    assert str(refused.value) == (
        f"--baseline {other.path} does not hold the examples of STORE {planted.path}: 1 of "
        "its 1,200 keys are not in the STORE (e.g. 'chr9:7:G>T:1'), and 1 of the STORE's "
        "1,200 keys are not in it (e.g. 'chr1:7:A>C:1') (rows are joined by key); extract the "
        "same examples (same files, same --limit) with the baseline model")
    with pytest.raises(ProbeError, match="has no layer mixed10"):
        probe_layers(planted, ["early"], baseline=store("one", layers=("mixed1",)))
    with pytest.raises(ProbeError, match="layer mixed1 is 32-wide"):
        probe_layers(planted, ["early"], baseline=store("narrow", dim=32))
    with pytest.raises(ProbeError, match="is the STORE itself"):
        probe_layers(planted, ["early"], baseline=planted.path)


def test_a_missing_value_is_not_a_no(tmp_path):
    """Rows without an annotation take no part in a yes/no probe (numbers already did)."""
    rng = np.random.default_rng(4)
    chrom, pos = _layout()
    truth = rng.random(N) < 0.4
    layer = rng.normal(size=(N, DIM)).astype(np.float32)
    layer[:, :4] += 1.5 * truth[:, None]
    flag = pd.Series(truth.astype(float))
    flag[rng.random(N) < 0.3] = np.nan  # not annotated there
    s = make_store(tmp_path / "s", {"mixed5": layer},
                   {"chrom": chrom, "pos": pos, "flag": flag})
    res = probe_layers(s, ["flag"])
    row = res.table.iloc[0]
    assert row["n"] == int(flag.notna().sum()) < N
    assert row["n_with"] == int(flag.sum())
    assert row["mean"] > 0.95
    # read as "no", the unannotated positives would sit among the negatives
    s.add_obs({"flag_as_no": flag.fillna(0).astype(bool).to_numpy()})
    as_no = probe_layers(s, ["flag_as_no"]).table.iloc[0]
    assert as_no["n"] == N and as_no["mean"] < row["mean"] - 0.05


def test_a_concept_no_fold_can_score_is_said_not_left_blank(tmp_path):
    """All examples of a concept in one block: no held-out fold has both classes."""
    rng = np.random.default_rng(5)
    chrom, pos = _layout()
    clustered = (chrom == "chr1") & (pos < 1_000_000)
    assert 5 <= clustered.sum() < 100
    s = make_store(tmp_path / "s", {"mixed5": rng.normal(size=(N, 8)).astype(np.float32)},
                   {"chrom": chrom, "pos": pos, "clustered": clustered,
                    "depth": rng.normal(30, 5, N)})
    res = probe_layers(s, ["clustered", "depth"])
    assert set(res.table["concept"]) == {"depth"}
    assert res.notes[0].startswith(f"clustered: not probed: its {clustered.sum()} sampled "
                                   "examples (of 1200) fall in 1 of the 5 folds")


def test_folds_by_position_keep_the_examples_of_a_multiallelic_site_together():
    chrom = np.array(["chr1"] * 6 + ["chr2"] * 6)
    pos = np.array([5, 5, 5, 9, 9, 11, 5, 5, 7, 8, 8, 8])  # chr1:5 has three alt examples
    fold = genomic_folds(chrom, pos, 3, 0, seed=1)
    sites = pd.DataFrame({"c": chrom, "p": pos, "f": fold})
    assert (sites.groupby(["c", "p"])["f"].nunique() == 1).all()
    assert len(set(fold)) == 3
    rows = genomic_folds(None, None, 3, 0, n=12)  # no positions: every row its own block
    assert sorted(np.bincount(rows)) == [4, 4, 4]
    with pytest.raises(ProbeError, match="only 2 positions for 3 folds: use fewer --folds"):
        genomic_folds(["c"] * 4, [1, 1, 2, 2], 3, 0)


def test_non_finite_activations_and_bad_numbers_are_one_line_errors(planted, tmp_path):
    chrom, pos = _layout()
    layer = np.random.default_rng(6).normal(size=(N, 8)).astype(np.float32)
    layer[17, 3] = np.inf
    s = make_store(tmp_path / "inf", {"mixed5": layer},
                   {"chrom": chrom, "pos": pos, "flag": np.arange(N) % 2 == 0})
    with pytest.raises(ProbeError, match="layer mixed5 holds NaN or infinite values in 1 of "
                                         "the 1200 sampled examples .e.g. row 17"):
        probe_layers(s, ["flag"])
    with pytest.raises(ProbeError, match="--seed must be >= 0"):
        probe_layers(planted, ["early"], seed=-1)
    with pytest.raises(ProbeError, match="--block-bp must be between 0 and"):
        probe_layers(planted, ["early"], block_bp=10**20)
    with pytest.raises(ProbeError, match="--folds must be >= 2, got -3"):
        probe_layers(planted, ["early"], folds=-3)


def test_cli_checks_where_it_writes_before_probing(planted, tmp_path):
    import os

    import cli

    args = ["probe", str(planted.path), "--concepts", "early", "--no-progress"]
    folder = tmp_path / "adir.md"
    folder.mkdir()
    res = CliRunner().invoke(cli.app, [*args, "--out", str(folder)])
    assert isinstance(res.exception, ProbeError) and "a directory" in str(res.exception)
    res = CliRunner().invoke(cli.app, [*args, "--name", "x" * 300])
    assert isinstance(res.exception, ProbeError)
    assert "at most 200 characters" in str(res.exception)
    if os.geteuid() != 0:  # root writes anywhere: a read-only STORE needs a normal user
        ro = tmp_path / "ro"
        import shutil

        shutil.copytree(planted.path, ro)
        (ro / "probes").mkdir(exist_ok=True)
        os.chmod(ro / "probes", 0o500)
        try:
            res = CliRunner().invoke(cli.app, ["probe", str(ro), "--concepts", "early",
                                               "--no-progress"])
            assert "cannot save probes as" in str(res.exception)
        finally:
            os.chmod(ro / "probes", 0o700)
    res = CliRunner().invoke(cli.app, [*args, "--no-save", "--name", "unsaved"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "saved" not in res.output and not (planted.path / "probes" / "unsaved.json").exists()


def test_a_baseline_is_joined_by_key_so_its_row_order_does_not_matter(planted, tmp_path):
    """A baseline extracted from the same examples in another order (shards listed in
    another order) is probed on the same examples, not on whatever sits at the same row."""
    rng = np.random.default_rng(11)
    noise = {name: rng.normal(size=(N, DIM)).astype(np.float32) for name in ("mixed1", "mixed10")}
    in_order = make_store(tmp_path / "base", noise, {"chrom": planted.obs["chrom"],
                                                     "pos": planted.obs["pos"]})
    shuffle = rng.permutation(N)
    shuffled = make_store(tmp_path / "shuffled", {k: v[shuffle] for k, v in noise.items()},
                          {"key": planted.obs["key"].to_numpy()[shuffle],
                           "chrom": planted.obs["chrom"].to_numpy()[shuffle],
                           "pos": planted.obs["pos"].to_numpy()[shuffle]})
    a = probe_layers(planted, ["early"], baseline=in_order, max_rows=800).table
    b = probe_layers(planted, ["early"], baseline=shuffled, max_rows=800).table
    pd.testing.assert_frame_equal(a, b)
