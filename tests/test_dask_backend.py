"""``--backend dask``: the same runs as the in-process backend, on a 2-worker LocalCluster.

Most tests share one in-process (threaded) cluster through ``scheduler=`` (the
``--scheduler`` path); the worker-kill tests need worker processes and start their own,
and the CLI test lets the backend start (and close) its own LocalCluster.
"""

from __future__ import annotations

import json
import sys

import dask
import numpy as np
import pytest
import typer
from distributed import LocalCluster
from sklearn.metrics import adjusted_rand_score as ari
from test_analysis_support import blobs, make_store
from test_cuml_contract import UMAP, VERSION, cuml  # noqa: F401 - cuml: the stand-in fixture
from typer.testing import CliRunner

from probing import analysis as pa
from probing.analysis import dask_backend
from probing.analysis import passes as passes_mod
from probing.analysis.errors import AnalysisError, BackendError
from probing.analysis.stream import Moments
from probing.commands_analysis import register

N = 40_000  # > 2 x ROW_CHUNK: the passes run as several tasks, merged


@pytest.fixture(scope="module")
def scheduler():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=None) as lc:
        yield lc.scheduler_address


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    x, y = blobs(N, 16, 4, seed=0)
    z = np.concatenate([x[:, ::-1], x[:, :8] * 2], axis=1)  # a second layer, same blobs
    chrom = np.where(np.arange(N) % 5 == 0, "chr2", "chr1")
    return make_store(tmp_path_factory.mktemp("dask") / "s", {"mixed5": x, "mixed7": z},
                      {"truth": y, "chrom": chrom}, batch=8192)


def test_merged_moments_equal_one_pass():
    rng = np.random.default_rng(0)
    x = rng.normal(5, 2, size=(1000, 6)).astype(np.float32)
    one, parts = Moments(), [Moments() for _ in range(3)]
    one.add(x)
    for m, piece in zip(parts, np.array_split(x + 0, [300, 310]), strict=True):
        m.add(piece)
    merged = Moments().merge(parts[0]).merge(parts[1]).merge(parts[2])
    assert merged.n == 1000
    np.testing.assert_allclose(merged.mean, one.mean, rtol=1e-12)
    np.testing.assert_allclose(merged.var(), one.var(), rtol=1e-10)
    np.testing.assert_allclose(merged.cov(), one.cov(), rtol=1e-10, atol=1e-12)


def test_kmeans_on_dask_gives_the_in_process_clusters(store, scheduler):
    common = {"k": 4, "pca": 8, "fit_sample": 6000, "seed": 3, "n_init": 3}
    local = pa.kmeans(store, "mixed5", run="km-local", backend="sklearn", **common)
    dist = pa.kmeans(store, "mixed5", run="km-dask", backend="dask", scheduler=scheduler,
                     **common)
    assert dist.meta["backend"] == "dask" and "faiss" in dist.meta["backend_version"]
    np.testing.assert_array_equal(dist.arrays["fit_rows"], local.arrays["fit_rows"])
    assert dist.meta["fit_sample"] == local.meta["fit_sample"]
    assert list(dist.obs["key"]) == list(local.obs["key"])
    assert ari(local.obs["cluster"], dist.obs["cluster"]) >= 0.99
    assert ari(store.read_obs(["truth"])["truth"], dist.obs["cluster"]) >= 0.99
    np.testing.assert_allclose(dist.arrays["feat.mixed5.pca.components"],
                               local.arrays["feat.mixed5.pca.components"], atol=1e-5)


def test_pca_on_dask_equals_in_process(store, scheduler):
    common = {"n_components": 5, "normalize": "standardize"}
    local = pa.pca(store, "mixed7", run="pca-local", backend="sklearn", **common)
    dist = pa.pca(store, "mixed7", run="pca-dask", backend="dask", scheduler=scheduler,
                  **common)
    for name in ("pca", "feat.mixed7.pca.components", "feat.mixed7.norm_mean",
                 "feat.mixed7.norm_scale", "feat.mixed7.pca.explained_variance"):
        np.testing.assert_allclose(dist.arrays[name], local.arrays[name], rtol=1e-5,
                                   atol=1e-5, err_msg=name)
    assert dist.arrays["pca"].shape == (N, 5)


def test_multilayer_and_hierarchy_on_dask(store, scheduler):
    common = {"k": 4, "per_layer_pca": 6, "pca": 4, "umap": False, "fit_sample": 4000,
              "n_init": 3}
    local = pa.multilayer(store, ["mixed5", "mixed7"], run="ml-local", backend="sklearn",
                          **common)
    dist = pa.multilayer(store, ["mixed5", "mixed7"], run="ml-dask", backend="dask",
                         scheduler=scheduler, **common)
    assert ari(local.obs["cluster"], dist.obs["cluster"]) >= 0.99
    hk = pa.hierarchical_kmeans(store, "mixed5", k=2, split=[2, 2], pca=6, run="hk-dask",
                                backend="dask", scheduler=scheduler, fit_sample=3000,
                                n_init=2)
    assert set(hk.obs["node"]) <= set(hk.meta["cluster"]["nodes"])
    assert sum(v for k, v in hk.meta["cluster"]["level_sizes"].items() if "." in k) == N


