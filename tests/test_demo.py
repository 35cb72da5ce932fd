"""The one-command demo, end to end at a tiny size (the README's first command runs the same
code path at the default size)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from dvtorch.errors import DvprobeError
from probing.demo import (
    CONCEPT_COLUMNS,
    KMEANS_RUN,
    MOSAIC_RUN,
    MULTILAYER_RUN,
    DemoConfig,
    run_demo,
)
from probing.enrich import best_clusters, enrichment_table
from probing.store import open_store

TINY_SIM = dict(
    line_copies=3,
    line_length=2000,
    segdup_length=2000,
    cnv_length=5000,
    n_homopolymers=4,
    n_strs=4,
    n_low_complexity=3,
)
TINY = dict(
    length=80_000,
    coverage=12.0,
    n_mosaic=10,
    ref_sites_fraction=0.003,
    layers=("mixed2", "mixed5", "mixed8"),
    k=4,
    multilayer_k=4,
    sim_options=TINY_SIM,
    ablate_examples=16,
    explain_panels=2,
    explain_steps=8,
    tcav_examples=12,
)


class _Warnings(logging.Handler):
    """Every warning logged while it is attached to the root logger."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory):
    """The tiny demo, run once, and the warnings it logged."""
    out = tmp_path_factory.mktemp("demo")
    warnings = _Warnings()
    logging.getLogger().addHandler(warnings)
    try:
        result = run_demo(DemoConfig(out, **TINY), progress=False)
    finally:
        logging.getLogger().removeHandler(warnings)
    return result, warnings.messages


@pytest.fixture(scope="module")
def demo(demo_run):
    return demo_run[0]


def test_demo_runs_the_whole_pipeline(demo) -> None:
    assert demo.report.is_file() and demo.report.stat().st_size > 10_000
    store = open_store(demo.store)
    assert store.n == demo.n_examples > 50
    assert {"mixed2", "mixed5", "mixed8"} <= set(store.layers)
    assert {KMEANS_RUN, MULTILAYER_RUN, "hkmeans3-mixed5"} <= set(store.runs)
    assert demo.seconds["explain"] > 0
    # every planted concept became an obs column
    assert {col for col, _ in CONCEPT_COLUMNS.values()} <= set(store.obs.columns)
    assert store.obs["germline"].sum() > 0 and store.obs["LINE"].sum() > 0
    # the mosaic truth set was pushed through the fitted k-means, every example landed once
    mos = open_store(demo.mosaic_store)
    assert MOSAIC_RUN in mos.runs and mos.n == demo.n_mosaic_examples > 0
    assert mos.obs["mosaic"].all()
    assert int(demo.mosaic_counts.sum()) == mos.n
    top, n = map(int, demo.mosaic_landing.split()[0].split("/"))
    assert n == mos.n and top == demo.mosaic_counts.max()
    assert any(p.suffix == ".md" for p in demo.enrichment_files)


def test_demo_summary_says_the_model_is_untrained(demo) -> None:
    assert demo.untrained
    text = demo.summary()
    assert "UNTRAINED" in text and str(demo.report) in text
    for col, _ in CONCEPT_COLUMNS.values():
        assert col in text


def test_demo_probes_every_layer_for_the_planted_concepts(demo) -> None:
    from probing.probe import load_probes

    saved = load_probes(demo.store)["planted"]
    assert list(dict.fromkeys(saved.table["layer"])) == list(TINY["layers"])
    assert saved.block_bp == TINY["length"] // 20
    assert demo.probes is not None and len(demo.probes) >= 3
    for r in demo.probes.itertuples(index=False):
        g = saved.table[saved.table["concept"] == r.concept].set_index("layer")
        assert r.best == g["mean"].max() and g.loc[r.best_layer, "mean"] == r.best
        assert r.last_layer == "mixed8" and r.last == g.loc["mixed8", "mean"]
    assert "where each planted concept is decodable (linear probes" in demo.summary()
    assert demo.seconds["probe"] > 0
    assert (demo.out / "enrichment" / "probes.md") in demo.enrichment_files


def test_demo_explains_which_channels_the_calls_use_and_a_few_mosaic_calls(demo) -> None:
    import pandas as pd

    store = open_store(demo.store)
    # channel ablation over a sample of the examples: every channel once, most important
    # first, each importance inside its bootstrap interval; saved for the report
    t = demo.channels
    assert len(t) == 7 and (t["n"] == TINY["ablate_examples"]).all()
    assert list(t["importance"]) == sorted(t["importance"], reverse=True)
    assert ((t["importance_lo"] <= t["importance"]) & (t["importance"] <= t["importance_hi"])).all()
    saved = pd.read_csv(demo.store / "ablation" / "demo.csv")
    assert list(saved["channel"]) == list(t["channel"])
    assert (demo.out / "explain" / "ablation" / "ablation.png").is_file()
    # attribution panels of mosaic truth calls, saved in the STORE for the report's view
    mosaic_keys = set(store.obs.loc[store.obs["mosaic"].fillna(False).astype(bool), "key"])
    explained = pd.read_csv(demo.store / "attributions" / "mosaic" / "explain.csv")
    assert len(explained) == len(demo.panels) == min(2, len(mosaic_keys)) > 0
    assert set(explained["key"]) <= mosaic_keys and (explained["steps"] == 8).all()
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in demo.panels)
    text = demo.summary()
    assert "which channels the calls depend on (dvprobe ablate: 16 examples" in text
    assert "attribution panels (dvprobe explain: integrated gradients of mosaic truth" in text
    assert all(str(p) in text for p in demo.panels)
    assert demo.tcav and "is the concept used? (TCAV" in text  # tcav_examples=12 asks for it


