"""Store.add_obs: annotation columns land on the right rows, keep their dtypes, and bad
input is refused with a message that says what to do."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_analysis_support import make_store

from probing.store import LayerSpec, Store, StoreError, StoreWriter, open_parted_root, open_store
from probing.tasks import part_name

N = 6


@pytest.fixture
def store(tmp_path) -> Store:
    """Six rows whose ``score`` is deliberately not sorted, so any reordering shows."""
    score = [0.5, 0.1, 0.9, 0.3, 0.7, 0.2]
    return make_store(tmp_path / "st", {"l": np.zeros((N, 2), np.float32)},
                      extra_obs={"score": score}, batch=4)


def reopened(store: Store) -> pd.DataFrame:
    """obs as a fresh reader sees it: what was written to disk, not what is cached."""
    return open_store(store.path).obs


# -- rows: matched by obs position, and a pandas index says which position --------------

def test_a_series_in_another_order_is_put_back_in_obs_order_by_its_index(store):
    by_score = store.obs.sort_values("score")["score"]
    assert list(by_score.index) != list(range(N))  # the premise: not in obs order
    store.add_obs(pd.DataFrame({"score_copy": by_score}))
    store.add_obs({"score_copy2": by_score})
    store.add_obs(by_score.rename("score_copy3"))
    obs = reopened(store)
    for c in ("score_copy", "score_copy2", "score_copy3"):
        assert obs[c].tolist() == obs["score"].tolist(), c


def test_an_indexed_series_next_to_plain_arrays_does_not_reorder_the_arrays(store):
    by_score = store.obs.sort_values("score")["score"]
    store.add_obs({"copy": by_score, "pos": np.arange(N), "listed": list("abcdef")})
    obs = reopened(store)
    assert obs["copy"].tolist() == obs["score"].tolist()
    assert obs["pos"].tolist() == list(range(N))
    assert obs["listed"].tolist() == list("abcdef")


def test_plain_dicts_and_arrays_are_positional(store):
    store.add_obs({"pos": np.arange(N)[::-1]})
    assert reopened(store)["pos"].tolist() == list(range(N))[::-1]


@pytest.mark.parametrize("index, problem", [
    (list("abcdef"), r"has labels that are not obs positions \(e.g. 'a'\)"),
    ([0, 1, 2, 3, 4, 6], r"has labels that are not obs positions \(e.g. 6\)"),
    ([0, 1, 2, 3, 3, 4], r"repeats rows \(e.g. 3\)"),
    ([5, 3, 1], r"covers 3 of the 6 obs rows \(e.g. 0 is missing\)"),
])
def test_an_index_that_is_not_a_permutation_of_obs_positions_is_refused(store, index, problem):
    col = pd.Series(np.arange(len(index)), index=index)
    for given in (pd.DataFrame({"x": col}), {"x": col}):
        with pytest.raises(StoreError, match=rf"^add_obs: .*index {problem}; rows are matched by "
                                             r"obs position 0..5: .*\.reset_index\(drop=True\)"):
            store.add_obs(given)
    assert "x" not in reopened(store).columns


def test_wrong_row_counts_are_refused_naming_the_column(store):
    with pytest.raises(StoreError, match=r"^add_obs: column 'x' has 3 rows, the STORE has 6$"):
        store.add_obs({"x": [1, 2, 3]})
    with pytest.raises(StoreError, match=r"^add_obs: the DataFrame has 7 rows, the STORE has 6$"):
        store.add_obs(pd.DataFrame({"x": range(7)}))


# -- dtypes: what goes in comes back, also after reopening ------------------------------

def test_extension_dtypes_survive_the_round_trip_through_the_store(store):
    given = {
        "nint": pd.array([1, None, 3, None, 5, 6], dtype="Int64"),
        "nbool": pd.array([True, None, False, True, None, False], dtype="boolean"),
        "cat": pd.Categorical(list("abcabc"), categories=["c", "b", "a"], ordered=True),
    }
    store.add_obs(given)
    store.add_obs(pd.DataFrame({"framed": pd.array([None, 2, 3, 4, 5, 6], dtype="Int64")}))
    obs = reopened(store)
    assert obs["nint"].dtype == "Int64" and obs["nint"].isna().tolist() == [0, 1, 0, 1, 0, 0]
    assert obs["nbool"].dtype == "boolean" and obs["nbool"].isna().sum() == 2
    assert isinstance(obs["cat"].dtype, pd.CategoricalDtype)
    assert list(obs["cat"].cat.categories) == ["c", "b", "a"] and obs["cat"].cat.ordered
    assert obs["framed"].dtype == "Int64" and pd.isna(obs["framed"][0])
    for c, values in given.items():
        assert obs[c].equals(pd.Series(values, name=c)), c


def test_plain_numpy_dtypes_stay_as_they_were(store):
    store.add_obs({"i": np.arange(N, dtype=np.int32), "f": np.linspace(0, 1, N)})
    obs = reopened(store)
    assert obs["i"].dtype == np.int32 and obs["f"].dtype == np.float64


# -- messages and scalars ----------------------------------------------------------------

def test_no_columns_is_refused_as_no_columns_not_as_zero_rows(store):
    for empty in ({}, pd.DataFrame()):
        with pytest.raises(StoreError, match=r"^add_obs: no columns given$"):
            store.add_obs(empty)


def test_a_scalar_is_broadcast_to_every_row_also_when_it_is_the_only_column(store):
    store.add_obs({"const": 1})
    store.add_obs({"batch": "b7", "pos": np.arange(N)})
    obs = reopened(store)
    assert obs["const"].tolist() == [1] * N
    assert obs["batch"].tolist() == ["b7"] * N
    assert obs["pos"].tolist() == list(range(N))


def test_an_unnamed_series_is_refused_because_it_has_no_column_name(store):
    with pytest.raises(StoreError, match=r"^add_obs: the Series has no name"):
        store.add_obs(pd.Series(np.arange(N)))


def test_an_existing_column_is_kept_unless_overwrite(store):
    store.add_obs({"x": np.arange(N)})
    with pytest.raises(StoreError, match=r"^add_obs: column 'x' exists \(pass overwrite=True\)$"):
        store.add_obs({"x": np.zeros(N), "y": np.ones(N)}, overwrite=False)
    obs = reopened(store)
    assert obs["x"].tolist() == list(range(N)) and "y" not in obs.columns


def test_extraction_columns_are_read_only(store):
    with pytest.raises(StoreError, match=r"^add_obs: \['score'\] are extraction columns"):
        store.add_obs({"score": np.zeros(N)})


def test_a_runs_arrays_are_read_when_asked_for(store):
    """A report wants one run's ``umap``, not its ``pca`` (GBs at scale) nor every run's."""
    rng = np.random.default_rng(0)
    pca, umap = rng.normal(size=(store.n, 50)), rng.normal(size=(store.n, 2))
    store.save_run("r", meta={"kind": "kmeans"}, obs=pd.DataFrame({"cluster": np.zeros(store.n)}),
                   arrays={"pca": pca, "umap": umap})
    arrays = store.load_run("r").arrays
    assert sorted(arrays) == ["pca", "umap"] and len(arrays) == 2 and "pca" in arrays
    np.testing.assert_array_equal(arrays["umap"], umap)
    assert list(arrays._cache) == ["umap"]  # pca untouched
    np.testing.assert_array_equal(dict(arrays)["pca"], pca)
    with pytest.raises(KeyError):
        arrays["labels"]


def test_a_layer_that_cannot_be_mapped_names_the_file_and_the_limit(store, monkeypatch):
    import errno

    def no_address_space(*args, **kwargs):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(np, "memmap", no_address_space)
    with pytest.raises(StoreError, match=r"layers/l\.bin: cannot memory-map 6 x 2 rows .*ulimit -v"):
        store.layer("l")


def test_a_run_half_written_by_a_killed_process_is_no_run_and_the_next_save_sweeps_it(store):
    import subprocess

    from dvtorch.files import writer_dir

    store.save_run("r", meta={"kind": "kmeans"})
    done = subprocess.Popen(["true"])
    done.wait()  # a pid no process has any more
    mine = writer_dir(store.path / "runs", "r")
    host = mine.name.split(".")[3]
    mine.rmdir()
    killed = store.path / "runs" / f".r.dvprobe-tmp.{host}.{done.pid}.abc123"
    killed.mkdir()
    (killed / "run.json").write_text('{"kind": "kmeans"}')  # all but the final rename done
    assert store.runs == ["r"]
    store.save_run("r", meta={"kind": "hkmeans"})  # replaces r, sweeps the leftover
    assert store.runs == ["r"] and store.load_run("r").meta["kind"] == "hkmeans"
    assert sorted(p.name for p in (store.path / "runs").iterdir()) == ["r"]


# -- runs: joined to the STORE by key, never by position -----------------------------------

KEYS = [f"chr1:{i}:A>C:1" for i in range(N)]  # make_store's keys


def test_a_run_saved_without_keys_gets_the_stores_keys(store):
    store.save_run("r", meta={"kind": "kmeans"}, obs=pd.DataFrame({"cluster": np.arange(N)}))
    run = open_store(store.path).load_run("r")
    assert run.obs.columns.tolist() == ["key", "cluster"]
    assert run.obs["key"].tolist() == KEYS


def test_a_run_in_another_order_is_read_back_in_store_order(store):
    order = [3, 0, 5, 1, 4, 2]
    store.save_run("r", meta={"kind": "kmeans"},
                   obs=pd.DataFrame({"key": [KEYS[i] for i in order], "cluster": order}))
    run = store.load_run("r")
    assert store.run_rows(run).tolist() == [1, 3, 5, 0, 4, 2]
    assert store.run_obs(run)["cluster"].tolist() == list(range(N))
    assert store.run_obs(run)["key"].tolist() == KEYS


def test_a_run_whose_keys_are_not_the_stores_is_refused_when_saved(store):
    keys = [*KEYS[:5], "chr2:9:G>T:1"]
    with pytest.raises(StoreError, match=r"^run 'r' does not hold the examples of STORE .*: 1 "
                                         r"of its 6 keys are not in the STORE \(e\.g\. "
                                         r"'chr2:9:G>T:1'\), and 1 of the STORE's 6 keys are "
                                         r"not in it \(e\.g\. 'chr1:5:A>C:1'\)"):
        store.save_run("r", meta={}, obs=pd.DataFrame({"key": keys, "cluster": np.zeros(N)}))
    assert store.runs == []


def test_repeated_keys_join_only_in_the_stores_own_order(tmp_path):
    twice = ["a", "b", "a", "c"]
    st = make_store(tmp_path / "twice", {"l": np.zeros((4, 2), np.float32)},
                    extra_obs={"key": twice})
    assert st.align_keys(twice, "run 'x'").tolist() == [0, 1, 2, 3]
    with pytest.raises(StoreError, match=r"^run 'x' cannot be joined to .* by key: run 'x' "
                                         r"holds key 'a' more than once, and the keys are not "
                                         r"the STORE's in its own order$"):
        st.align_keys(["b", "a", "a", "c"], "run 'x'")
    with pytest.raises(StoreError, match=r"by key: the STORE holds key 'a' more than once"):
        st.align_keys(["a", "b", "d", "c"], "run 'x'")


def test_a_run_without_keys_cannot_be_joined(store):
    from probing.store import Run

    run = Run("old", {}, pd.DataFrame({"cluster": np.zeros(N)}), {}, store.path / "runs" / "old")
    with pytest.raises(StoreError, match=r"^run 'old' in .* has no 'key' column, so its rows "
                                         r"cannot be joined"):
        store.run_rows(run)


# -- reading a few columns ---------------------------------------------------------------

@pytest.mark.parametrize("complete", [True, False])
def test_read_obs_gives_the_columns_asked_for_as_obs_has_them(tmp_path, complete):
    """Extraction columns (one file or the parts of a partial STORE) and annotations alike."""
    st = make_store(tmp_path / "s", {"l": np.zeros((N, 2), np.float32)},
                    extra_obs={"score": np.linspace(0, 1, N)}, batch=4, complete=complete)
    st.add_obs({"flag": pd.array([True, None, False, True, False, True], dtype="boolean")})
    fresh = open_store(st.path)
    got = fresh.read_obs(["flag", "score"])
    pd.testing.assert_frame_equal(got, open_store(st.path).obs[["flag", "score"]])
    assert fresh.obs_dtypes.to_dict() == open_store(st.path).obs.dtypes.to_dict()
    with pytest.raises(StoreError, match=r"obs has no column\(s\) \['nope'\]; it has \['key', "
                                         r"'score', 'flag'\]"):
        fresh.read_obs(["score", "nope"])


# -- a STORE written in parts (extract --task): read as one -------------------------------

def make_parted_store(root: Path, layers: dict[str, np.ndarray], sizes: list[int],
                      states: list[str] | None = None) -> Store:
    """``layers`` written as ``len(sizes)`` parts of ``sizes`` rows, as tasks leave them:
    each part ``complete`` (default), ``partial`` (committed, not finished) or ``missing``."""
    specs = [LayerSpec(name, arr.shape[1]) for name, arr in layers.items()]
    count = len(sizes)
    inputs = {"test": "parted"}
    open_parted_root(root, {"inputs": inputs, "task_command": [
        "dvprobe", "extract", "B", "E", "--out", str(root), "--task", "{task}",
        "--num-tasks", str(count)]}, specs, count)
    start = 0
    for i, (size, state) in enumerate(zip(sizes, states or ["complete"] * count,
                                          strict=True)):
        rows = slice(start, start + size)
        start += size
        if state == "missing":
            continue
        w = StoreWriter.open(root / "parts" / part_name(i, count), {"inputs": inputs}, specs)
        if size:
            w.append(pd.DataFrame({"key": [f"chr1:{j}:A>C:1" for j in range(rows.start,
                                                                              rows.stop)]}),
                     {k: v[rows] for k, v in layers.items()})
        if state == "complete":
            w.finalize()
    return Store(root, partial_parts=True)


def test_a_store_in_parts_is_analysed_like_the_same_rows_in_one(tmp_path):
    """Analysis indexes layers like numpy arrays (slices, sorted row samples, asarray):
    a k-means of the parts equals the k-means of one STORE of the same rows."""
    from test_analysis_support import blobs

    from probing import analysis as pa

    x, _ = blobs(90, 6, 3, seed=1)
    one = make_store(tmp_path / "one", {"l": x})
    parted = make_parted_store(tmp_path / "parted", {"l": x}, [40, 0, 30, 20])
    parted = open_store(parted.path)
    assert parted.n == 90 and parted.complete and len(parted.parts) == 4
    pd.testing.assert_frame_equal(parted.obs, one.obs)
    for store in (one, parted):
        pa.kmeans(store, "l", k=3, pca=4, backend="sklearn", run="km", fit_sample=60)
    assert (open_store(parted.path).load_run("km").obs["cluster"].tolist()
            == open_store(one.path).load_run("km").obs["cluster"].tolist())


def test_a_part_not_written_by_the_cli_says_how_to_finish_it_without_a_command(tmp_path):
    x = np.ones((5, 2), np.float32)
    root = make_parted_store(tmp_path / "p", {"l": x}, [3, 2], ["complete", "partial"]).path
    meta = json.loads((root / "store.json").read_text())
    del meta["task_command"]
    (root / "store.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=r"part 1 of 2 \(parts/part-00001-of-00002\) is "
                                         r"partial \(2 examples committed\); finish it with: "
                                         "the extraction that wrote it, with task 1 of 2"):
        open_store(root)