def test_apply_on_dask_equals_in_process(store, scheduler):
    pa.hierarchical_kmeans(store, "mixed5", k=2, split=[2, 2], pca=6, run="hk",
                           backend="sklearn", fit_sample=3000, n_init=2)
    local = pa.apply(store, "hk", store, name="hk-here", backend="sklearn")
    dist = pa.apply(store, "hk", store, name="hk-there", backend="dask", scheduler=scheduler)
    for col in ("cluster", "level1", "level2", "node"):
        np.testing.assert_array_equal(dist.run.obs[col], local.run.obs[col], err_msg=col)
    assert dist.run.meta["backend"] == "dask"
    assert dist.counts.equals(local.counts)


@pytest.mark.slow  # umap-learn's first fit compiles (numba): minutes on 2 shared cores
def test_umap_transformed_on_the_workers(tmp_path, scheduler):
    x, _ = blobs(600, 8, 3, seed=4)
    st = make_store(tmp_path / "s", {"mixed5": x})
    common = {"pca": 4, "fit_sample": 300, "n_neighbors": 10}
    local = pa.umap(st, "mixed5", run="u-local", backend="sklearn", **common)
    dist = pa.umap(st, "mixed5", run="u-dask", backend="dask", scheduler=scheduler, **common)
    assert dist.meta["umap"]["impl"] == local.meta["umap"]["impl"]
    np.testing.assert_allclose(dist.arrays["umap"], local.arrays["umap"], atol=1e-4)
    again = pa.apply(st, "u-dask", st, name="u-again", backend="dask", scheduler=scheduler)
    assert again.run.arrays["umap"].shape == (600, 2)
    assert np.isfinite(again.run.arrays["umap"]).all()


def test_scheduler_options_are_checked_before_any_work(store, monkeypatch):
    monkeypatch.setattr(dask_backend, "CONNECT_TIMEOUT", "1s")
    with pytest.raises(AnalysisError, match="--scheduler is for --backend dask"):
        pa.kmeans(store, "mixed5", k=2, backend="sklearn", scheduler="tcp://127.0.0.1:1")
    with pytest.raises(BackendError, match=r"--scheduler tcp://127\.0\.0\.1:9: cannot connect"):
        pa.kmeans(store, "mixed5", k=2, run="never", backend="dask",
                  scheduler="tcp://127.0.0.1:9")
    assert "never" not in store.runs


def test_dask_cuda_without_its_packages_names_them(store):
    with pytest.raises(BackendError, match="cuml-cu12 and dask-cuda"):
        pa.kmeans(store, "mixed5", k=2, backend="dask-cuda")