def test_demo_recovery_tables_are_consistent_with_the_enrichment(demo) -> None:
    store = open_store(demo.store)
    run = store.load_run(KMEANS_RUN)
    labels = run.obs["cluster"].astype(str)
    for col, _ in CONCEPT_COLUMNS.values():
        row = demo.recovery[KMEANS_RUN].set_index("attribute").loc[col]
        mask = store.obs[col].to_numpy(bool)
        assert row["total"] == mask.sum()
        if row["total"]:
            members = (labels == str(row["cluster"])).to_numpy()
            assert row["n"] == members.sum()
            assert row["share_of_cluster"] == pytest.approx((members & mask).sum() / members.sum())
            assert row["share_of_attribute"] == pytest.approx((members & mask).sum() / mask.sum())


def test_demo_rerun_reuses_finished_steps(demo) -> None:
    stamp = demo.out / "sim" / "DONE"
    # what extraction writes: a finished STORE is opened, not extracted again (timing it
    # instead flaked on a busy machine: the model's load alone can outlast a tiny extract)
    written = [stamp, *(demo.out / "store" / "layers").iterdir(),
               *(demo.out / "mosaic_store" / "layers").iterdir()]
    assert len(written) >= 3
    before = [p.stat().st_mtime_ns for p in written]
    again = run_demo(DemoConfig(demo.out, **{**TINY, "explain": False}), progress=False)
    assert [p.stat().st_mtime_ns for p in written] == before
    assert again.mosaic_landing == demo.mosaic_landing  # seeded: same clusters
    # explain=False skips the step (its time is what the demo's budget counts)
    assert "explain" not in again.seconds and again.channels is None
    assert "which channels" not in again.summary() and "attribution panels" not in again.summary()


def test_best_clusters_picks_the_f1_maximum() -> None:
    import numpy as np

    labels = np.array([0] * 10 + [1] * 10 + [2] * 80)
    attr = np.zeros(100, bool)
    attr[:8] = True  # cluster 0: 8/10 pure, captures 8/12
    attr[10:12] = True  # cluster 1: 2/10
    attr[20:22] = True  # cluster 2: 2/80
    best = best_clusters(enrichment_table(labels, {"x": attr, "none": np.zeros(100, bool)}))
    x = best.set_index("attribute").loc["x"]
    assert x["cluster"] == "0" and x["count"] == 8 and x["total"] == 12
    assert x["share_of_cluster"] == pytest.approx(0.8)
    assert x["share_of_attribute"] == pytest.approx(8 / 12)
    assert x["f1"] == pytest.approx(2 * 0.8 * (8 / 12) / (0.8 + 8 / 12))
    none = best.set_index("attribute").loc["none"]
    assert none["total"] == 0 and np.isnan(none["share_of_cluster"])


def test_demo_does_not_warn_about_its_own_expected_case(demo_run) -> None:
    """The mosaic truth set is never annotated with the germline truth: its sites are placed
    away from every germline variant, so that VCF could only 'match nothing' and warn."""
    demo, warnings = demo_run
    assert not [w for w in warnings if "matched an example" in w], warnings
    assert "germline" in open_store(demo.store).obs.columns
    mosaic_columns = set(open_store(demo.mosaic_store).obs.columns)
    assert "germline" not in mosaic_columns and "mosaic" in mosaic_columns


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"layers": ("mixed1",)}, r"the demo clusters mixed5 .*--layers \['mixed1'\] lacks it"),
        ({"length": 1000}, "--length 1000 is too small"),
        ({"ablate_examples": -1}, "ablate_examples must be >= 0, got -1"),
        ({"explain_steps": 0}, "explain_steps must be >= 1, got 0"),
        ({"sim_options": {"n_strs": -1}}, r"must be >= 0, got \{'n_strs': -1\}"),
        ({"sim_options": {"n_lines": 3}}, "sim_options: .*unexpected keyword argument 'n_lines'"),
        ({"sim_options": {"seed": 3}}, "sim_options: .*multiple values for keyword argument"),
    ],
)
def test_demo_config_refuses_bad_values_before_any_work(tmp_path: Path, options, message) -> None:
    with pytest.raises(DvprobeError, match=message):
        DemoConfig(tmp_path / "demo", **options)
    assert not (tmp_path / "demo").exists()


def test_demo_command_is_wired_and_reports_bad_options_in_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", "import cli; cli.main()", "demo", "--out", str(tmp_path / "d"),
         "--layers", "mixed1,mixed3", "--quiet"],
        capture_output=True, text=True, cwd=Path(__file__).parents[1],
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "mixed5" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "d").exists()


def test_demo_never_clears_directories_it_did_not_create(tmp_path: Path) -> None:
    mine = tmp_path / "examples"
    mine.mkdir()
    (mine / "precious.tfrecord.gz").write_bytes(b"x")
    with pytest.raises(DvprobeError, match="not written by `dvprobe demo`"):
        run_demo(DemoConfig(tmp_path), progress=False)
    assert (mine / "precious.tfrecord.gz").read_bytes() == b"x"
