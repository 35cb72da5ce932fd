"""``dvprobe export`` / :mod:`probing.export`: a STORE as AnnData that scanpy reads.

What must survive the trip STORE -> .zarr / .h5ad -> ``anndata.read_*``: every obs column
(values, dtypes, categories) in key order, the layer bit for bit, each run's labels and
coordinates joined by key, and the runs' parameters.
"""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from test_analysis_support import make_store

from probing.export import ExportError, to_anndata, write_anndata
from probing.store import LayerSpec, Store, StoreWriter

ROOT = Path(__file__).resolve().parents[1]
N = 90


@pytest.fixture
def store(tmp_path) -> Store:
    """A small STORE: two layers, obs of every dtype extraction and annotate write, a
    user's categorical and string annotations, and two runs whose rows are shuffled."""
    rng = np.random.default_rng(7)
    s = make_store(tmp_path / "store", {
        "mixed5": rng.normal(size=(N, 8)).astype(np.float32),
        "mixed10": rng.normal(size=(N, 12)).astype(np.float32),
    }, extra_obs={
        "chrom": ["chr1", "chr2", "chrX"] * (N // 3),
        "pos": np.arange(N, dtype=np.int64) * 100,
        "label": pd.array([0, 1, None] * (N // 3), dtype="Int64"),
        "p_het": rng.random(N).astype(np.float32),
    }, batch=32)
    s.add_obs({"segdup": rng.random(N) < 0.3,
               "zone": pd.Categorical(["core", "edge"] * (N // 2), categories=["edge", "core"]),
               "note": pd.array(["a", None, "c"] * (N // 3), dtype="string")})
    for name, labels in (("km", rng.integers(0, 4, N)),
                         ("hk", [f"{i % 2}.{i % 3}" for i in range(N)])):
        order = rng.permutation(N)  # a run's rows need not be in STORE order: joined by key
        s.save_run(name, meta={"kind": name, "params": {"k": 4, "layer": "mixed5",
                                                        "pca": 5, "umap": True}},
                   obs=pd.DataFrame({"key": s.keys[order], "cluster": np.asarray(labels)[order]}),
                   arrays={"umap": rng.normal(size=(N, 2)).astype(np.float32)[order],
                           "pca": rng.normal(size=(N, 5)).astype(np.float32)[order]})
    return Store(s.path)


def _read(path: Path) -> ad.AnnData:
    return ad.read_zarr(path) if path.suffix == ".zarr" else ad.read_h5ad(path)


def _by_key(store: Store, run: str, values) -> np.ndarray:
    """A run's per-row ``values`` in STORE order, joined by key independently of the export."""
    r = store.load_run(run)
    position = {k: i for i, k in enumerate(r.obs["key"])}
    return np.asarray(values)[[position[k] for k in store.keys]]


@pytest.mark.parametrize(("suffix", "zarr_format"), [(".zarr", 2), (".zarr", 3), (".h5ad", 2)])
def test_round_trip_keeps_obs_layer_runs_and_parameters(store, tmp_path, suffix, zarr_format):
    with ad.settings.override(zarr_write_format=zarr_format):
        out = write_anndata(store, tmp_path / f"out{suffix}", layer="mixed5", progress=False)
    if suffix == ".zarr":
        import zarr

        assert zarr.open_group(out, mode="r").metadata.zarr_format == zarr_format
    a = _read(out)

    assert list(a.obs_names) == list(store.keys) and a.obs.index.name == "key"
    expected = store.obs.drop(columns="key")
    for column in expected.columns:  # values, dtypes and categories, in key order
        pd.testing.assert_series_equal(a.obs[column].reset_index(drop=True),
                                       expected[column], check_names=False)
    assert list(a.obs["zone"].cat.categories) == ["edge", "core"]

    assert a.X.dtype == np.float32 and np.array_equal(a.X, store.layer("mixed5"))
    assert list(a.var_names[:2]) == ["mixed5:0", "mixed5:1"]
    for run in ("hk", "km"):
        r = store.load_run(run)
        labels = a.obs[f"{run}:cluster"]
        assert isinstance(labels.dtype, pd.CategoricalDtype)
        assert list(labels.astype(str)) == [str(v) for v in _by_key(store, run, r.obs["cluster"])]
        for array, name in (("umap", "X_umap"), ("pca", "X_pca")):
            assert np.array_equal(a.obsm[f"{run}:{name}"], _by_key(store, run, r.arrays[array]))
        assert a.uns["dvprobe"]["runs"][run]["params"] == r.meta["params"]
    # the plain scanpy names hold the first run's coordinates, and uns says so
    assert np.array_equal(a.obsm["X_umap"], a.obsm["hk:X_umap"])
    assert a.uns["dvprobe"]["obsm_sources"]["X_umap"] == "hk:umap"
    assert a.uns["dvprobe"]["store"]["inputs"] == store.meta["inputs"]
    assert list(a.uns["dvprobe"]["store"]["layers"]) == ["mixed10", "mixed5"]


def test_without_a_layer_every_layer_is_in_obsm_and_there_is_no_x(store, tmp_path):
    a = _read(write_anndata(store, tmp_path / "all.zarr", runs=["km"], progress=False))
    assert a.X is None and a.n_vars == 0 and a.n_obs == N
    for layer in ("mixed5", "mixed10"):
        assert np.array_equal(a.obsm[layer], store.layer(layer))
    # one run: coordinates under the plain names only, labels of that run only
    assert {"X_umap", "X_pca"} <= set(a.obsm) and "km:X_umap" not in a.obsm
    assert [c for c in a.obs.columns if ":" in c] == ["km:cluster"]
    assert list(a.uns["dvprobe"]["runs"]) == ["km"]


def test_no_runs_exports_the_store_alone(store):
    a = to_anndata(store, "mixed10", runs=[])
    assert not any(":" in c for c in a.obs.columns) and not len(a.obsm)
    assert a.X.shape == (N, 12)


def test_a_store_maps_itself_to_anndata(store):
    """``Store.to_anndata`` is the same mapping as the export's, without writing a file."""
    a = store.to_anndata("mixed10", runs=["km"])
    assert np.array_equal(a.X, store.layer("mixed10"))
    assert list(a.obs_names) == list(store.keys) and "km:cluster" in a.obs


def test_zarr_layers_are_chunked_by_rows_and_read_lazily(store, tmp_path):
    """Bounded memory: layers are dask arrays of row chunks, each written as whole zarr
    chunks; a reader gets rows without the rest."""
    lazy = to_anndata(store, "mixed5", lazy=True, chunk_rows=16)
    assert lazy.X.chunks[0][:2] == (16, 16) and lazy.X.chunks[1] == (8,)
    out = write_anndata(store, tmp_path / "c.zarr", chunk_rows=16, progress=False)
    import zarr

    group = zarr.open_group(out, mode="r")
    assert group["obsm"]["mixed10"].chunks == (16, 12)
    assert np.array_equal(ad.experimental.read_elem_lazy(group["obsm"]["mixed10"])[20:40]
                          .compute(), store.layer("mixed10")[20:40])


def test_a_lazy_export_holds_no_layer_in_memory(tmp_path):
    """What keeps a whole-genome export in bounded memory: building it copies no layer row
    (dask slices a numpy array, a memmap too, into all its chunks at once when handed
    one), and computing a slice reads just those rows."""
    rows = np.random.default_rng(3).normal(size=(4000, 256)).astype(np.float32)  # 4 MB
    s = make_store(tmp_path / "s", {"mixed5": rows}, batch=1000)
    tracemalloc.start()
    try:
        lazy = to_anndata(s, "mixed5", lazy=True, chunk_rows=500)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < rows.nbytes / 4, f"{peak:,} bytes allocated building a lazy export"
    assert np.array_equal(lazy.X[1000:1500].compute(), rows[1000:1500])


def test_a_float16_layer_becomes_float32_x(tmp_path):
    rows = np.random.default_rng(1).normal(size=(10, 4)).astype(np.float16)
    w = StoreWriter.open(tmp_path / "h", {"inputs": {}}, [LayerSpec("mixed5", 4, "float16")])
    w.append(pd.DataFrame({"key": [f"chr1:{i}:A>C:1" for i in range(10)]}), {"mixed5": rows})
    a = _read(write_anndata(w.finalize(), tmp_path / "h.h5ad", layer="mixed5", progress=False))
    assert a.X.dtype == np.float32 and np.array_equal(a.X, rows.astype(np.float32))


def test_scanpy_neighbors_and_leiden_run_on_an_export(store, tmp_path):
    sc = pytest.importorskip("scanpy")
    pytest.importorskip("leidenalg")
    a = _read(write_anndata(store, tmp_path / "sc.zarr", progress=False))
    # method="gauss": the export is what is tested, not the kernel; scanpy's default "umap"
    # kernel costs ~12 s of numba compilation (and umap-learn must be imported through
    # probing.analysis.backends.import_umap where TensorFlow is installed)
    sc.pp.neighbors(a, use_rep="mixed5", n_neighbors=10, method="gauss")
    sc.tl.leiden(a, flavor="igraph", n_iterations=2, random_state=0)
    assert a.obs["leiden"].notna().all() and len(a.obs["leiden"]) == N


# -- refusals ---------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"layer": "mixed7"}, "no layer 'mixed7'; it holds mixed10, mixed5"),
    ({"runs": ["km", "nope"]}, "no run 'nope'; its runs: hk, km"),
])
def test_unknown_layer_or_run_is_refused_before_writing(store, tmp_path, kwargs, message):
    with pytest.raises(ExportError, match=message):
        write_anndata(store, tmp_path / "x.zarr", progress=False, **kwargs)
    assert not (tmp_path / "x.zarr").exists()


def test_wrong_extension_is_refused(store, tmp_path):
    with pytest.raises(ExportError, match="must end in .zarr or .h5ad"):
        write_anndata(store, tmp_path / "x.loom")


def test_an_existing_output_is_kept_without_overwrite_and_replaced_with_it(store, tmp_path):
    out = write_anndata(store, tmp_path / "x.h5ad", layer="mixed5", progress=False)
    with pytest.raises(ExportError, match="exists; pass --overwrite"):
        write_anndata(store, out, layer="mixed10", progress=False)
    assert _read(out).n_vars == 8
    write_anndata(store, out, layer="mixed10", overwrite=True, progress=False)
    assert _read(out).n_vars == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store", "x.h5ad"]


def test_an_incomplete_store_is_refused(tmp_path):
    partial = make_store(tmp_path / "p", {"mixed5": np.zeros((5, 2), np.float32)},
                         complete=False)
    with pytest.raises(ExportError, match="incomplete .*rerunning the same `dvprobe extract`"):
        to_anndata(partial)


def test_a_failed_write_leaves_the_old_export_and_no_temp_files(store, tmp_path, monkeypatch):
    out = write_anndata(store, tmp_path / "x.zarr", layer="mixed5", progress=False)
    import probing.export as export

    def disk_full(adata, path):
        path.mkdir()
        (path / "half-written").write_bytes(b"x")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "_write_zarr", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_anndata(store, out, layer="mixed10", overwrite=True, progress=False)
    assert _read(out).n_vars == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store", "x.zarr"]


# -- the command ------------------------------------------------------------------------
def _dvprobe(*args) -> subprocess.CompletedProcess:
    entry = "import sys, cli; sys.argv[0] = 'dvprobe'; cli.main()"
    return subprocess.run([sys.executable, "-c", entry, *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


def test_cli_exports_the_chosen_runs_and_refuses_an_existing_output(store, tmp_path):
    out = tmp_path / "cli.h5ad"
    proc = _dvprobe("export", store.path, "--anndata", out, "--layer", "mixed10", "--runs",
                    "km", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    a = ad.read_h5ad(out)
    assert a.X.shape == (N, 12) and list(a.uns["dvprobe"]["runs"]) == ["km"]
    proc = _dvprobe("export", store.path, "--anndata", out, "--runs", "km,hk")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "exists; pass --overwrite" in proc.stderr