def test_cli_starts_and_closes_its_own_local_cluster(store, monkeypatch):
    import distributed

    monkeypatch.setattr(dask_backend, "LOCAL_PROCESSES", False)  # threads: starts faster
    started = []
    real = distributed.LocalCluster

    def spy(*args, **kwargs):
        started.append((kwargs, real(*args, **kwargs)))
        return started[-1][1]

    monkeypatch.setattr(distributed, "LocalCluster", spy)
    app = typer.Typer()
    register(app)
    res = CliRunner().invoke(app, ["cluster", str(store.path), "--layer", "mixed5", "--k",
                                   "4", "--pca", "6", "--backend", "dask", "--run",
                                   "km-cli", "--fit-sample", "3000", "--n-init", "2"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "backend dask" in res.output
    meta = json.loads((store.path / "runs" / "km-cli" / "run.json").read_text())
    assert meta["backend"] == "dask" and meta["n"] == N
    ((kwargs, cluster),) = started
    assert kwargs["n_workers"] == dask_backend.local_workers()  # sized to the cores
    assert cluster.status.name == "closed"


# -- faults ---------------------------------------------------------------------------------

def _killer(prefix: str, once_flag: str | None):
    """A worker plugin that kills its worker process when a task named ``prefix...``
    starts (only the first time, across workers, when ``once_flag`` names a file)."""
    from distributed import WorkerPlugin

    class KillOnTask(WorkerPlugin):
        name = "kill-on-task"

        def transition(self, key, start, finish, **kwargs):
            import os

            if finish != "executing" or not str(key).startswith(prefix):
                return
            if once_flag is not None:
                if os.path.exists(once_flag):
                    return
                open(once_flag, "w").close()
            os._exit(1)

    return KillOnTask()


@pytest.fixture()
def process_cluster():
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                         dashboard_address=None) as lc:
        yield lc


def _plugged(lc, plugin):
    from distributed import Client

    with Client(lc) as c:
        c.register_plugin(plugin)


def test_a_killed_worker_is_retried_or_fails_in_one_line_without_a_half_run(
        store, process_cluster, tmp_path):
    addr = process_cluster.scheduler_address
    _plugged(process_cluster, _killer("dvprobe-moments", str(tmp_path / "killed-once")))
    once = pa.kmeans(store, "mixed5", k=4, pca=6, run="km-retried", backend="dask",
                     scheduler=addr, fit_sample=3000, n_init=2)
    assert (tmp_path / "killed-once").exists()  # a worker did die, the task reran
    assert ari(store.read_obs(["truth"])["truth"], once.obs["cluster"]) >= 0.99
    _plugged(process_cluster, _killer("dvprobe-label", None))  # every try dies
    with pytest.raises(BackendError, match="a worker died running label rows") as err:
        pa.kmeans(store, "mixed5", k=4, pca=6, run="km-killed", backend="dask",
                  scheduler=addr, fit_sample=3000, n_init=2)
    assert "\n" not in str(err.value) and "no run was written" in str(err.value)
    assert "km-killed" not in store.runs
    assert not (store.path / "runs" / "km-killed").exists()


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def _no_partial_run(store, name):
    runs = store.path / "runs"
    assert name not in store.runs and not (runs / name).exists()
    assert not [p for p in runs.iterdir() if name in p.name]  # no writer's leftovers


def test_ctrl_c_in_a_chunk_pass_leaves_no_run(store, monkeypatch):
    monkeypatch.setattr(passes_mod, "label_rows", _interrupt)  # inside the label pass
    with pytest.raises(KeyboardInterrupt):
        pa.kmeans(store, "mixed5", k=4, pca=6, run="ctrl-c", backend="sklearn",
                  fit_sample=3000, n_init=2)
    _no_partial_run(store, "ctrl-c")


def test_ctrl_c_while_dask_works_cancels_and_leaves_no_run(store, scheduler, monkeypatch):
    import distributed

    monkeypatch.setattr(distributed, "as_completed", _interrupt)  # while tasks run
    with pytest.raises(KeyboardInterrupt):
        pa.kmeans(store, "mixed5", k=4, pca=6, run="ctrl-c-dask", backend="dask",
                  scheduler=scheduler, fit_sample=3000, n_init=2)
    _no_partial_run(store, "ctrl-c-dask")


def test_ctrl_c_while_saving_leaves_no_run(store, monkeypatch):
    monkeypatch.setattr(np, "savez", _interrupt)
    with pytest.raises(KeyboardInterrupt):
        pa.kmeans(store, "mixed5", k=4, pca=6, run="ctrl-c-save", backend="sklearn",
                  fit_sample=3000, n_init=2)
    _no_partial_run(store, "ctrl-c-save")


# -- dask-cuda against a strict stand-in (no GPU here) -------------------------------------

class _DaskKMeans:
    """``cuml.dask.cluster.KMeans`` as documented: keyword-only, a dask array to ``fit``,
    ``cluster_centers_`` on the device unless numpy output is in force."""

    def __init__(self, *, client=None, verbose=False, n_clusters=8, random_state=1,
                 max_iter=300, tol=1e-4, n_init=1, init="scalable-k-means++",
                 oversampling_factor=2.0, max_samples_per_batch=1 << 15, output_type=None):
        from distributed import Client

        if init not in ("scalable-k-means++", "k-means||", "random"):
            raise ValueError(f"init {init!r}")
        if client is not None and not isinstance(client, Client):
            raise TypeError("client must be a distributed.Client")
        self.k, self.seed, self.n_init, self.output_type = n_clusters, random_state, n_init, \
            output_type

    def fit(self, x):
        import dask.array as da
        from sklearn.cluster import KMeans

        if not isinstance(x, da.Array):
            raise TypeError("cuml.dask KMeans fits a dask array or dataframe")
        self._c = KMeans(self.k, n_init=self.n_init, random_state=self.seed).fit(
            x.compute()).cluster_centers_
        return self

    @property
    def cluster_centers_(self):
        from test_cuml_contract import _GLOBAL, _Device

        wanted = _GLOBAL["output_type"] or self.output_type
        return np.asarray(self._c) if wanted == "numpy" else _Device(self._c)


class StrictUMAP(UMAP):
    """cuML's UMAP stand-in, refusing a ``build_algo`` cuML does not know."""

    def __init__(self, *, build_algo="auto", **kw):
        if build_algo not in ("auto", "brute_force_knn", "nn_descent"):
            raise ValueError(f"build_algo {build_algo!r}")
        self.build_algo = build_algo
        super().__init__(**kw)


@pytest.fixture
def dask_cuda(cuml, monkeypatch):  # noqa: F811 - the fixture imported above
    import types

    import distributed

    cuml.UMAP = StrictUMAP
    cdask, ccluster = types.ModuleType("cuml.dask"), types.ModuleType("cuml.dask.cluster")
    ccluster.KMeans, cdask.cluster, cuml.dask = _DaskKMeans, ccluster, cdask
    module = types.ModuleType("dask_cuda")
    module.__version__ = "25.10.00"

    def local_cuda_cluster(*, CUDA_VISIBLE_DEVICES=None, n_workers=None,  # noqa: N803
                           threads_per_worker=1, dashboard_address=":8787", **kw):
        module.started = True
        return distributed.LocalCluster(n_workers=n_workers or 2, processes=False,
                                        threads_per_worker=threads_per_worker,
                                        dashboard_address=dashboard_address)

    module.LocalCUDACluster = local_cuda_cluster
    for name, mod in (("cuml.dask", cdask), ("cuml.dask.cluster", ccluster),
                      ("dask_cuda", module)):
        monkeypatch.setitem(sys.modules, name, mod)
    return module


def test_dask_cuda_runs_cuml_dask_and_keeps_the_contract(store, dask_cuda):
    common = {"k": 4, "pca": 6, "fit_sample": 3000, "n_init": 2}
    local = pa.kmeans(store, "mixed5", run="km-cpu", backend="sklearn", **common)
    gpu = pa.kmeans(store, "mixed5", run="km-gpu", backend="dask-cuda", umap=True, **common)
    assert dask_cuda.started
    assert gpu.meta["backend"] == "dask-cuda"
    assert f"cuml.dask {VERSION}" in gpu.meta["backend_version"]
    assert gpu.meta["umap"]["impl"] == f"cuml {VERSION}"
    import pickle

    assert pickle.loads(gpu.file_bytes("umap_model")).build_algo == "nn_descent"
    assert gpu.obs["cluster"].dtype == local.obs["cluster"].dtype
    assert gpu.arrays["umap"].dtype == np.float32 and gpu.arrays["umap"].shape == (N, 2)
    assert ari(local.obs["cluster"], gpu.obs["cluster"]) >= 0.99
    again = pa.apply(store, "km-gpu", store, name="km-gpu-again", backend="dask-cuda")
    np.testing.assert_array_equal(again.run.obs["cluster"], gpu.obs["cluster"])


def _real_gpu_stack() -> bool:
    import importlib.util

    from probing.analysis.backends import gpu_available

    return all(importlib.util.find_spec(m) for m in ("cuml", "dask_cuda")) and gpu_available()


@pytest.mark.skipif(not _real_gpu_stack(), reason="needs cuml, dask-cuda and a CUDA GPU")
def test_dask_cuda_on_a_real_gpu_gives_the_cpu_clusters(tmp_path):
    x, y = blobs(40_000, 16, 4, seed=7)
    st = make_store(tmp_path / "s", {"mixed5": x}, {"truth": y}, batch=8192)
    common = {"k": 4, "pca": 8, "fit_sample": 20_000}
    cpu = pa.kmeans(st, "mixed5", run="cpu", backend="sklearn", **common)
    gpu = pa.kmeans(st, "mixed5", run="gpu", backend="dask-cuda", umap=True, **common)
    assert ari(cpu.obs["cluster"], gpu.obs["cluster"]) >= 0.99
    assert gpu.arrays["umap"].shape == (40_000, 2) and np.isfinite(gpu.arrays["umap"]).all()
    again = pa.apply(st, "gpu", st, name="gpu-again", backend="dask-cuda")
    np.testing.assert_array_equal(again.run.obs["cluster"], gpu.obs["cluster"])


def test_a_second_pass_over_the_same_rows_is_computed_again(store, scheduler):
    # A standardiser's pass keeps no cross-products; the PCA pass after it over the same
    # rows must not be handed the first pass's results (Dask reuses a finished task's result
    # for any task of the same name: the PCA then failed on a missing covariance).
    from distributed import Client

    with Client(scheduler) as client:
        passes = dask_backend.DaskPasses(client)
        make = {"mixed5": lambda blocks: blocks["mixed5"]}
        first = passes.moments(store, ["mixed5"], None, make, products=False)["mixed5"]
        again = passes.moments(store, ["mixed5"], None, make, products=True)["mixed5"]
    one = Moments()
    one.add(np.asarray(store.layer("mixed5")))
    assert first.n == again.n == N
    np.testing.assert_allclose(again.cov(), one.cov(), rtol=1e-9, atol=1e-9)
