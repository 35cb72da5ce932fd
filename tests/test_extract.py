"""``dvprobe extract``: order, values, resume, corruption handling, input checks, CLI.

Inputs are written by TensorFlow's own TFRecord writer (gzip, 2 shards, ``name@2.gz``) so
that the TF-free reader is tested against the real container, not against itself. The
model is an untrained seeded reference bundle with DeepVariant's real 100x221x7 shape.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import dvtorch
from dvtorch.errors import DvprobeError, ExampleFormatError
from probing.channels import WGS_CHANNELS, WGS_SHAPE
from probing.examples import encode_example, write_example_info
from probing.extract import PROB_COLUMNS, ExtractConfig, ExtractionInterrupted, extract
from probing.probe import ProbeResult, load_probes, save_probes
from probing.store import StoreError, open_store
from probing.tfrecord import masked_crc32c, shard_name

N = 40
PER_SHARD = 20
BATCH = 8
LAYERS = ("mixed5", "mixed10")
OBS_COLUMNS = [
    "key",
    "shard",
    "record",
    "chrom",
    "pos",
    "end",
    "ref",
    "alt",
    "alt_allele_indices",
    "locus",
    "variant_type",
    "label",
    "sequencing_type",
    "p_hom_ref",
    "p_het",
    "p_hom_alt",
    "pred_genotype",
    "depth",
    "mean_mapq",
    "frac_low_mapq",
    "mean_baseq",
    "alt_fraction",
    "alt_strand_balance",
]


def _image(rng: np.random.Generator) -> np.ndarray:
    """A pileup-like image: reference band + a random number of read rows, rest empty."""
    h, w, c = WGS_SHAPE
    img = np.zeros((h, w, c), dtype=np.uint8)
    rows = 5 + int(rng.integers(5, h - 5))
    img[:rows] = rng.integers(1, 255, size=(rows, w, c), dtype=np.uint8)
    return img


def _truth(n: int = N, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        multi = i % 7 == 3
        alts = ("T", "TA") if multi else (("G",) if i % 3 else ("GCC",))
        out.append(
            {
                "chrom": "chr20" if i < n // 2 else "chr21",
                "start": 1000 + 37 * i,
                "ref": "A",
                "alts": alts,
                "aai": (1,) if multi else (0,),
                "label": int(i % 3) if i % 5 else None,
                "image": _image(rng),
            }
        )
    return out


def _write_shards(d: Path, truth: list[dict], per_shard: int = PER_SHARD, info: bool = True) -> str:
    """Write ``ex.tfrecord@K.gz`` with TensorFlow's writer; returns the spec."""
    tf = pytest.importorskip("tensorflow")
    d.mkdir(parents=True, exist_ok=True)
    k = (len(truth) + per_shard - 1) // per_shard
    base = str(d / "ex.tfrecord")
    for s in range(k):
        path = shard_name(base, s, k, ".gz")
        with tf.io.TFRecordWriter(path, options="GZIP") as w:
            for t in truth[s * per_shard : (s + 1) * per_shard]:
                w.write(
                    encode_example(
                        t["image"],
                        chrom=t["chrom"],
                        start=t["start"],
                        end=t["start"] + len(t["ref"]),
                        ref=t["ref"],
                        alts=t["alts"],
                        alt_allele_indices=t["aai"],
                        label=t["label"],
                    )
                )
        if info:
            write_example_info(path, WGS_SHAPE, WGS_CHANNELS, "1.6.0")
    return f"{base}@{k}.gz"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    truth = _truth()
    spec = _write_shards(root / "examples", truth)
    bundle = root / "bundle"
    dvtorch.reference_bundle(bundle, seed=0)
    baseline = extract(ExtractConfig(bundle, spec, root / "baseline", workers=0,
                                     batch_size=BATCH, device="cpu", commit_interval_s=0),
                       progress=False)
    return {"root": root, "truth": truth, "spec": spec, "bundle": bundle, "baseline": baseline}


def _config(data, out, spec=None, **options) -> ExtractConfig:
    """The config of an extraction of the module's examples (or ``spec``) with the tests'
    defaults: batches of BATCH, records decoded inline (no loader process), CPU."""
    return ExtractConfig(data["bundle"], spec or data["spec"], out,
                         **{"batch_size": BATCH, "workers": 0, "device": "cpu", **options})


def _extract(data, out, spec=None, progress=False, on_batch=None, **options):
    """``extract`` of :func:`_config` (no progress bar unless asked for)."""
    return extract(_config(data, out, spec, **options), progress=progress, on_batch=on_batch)


def _assert_same_store(a, b) -> None:
    pd.testing.assert_frame_equal(a.obs, b.obs)
    for name in a.layers:
        np.testing.assert_array_equal(a.layer(name), b.layer(name))


def _rewrite_gz(path: str, mutate) -> None:
    raw = bytearray(gzip.decompress(Path(path).read_bytes()))
    mutate(raw)
    Path(path).write_bytes(gzip.compress(bytes(raw)))


def _record_offsets(raw: bytes) -> list[tuple[int, int]]:
    """(payload offset, payload length) of each record of an uncompressed TFRecord stream
    (for a stream cut short, the last one's payload may run past its end)."""
    out, pos = [], 0
    while pos + 12 <= len(raw):
        (n,) = struct.unpack("<Q", raw[pos : pos + 8])
        out.append((pos + 12, n))
        pos += 16 + n
    return out


# ---- order, obs, values -----------------------------------------------------------------


def test_obs_in_input_order_with_correct_fields(data):
    store, truth = data["baseline"], data["truth"]
    assert store.complete and store.n == N
    obs = store.obs
    assert list(obs.columns) == OBS_COLUMNS
    assert obs["key"].is_unique
    assert obs["shard"].tolist() == [i // PER_SHARD for i in range(N)]
    assert obs["record"].tolist() == [i % PER_SHARD for i in range(N)]
    assert obs["chrom"].tolist() == [t["chrom"] for t in truth]
    assert obs["pos"].tolist() == [t["start"] for t in truth]
    assert obs["ref"].tolist() == [t["ref"] for t in truth]
    assert obs["alt"].tolist() == [",".join(t["alts"]) for t in truth]
    assert obs["alt_allele_indices"].tolist() == [",".join(map(str, t["aai"])) for t in truth]
    assert obs["label"].tolist() == [pd.NA if t["label"] is None else t["label"] for t in truth]
    assert str(obs["label"].dtype) == "Int64"
    assert obs["key"].iloc[3] == "chr20:1111:A>T,TA:1"
    # depth decoded from the image = number of non-empty read rows
    want_depth = [int(t["image"][5:].any(axis=(1, 2)).sum()) for t in truth]
    assert obs["depth"].tolist() == want_depth
    assert store.layer_specs["mixed5"].dim == 768 and store.layer_specs["mixed10"].dim == 2048
    assert store.layer_specs["mixed5"].map_shape == (4, 12, 768)


def test_layers_equal_direct_capture_forward(data):
    """The engine's rows are the plain model's captures to the parity tolerance (the engine
    folds BN into the convs: the same arithmetic, rounded in another order)."""
    store, truth = data["baseline"], data["truth"]
    model = dvtorch.load(data["bundle"], device="cpu")
    images = torch.from_numpy(np.stack([t["image"] for t in truth]))
    outs = {n: [] for n in LAYERS}
    probs = []
    with torch.inference_mode(), dvtorch.hooks.capture(model, list(LAYERS), pool="max") as acts:
        for i in range(0, N, BATCH):
            probs.append(model(dvtorch.preprocess(images[i : i + BATCH])))
            for n in LAYERS:
                outs[n].append(acts[n].float().numpy())
    for n in LAYERS:
        want = np.concatenate(outs[n])
        rel = np.abs(store.layer(n) - want).max() / np.abs(want).max()
        assert rel <= 1e-4, (n, rel)  # the parity suite's bound for every mixedN
    p = torch.cat(probs).numpy()
    obs = store.obs
    np.testing.assert_allclose(obs[["p_hom_ref", "p_het", "p_hom_alt"]].to_numpy(), p, atol=1e-5)
    assert obs["pred_genotype"].tolist() == p.argmax(1).tolist()


def test_parallel_workers_keep_input_order(data, tmp_path):
    par = _extract(data, tmp_path / "w2", workers=2, commit_interval_s=0)
    _assert_same_store(par, data["baseline"])


def test_limit_takes_the_first_records(data, tmp_path):
    s = _extract(data, tmp_path / "lim", limit=13)
    assert s.n == 13
    pd.testing.assert_frame_equal(s.obs, data["baseline"].obs.iloc[:13])
    np.testing.assert_array_equal(s.layer("mixed5"), data["baseline"].layer("mixed5")[:13])


def test_flatten_is_hwc_float16(data, tmp_path):
    s = _extract(data, tmp_path / "flat", layers=["mixed5"], pool="flatten", limit=4)
    spec = s.layer_specs["mixed5"]
    assert (spec.dim, spec.dtype, spec.pool) == (4 * 12 * 768, "float16", "flatten")
    flat = s.layer("mixed5").astype(np.float32).reshape(4, 4, 12, 768)
    # max over H, W of the flattened HWC map == the max-pooled row (to float16 rounding)
    np.testing.assert_allclose(
        flat.max(axis=(1, 2)), data["baseline"].layer("mixed5")[:4], rtol=2e-3, atol=2e-3
    )


def test_flattened_rows_rounded_to_float16_by_torch_equal_numpys_rounding():
    """Extraction converts flattened maps to float16 on the device (half the bytes to copy);
    torch must round exactly as numpy's astype did: ties to even, subnormals, overflow."""
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.standard_normal(200_000).astype(np.float32) * 10.0 ** rng.integers(-9, 6, 200_000),
        np.float32([65504, 65519.99, 65520, 1e9, -1e9, 6e-8, 2.9e-8, 3e-8, 0.0, -0.0]),
        # every tie between adjacent float16 values around 1 and 1000
        ((np.arange(1024, 2048, dtype=np.float32) + 0.5) / 1024).astype(np.float32),
        ((np.arange(1024, 2048, dtype=np.float32) + 0.5) / 1024 * 512).astype(np.float32),
    ]).astype(np.float32)
    via_torch = torch.from_numpy(x).to(torch.float16).numpy()
    with np.errstate(over="ignore"):  # overflow to inf is part of what is compared
        via_numpy = x.astype(np.float16)
    assert via_torch.view(np.uint16).tolist() == via_numpy.view(np.uint16).tolist()


def test_bf16_close_to_fp32_and_fp16_refused_on_cpu(data, tmp_path):
    s = _extract(data, tmp_path / "bf16", dtype="bf16", limit=8)
    a, b = s.layer("mixed5"), data["baseline"].layer("mixed5")[:8]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() > 0.99
    with pytest.raises(DvprobeError, match="fp16"):
        _extract(data, tmp_path / "fp16", dtype="fp16")


@pytest.mark.parametrize(("option", "value", "said"), [
    ("layers", [], "--layers"),
    ("layers", ["mixed5", "mixed5"], "--layers names mixed5 more than once"),
    ("sample", 1.5, "--sample"),
    ("commit_interval_s", -1, "--commit-every must be >= 0"),
    ("pool", "median", "--pool must be one of max, mean, flatten, got 'median'"),
    ("dtype", "fp64", "--dtype must be one of fp32, bf16, fp16, got 'fp64'"),
    ("batch_size", 0, "--batch-size must be >= 1, got 0"),
    ("workers", -1, "--workers must be >= 0, got -1"),
    ("limit", 0, "--limit must be >= 1, got 0"),
    ("sample_seed", 3, "--sample-seed chooses which records a --sample keeps"),
])
def test_a_bad_option_is_refused_when_the_config_is_made_naming_its_flag(
        data, tmp_path, option, value, said):
    with pytest.raises(DvprobeError, match=re.escape(said)):
        _config(data, tmp_path / "o", **{option: value})
    assert not (tmp_path / "o").exists()


def test_one_layer_name_is_one_layer_not_its_letters(data, tmp_path):
    assert _config(data, tmp_path / "o", layers="mixed5").layers == ["mixed5"]


def test_compile_is_refused_on_the_cpu_before_anything_is_written(data, tmp_path):
    with pytest.raises(DvprobeError, match="--compile is for --device cuda"):
        _extract(data, tmp_path / "c", compile=True)
    assert not (tmp_path / "c").exists()


def test_store_json_records_how_the_rows_were_computed(data):
    """The engine that computed the rows describes itself in store.json's extraction."""
    from dvtorch.engine.cpu import pointwise_conv_available

    ex = data["baseline"].meta["extraction"]
    assert ex["engine"] == "cpu" and ex["device"] == "cpu"
    assert ex["threads"] == torch.get_num_threads()
    assert ex["whole_batches_in_flight"] in (0, ex["threads"])
    assert ex["fused_conv"] == pointwise_conv_available()
    assert (ex["batch_size"], ex["workers"], ex["n"]) == (BATCH, 0, N)
    assert ex["torch"] == torch.__version__
    assert not {"engine_requested", "engine_fallback"} & set(ex)


# ---- resume ----------------------------------------------------------------------------


def test_resume_after_crash_gives_the_uninterrupted_rows(data, tmp_path):
    out = tmp_path / "crash"

    def boom(n_done: int) -> None:
        if n_done >= 3 * BATCH:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        _extract(data, out, commit_interval_s=0, on_batch=boom)
    partial = open_store(out)
    assert not partial.complete
    assert partial.n == 3 * BATCH  # every finished batch was committed
    assert partial.meta["cursor"]["position"] == 3 * BATCH
    seen = []
    resumed = _extract(data, out, commit_interval_s=0, on_batch=seen.append)
    assert seen[0] == 4 * BATCH  # nothing before the cursor was redone
    _assert_same_store(resumed, data["baseline"])


def test_analyses_of_a_partial_store_are_set_aside_when_extraction_resumes(data, tmp_path,
                                                                          capsys):
    """Annotations and runs made on the rows committed so far would no longer line up with
    the grown STORE (every later command refused it); they are kept under stale-<n>/."""
    out = tmp_path / "partial"

    def crash(n_done: int) -> None:
        if n_done >= 2 * BATCH:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):
        _extract(data, out, commit_interval_s=0, on_batch=crash)
    partial = open_store(out)
    n = partial.n
    partial.add_obs({"early": np.ones(n, dtype=bool)})
    partial.save_run("km", meta={"kind": "kmeans"}, obs=pd.DataFrame({"cluster": np.zeros(n)}))
    probes = pd.DataFrame([{"layer": "mixed5", "concept": "early", "metric": "AUROC",
                            "mean": 0.5, "sd": 0.0, "folds": 5, "n": n, "n_with": n}])
    save_probes(partial, ProbeResult(probes, n, n, 5, 1_000_000, 50, 0))
    capsys.readouterr()
    done = _extract(data, out)  # progress=False: the move is still said
    assert f"moved to {out / f'stale-{n}'}" in capsys.readouterr().err
    assert done.complete and done.n == N and done.runs == []
    assert "early" not in done.obs.columns
    _assert_same_store(done, data["baseline"])
    stale = out / f"stale-{n}"
    assert (stale / "annotations.parquet").is_file() and (stale / "runs" / "km").is_dir()
    assert (stale / "probes" / "probes.json").is_file() and load_probes(done) == {}


def test_torn_tail_after_kill9_is_truncated_and_redone(data, tmp_path):
    """A crash between writing rows and committing leaves bytes past the commit."""
    out = tmp_path / "torn"
    with pytest.raises(RuntimeError):
        _extract(data, out, commit_interval_s=0,
                 on_batch=lambda n: (_ for _ in ()).throw(RuntimeError("x")) if n >= 16 else None)
    # garbage rows for every layer + an orphan obs part, as an interrupted append leaves
    for name in LAYERS:
        with open(out / "layers" / f"{name}.bin", "ab") as fh:
            fh.write(b"\x7f" * 4096)
    (out / "obs" / "part-99999999.parquet").write_bytes(b"junk")
    resumed = _extract(data, out, workers=2)
    _assert_same_store(resumed, data["baseline"])


def test_ctrl_c_commits_finished_batches_and_says_how_to_resume(data, tmp_path, capsys):
    out = tmp_path / "sigint"

    def interrupt(n_done: int) -> None:
        if n_done >= 2 * BATCH:
            raise KeyboardInterrupt

    with pytest.raises(ExtractionInterrupted) as ei:
        # commit interval never reached: the interrupt itself must commit the 2 batches
        _extract(data, out, workers=1, progress=True, commit_interval_s=3600, on_batch=interrupt)
    assert "run the same command again to resume" in str(ei.value)
    assert open_store(out).n == 2 * BATCH
    assert "resume" in capsys.readouterr().err
    resumed = _extract(data, out, workers=1, progress=True)
    err = capsys.readouterr().err
    assert "resuming after 16 committed examples" in err
    _assert_same_store(resumed, data["baseline"])
    files = [p for p in out.rglob("*") if p.is_file()]
    before = {p: p.stat().st_mtime_ns for p in files}
    again = _extract(data, out, workers=None, progress=True)
    assert "already complete" in capsys.readouterr().err
    _assert_same_store(again, data["baseline"])
    # a complete STORE is only read (it may be read-only, shared): no file was written
    assert {p: p.stat().st_mtime_ns for p in files} == before


def test_resume_after_real_kill_of_subprocess(data, tmp_path):
    out = tmp_path / "killed"
    code = (
        "import sys, time\n"
        "from probing.extract import ExtractConfig, extract\n"
        "extract(ExtractConfig(sys.argv[1], sys.argv[2], sys.argv[3], batch_size=4, workers=1,\n"
        "                      device='cpu', commit_interval_s=0),\n"
        "        progress=False, on_batch=lambda n: time.sleep(0.2))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(data["bundle"]), data["spec"], str(out)],
        cwd=Path(__file__).parents[1],
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            meta = out / "store.json"
            if meta.is_file() and json.loads(meta.read_text()).get("n_committed", 0) >= 8:
                break
            if proc.poll() is not None:
                pytest.fail(f"extract subprocess exited early with {proc.returncode}")
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    partial = open_store(out)
    assert 8 <= partial.n < N and not partial.complete
    resumed = _extract(data, out, batch_size=4)
    assert resumed.obs["key"].is_unique
    pd.testing.assert_frame_equal(resumed.obs, data["baseline"].obs)
    for n in LAYERS:  # batch size differs from the baseline: same values to rounding
        np.testing.assert_allclose(
            resumed.layer(n), data["baseline"].layer(n), rtol=1e-5, atol=1e-5
        )


def test_real_sigint_to_process_group_commits_and_resumes(data, tmp_path):
    """Ctrl-C in a terminal signals the whole process group, data-loading workers included."""
    out, marker = tmp_path / "sigint_real", tmp_path / "eight_done"
    # A shell starts background jobs with SIGINT ignored and Python then keeps it ignored
    # (CI runners may do this): restore the terminal's default, which this test is about.
    code = (
        "import signal, sys, time, pathlib\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from probing.extract import ExtractConfig, extract\n"
        "m = pathlib.Path(sys.argv[4])\n"
        "def cb(n):\n"
        "    time.sleep(0.2)\n"
        "    if n >= 8: m.touch()\n"
        "extract(ExtractConfig(sys.argv[1], sys.argv[2], sys.argv[3], batch_size=4, workers=2,\n"
        "                      device='cpu', commit_interval_s=3600),\n"
        "        progress=True, on_batch=cb)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code, str(data["bundle"]), data["spec"],
                             str(out), str(marker)], cwd=Path(__file__).parents[1], env=env,
                            start_new_session=True, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not marker.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert marker.exists(), "extract subprocess did not reach 8 examples"
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    assert "run the same command again to resume" in err
    partial = open_store(out)
    # nothing was committed before the interrupt (interval 3600 s): the handler committed
    # every finished batch, at least the 8 examples the marker saw
    assert 8 <= partial.n < N and not partial.complete
    resumed = _extract(data, out, batch_size=4)
    pd.testing.assert_frame_equal(resumed.obs, data["baseline"].obs)
    for n in LAYERS:
        np.testing.assert_allclose(resumed.layer(n), data["baseline"].layer(n),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_native_bf16_warns_before_extracting(data, tmp_path, caplog,
                                                                   monkeypatch, native):
    monkeypatch.setattr("probing.extract.native_bf16", lambda: native)
    with caplog.at_level("WARNING", logger="probing.extract"):
        s = _extract(data, tmp_path / "bf16", dtype="bf16", limit=BATCH)
    assert s.n == BATCH
    warned = [r.getMessage() for r in caplog.records if "AVX-512 BF16 nor AMX" in r.getMessage()]
    assert len(warned) == (0 if native else 1)


@pytest.mark.parametrize("native", [False, True, None])
def test_a_long_fp32_run_on_a_cpu_with_native_bf16_mentions_bf16(data, tmp_path, capsys,
                                                                  monkeypatch, native):
    monkeypatch.setattr("probing.extract.native_bf16", lambda: native)
    _extract(data, tmp_path / "small", limit=BATCH, progress=True)
    assert "--dtype bf16" not in capsys.readouterr().err  # a short run: no hint
    monkeypatch.setattr("probing.extract.LONG_RUN_MIN_EXAMPLES", BATCH)
    _extract(data, tmp_path / "fp32", limit=BATCH, progress=True)
    assert ("--dtype bf16 extracts" in capsys.readouterr().err) == bool(native)


def test_a_long_run_is_counted_in_estimated_examples_after_limit_and_sample(tmp_path):
    from probing.extract import (
        GZ_BYTES_PER_EXAMPLE,
        LONG_RUN_MIN_EXAMPLES,
        estimate_examples,
        is_long_run,
    )
    from probing.tfrecord import write_records

    gz = tmp_path / "big.tfrecord.gz"
    with gz.open("wb") as f:  # gzip magic, then a sparse size: only the size counts
        f.write(b"\x1f\x8b")
        f.truncate(LONG_RUN_MIN_EXAMPLES * GZ_BYTES_PER_EXAMPLE)
    assert estimate_examples([str(gz)]) == LONG_RUN_MIN_EXAMPLES
    assert is_long_run([str(gz)], None) and is_long_run([str(gz)], LONG_RUN_MIN_EXAMPLES)
    assert not is_long_run([str(gz)], LONG_RUN_MIN_EXAMPLES - 1)
    assert not is_long_run([str(gz)], None, fraction=0.5)
    # uncompressed: 155 kB a record, so 100 MB is ~650 examples, not a long run
    plain = tmp_path / "plain.tfrecord"
    write_records(plain, [bytes(155_000)] * 3, compress=False)
    assert estimate_examples([str(plain)]) == 3
    assert not is_long_run([str(plain)] * 200, None)


def test_different_extraction_at_same_out_is_refused_saying_what_differs(data, tmp_path):
    out = tmp_path / "one"
    _extract(data, out, limit=4)
    with pytest.raises(StoreError, match=r'different extraction \(layers: \["mixed10", '
                                         r'"mixed5"\] there, \["mixed5"\] now\)'):
        _extract(data, out, layers=["mixed5"], limit=4)
    with pytest.raises(StoreError, match='pool: "max" there, "mean" now'):
        _extract(data, out, pool="mean", limit=4)
    # a dropped input file is named, not hidden in two lists cut to the same 60 characters
    from probing.tfrecord import expand_spec

    first, second = (Path(p).name for p in expand_spec(data["spec"]))
    with pytest.raises(StoreError, match=r": 2 there, 1 now; .*\[1\]: \{\"name\": \"" + second):
        _extract(data, out, spec=str(Path(data["spec"]).parent / first), limit=4)
    # the order layers are named in does not change what the STORE holds
    assert _extract(data, out, layers=["mixed10", "mixed5"], limit=4).n == 4
    s = _extract(data, out, pool="mean", limit=4, overwrite=True)
    assert s.layer_specs["mixed5"].pool == "mean" and s.n == 4


def test_overwrite_never_deletes_a_directory_dvprobe_did_not_write(data, tmp_path):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "store.json").write_text('{"my": "config"}')
    (out / "notes.txt").write_text("precious")
    with pytest.raises(StoreError, match="not written by dvprobe.*left as it is"):
        _extract(data, out, limit=2, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "store.json"]


def test_an_out_that_is_a_file_or_a_damaged_store_is_refused_in_one_line(data, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("hello")
    with pytest.raises(StoreError, match="is a file, not a STORE directory"):
        _extract(data, afile, limit=2)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "store.json").write_text("{not json")
    with pytest.raises(StoreError, match="store.json: unreadable"):
        _extract(data, damaged, limit=2)
    with pytest.raises(StoreError, match="unreadable"):
        open_store(damaged)


def test_a_layer_file_shorter_than_its_commits_is_refused_not_zero_filled(data, tmp_path):
    out = tmp_path / "cut"

    def crash(n_done: int) -> None:
        raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        _extract(data, out, commit_interval_s=0, on_batch=crash)
    rowbytes = 768 * 4
    layer = out / "layers" / "mixed5.bin"
    assert layer.stat().st_size == BATCH * rowbytes
    os.truncate(layer, 3 * rowbytes)
    with pytest.raises(StoreError, match=f"holds 3 complete rows but store.json commits {BATCH}"):
        open_store(out).layer("mixed5")
    with pytest.raises(StoreError, match="cut short.*--overwrite"):
        _extract(data, out)
    assert layer.stat().st_size == 3 * rowbytes  # left as found


def test_an_input_without_examples_is_an_error_and_leaves_no_store(data, tmp_path):
    empty = tmp_path / "empty.tfrecord.gz"
    empty.write_bytes(gzip.compress(b""))
    out = tmp_path / "o"
    with pytest.raises(DvprobeError, match="nothing to extract: it holds no records"):
        _extract(data, out, spec=str(empty))
    assert not out.exists()
    junk = tmp_path / "junk.tfrecord"
    junk.write_bytes(b"this is not a TFRecord file at all")
    with pytest.raises(DvprobeError, match=r"every record read was corrupt and skipped \(1; "
                                           r"first: .*junk.tfrecord, record 0: length CRC"):
        _extract(data, out, spec=str(junk), skip_corrupt=True)
    assert not out.exists()


def test_skip_corrupt_reads_on_past_a_shard_whose_framing_is_lost(data, tmp_path):
    """A corrupt length in shard 0 (a record can no longer be located): under
    --skip-corrupt the rest of shard 0 is one reported skip and shard 1 is read whole."""
    spec = _write_shards(tmp_path / "lost", data["truth"])
    shard0 = spec.replace("@2.gz", "-00000-of-00002.gz")

    def flip_length(raw: bytearray) -> None:
        off, _ = _record_offsets(bytes(raw))[5]
        raw[off - 12] ^= 0x01

    _rewrite_gz(shard0, flip_length)
    out = tmp_path / "o"
    with pytest.raises(ExampleFormatError, match="record 5: length CRC"):
        _extract(data, out, spec=spec)
    s = _extract(data, out, spec=spec, skip_corrupt=True)  # resumes at record 5
    keep = list(range(5)) + list(range(PER_SHARD, N))
    assert s.complete and s.meta["skipped"]["count"] == 1
    assert "rest of this file is skipped" in s.meta["skipped"]["first"][0]["reason"]
    pd.testing.assert_frame_equal(s.obs, data["baseline"].obs.iloc[keep].reset_index(drop=True))
    np.testing.assert_array_equal(s.layer("mixed10"), data["baseline"].layer("mixed10")[keep])


# ---- --sample ----------------------------------------------------------------------------

def _chosen_rows(data, fraction: float, seed: int) -> list[int]:
    """Input positions of the records RecordSample(fraction, seed) chooses, read here."""
    from probing.loader import RecordSample
    from probing.tfrecord import expand_spec, iter_records

    sample = RecordSample(fraction, seed)
    payloads = [p for f in expand_spec(data["spec"]) for _, p in iter_records(str(f))]
    return [i for i, p in enumerate(payloads) if sample.chooses(p)]


def _assert_rows_of(s, base, rows: list[int]) -> None:
    """``s`` holds exactly the baseline's rows ``rows``, in that order, with their values."""
    pd.testing.assert_frame_equal(s.obs.drop(columns=list(PROB_COLUMNS)),
                                  base.obs.drop(columns=list(PROB_COLUMNS)).iloc[rows]
                                  .reset_index(drop=True))
    for name in base.layers:
        np.testing.assert_allclose(s.layer(name), base.layer(name)[rows], rtol=1e-5, atol=1e-5)


def test_a_sample_holds_the_chosen_records_in_input_order_with_their_full_run_rows(
        data, tmp_path):
    rows = _chosen_rows(data, 0.5, seed=3)
    assert 0 < len(rows) < N  # the premise: a real subset of the 40 records
    s = _extract(data, tmp_path / "half", sample=0.5, sample_seed=3)
    _assert_rows_of(s, data["baseline"], rows)
    assert s.meta["inputs"]["sample"] == {"fraction": 0.5, "seed": 3}
    assert _chosen_rows(data, 0.5, seed=4) != rows  # another seed, another subset
    everything = _extract(data, tmp_path / "all", sample=1.0)
    _assert_rows_of(everything, data["baseline"], list(range(N)))
    assert "sample" not in everything.meta["inputs"]  # the same STORE as no --sample


def test_a_sample_is_the_same_with_loader_processes_after_a_crash_and_with_a_limit(
        data, tmp_path):
    rows = _chosen_rows(data, 0.6, seed=0)
    par = _extract(data, tmp_path / "w2", sample=0.6, workers=2, batch_size=4)
    _assert_rows_of(par, data["baseline"], rows)

    out = tmp_path / "crash"

    def boom(n_done: int) -> None:
        if n_done >= BATCH:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        _extract(data, out, sample=0.6, commit_interval_s=0, on_batch=boom)
    assert open_store(out).n == BATCH
    resumed = _extract(data, out, sample=0.6)
    _assert_rows_of(resumed, data["baseline"], rows)
    with pytest.raises(StoreError, match="sample"):  # another subset is another STORE
        _extract(data, out, sample=0.5)

    limited = _extract(data, tmp_path / "limit", sample=0.6, limit=25)
    _assert_rows_of(limited, data["baseline"], [r for r in rows if r < 25])


def test_records_passed_over_after_the_last_chosen_one_are_still_counted_as_read(data, tmp_path):
    """The committed cursor ends where reading ended, so "kept N of M records read" holds."""
    seed = next(sd for sd in range(100) if _chosen_rows(data, 0.2, sd)[-1] < N - 3)
    rows = _chosen_rows(data, 0.2, seed)
    # the chosen records fill whole batches exactly, then only passed-over ones follow
    s = _extract(data, tmp_path / "tail", sample=0.2, sample_seed=seed, batch_size=len(rows))
    _assert_rows_of(s, data["baseline"], rows)
    assert s.meta["cursor"]["position"] == N
    limit = rows[-1] + 3  # the limit, too, ends past the last chosen record
    cut = _extract(data, tmp_path / "cut", sample=0.2, sample_seed=seed, limit=limit,
                   batch_size=len(rows))
    assert cut.n == len(rows) and cut.meta["cursor"]["position"] == limit


def test_sample_choices_spread_like_coin_flips_even_for_near_identical_records():
    from probing.loader import RecordSample

    records = [b"example %06d" % i + bytes(1000) for i in range(20_000)]  # a counter apart
    for fraction in (0.01, 0.1, 0.5):
        chosen = sum(RecordSample(fraction, seed=0).chooses(r) for r in records)
        sd = (len(records) * fraction * (1 - fraction)) ** 0.5
        assert abs(chosen - len(records) * fraction) < 5 * sd, fraction
    a = {i for i, r in enumerate(records) if RecordSample(0.1, 1).chooses(r)}
    b = {i for i, r in enumerate(records) if RecordSample(0.1, 2).chooses(r)}
    assert len(a & b) < 0.2 * len(a)  # seeds choose independently (expected overlap 10%)


def test_bad_samples_are_refused_and_an_empty_one_says_so(data, tmp_path):
    for bad in (0, -0.1, 1.5, float("nan")):
        with pytest.raises(DvprobeError, match="--sample must be a fraction in"):
            _extract(data, tmp_path / "bad", sample=bad)
    with pytest.raises(DvprobeError, match="--sample-seed"):
        _extract(data, tmp_path / "bad", sample=0.5, sample_seed=-1)
    with pytest.raises(DvprobeError, match="give --sample FRACTION too"):
        _extract(data, tmp_path / "bad", sample_seed=3)  # a seed alone would do nothing
    with pytest.raises(DvprobeError, match="below 2\\^-32 and would keep no record"):
        _extract(data, tmp_path / "bad", sample=1e-12)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(DvprobeError, match=r"--sample 1e-09 \(seed 0\) kept none of its "
                       r"records; sample a larger fraction; no STORE"):
        _extract(data, tmp_path / "none", sample=1e-9)
    assert not (tmp_path / "none").exists()


def test_regions_keep_the_examples_whose_variant_overlaps_them_in_input_order(data, tmp_path):
    truth = data["truth"]
    base = data["baseline"]
    bed = tmp_path / "r.bed"
    bed.write_text("20\t1100\t1300\n")  # Ensembl naming for the examples' chr20
    given = [str(bed), "chr21:1,800-1,900"]
    rows = [i for i, t in enumerate(truth)
            if (t["chrom"] == "chr20" and t["start"] < 1300 and t["start"] + 1 > 1100)
            or (t["chrom"] == "chr21" and t["start"] < 1900 and t["start"] + 1 > 1799)]
    assert 0 < len(rows) < N // 2
    s = _extract(data, tmp_path / "reg", regions=given, workers=2)
    _assert_rows_of(s, base, rows)
    assert s.meta["regions_given"] == given
    assert s.meta["inputs"]["regions"]["intervals"] == 2
    # a selection spelled otherwise is the same STORE (opened, not refused); other bases
    # are another
    again = _extract(data, tmp_path / "reg", regions=["chr20:1101-1300", "21:1800-1900"])
    _assert_rows_of(again, base, rows)
    with pytest.raises(StoreError, match="regions"):
        _extract(data, tmp_path / "reg", regions=["chr20:1101-1301", "chr21:1800-1900"])
    both = _extract(data, tmp_path / "both", regions=given, sample=0.5, sample_seed=1)
    sampled = set(_chosen_rows(data, 0.5, seed=1))
    _assert_rows_of(both, base, [r for r in rows if r in sampled])
    with pytest.raises(DvprobeError, match=r"--regions chrY \(1 interval\(s\)\) kept none of "
                       r"its records; check the regions' contigs and coordinates; no STORE"):
        _extract(data, tmp_path / "none", regions=["chrY"])
    assert not (tmp_path / "none").exists()


# ---- corrupt records -------------------------------------------------------------------


@pytest.fixture
def corrupt_spec(data, tmp_path):
    """Copy of the examples where shard 1, record 5 (overall row 25) has one flipped byte."""
    d = tmp_path / "corrupt"
    spec = _write_shards(d, data["truth"])
    shard1 = spec.replace("@2.gz", "-00001-of-00002.gz")

    def flip(raw: bytearray) -> None:
        off, n = _record_offsets(bytes(raw))[5]
        raw[off + n // 2] ^= 0x40

    _rewrite_gz(shard1, flip)
    return spec, shard1


def test_corrupt_record_errors_with_location_and_store_stays_consistent(
    data, corrupt_spec, tmp_path
):
    spec, shard1 = corrupt_spec
    out = tmp_path / "c"
    with pytest.raises(ExampleFormatError) as ei:
        _extract(data, out, spec=spec, workers=2, commit_interval_s=0)
    msg = str(ei.value)
    assert "CRC" in msg and Path(shard1).name in msg and "record 5" in msg
    s = open_store(out)
    # every row before the bad one is kept: batches 0-2 (rows 0-23) and row 24, the part
    # of the bad record's batch (rows 24-31) that precedes it; the cursor is at the record
    assert s.n == 25 and not s.complete
    pd.testing.assert_frame_equal(s.obs, data["baseline"].obs.iloc[:25])
    np.testing.assert_array_equal(s.layer("mixed10"), data["baseline"].layer("mixed10")[:25])
    assert s.meta["cursor"] == {"shard": 1, "record": 5, "position": 25}
    # the same STORE can be finished by skipping the bad record (a resume, not a redo)
    done = _extract(data, out, spec=spec, workers=2, skip_corrupt=True)
    _check_skipped(done, data, shard1)


def _memory_available(monkeypatch, n_bytes: int) -> None:
    """The memory the CPU engine sees as available when it is built."""
    from dvtorch.engine import memory

    monkeypatch.setattr(memory, "available_bytes", lambda *_: n_bytes)


def test_batches_in_flight_are_finished_before_a_bad_record(data, corrupt_spec, tmp_path,
                                                             monkeypatch):
    spec, _ = corrupt_spec
    out = tmp_path / "inflight"
    torch.set_num_threads(2)
    _memory_available(monkeypatch, 8 << 30)  # room for a whole batch on each worker thread
    # batches of 4 on the 2 worker threads, up to three in flight when batch 6 (rows 24-27)
    # stops at the bad row 25
    with pytest.raises(ExampleFormatError, match="CRC"):
        _extract(data, out, spec=spec, batch_size=4, commit_interval_s=60)
    s = open_store(out)
    assert s.n == 25 and s.meta["cursor"] == {"shard": 1, "record": 5, "position": 25}
    base = data["baseline"]
    pd.testing.assert_frame_equal(s.obs.drop(columns=list(PROB_COLUMNS)),
                                  base.obs.iloc[:25].drop(columns=list(PROB_COLUMNS)))
    np.testing.assert_allclose(s.layer("mixed10"), base.layer("mixed10")[:25],
                               rtol=1e-4, atol=1e-4)


def test_whole_batches_on_worker_threads_give_one_threads_rows_in_input_order(
        data, tmp_path, monkeypatch):
    """With memory to spare, each compute thread runs whole batches of its own, several in
    flight at once; the STORE is the one a single thread writes, row for row."""
    _memory_available(monkeypatch, 8 << 30)
    torch.set_num_threads(1)
    try:
        one = _extract(data, tmp_path / "one", batch_size=4, commit_interval_s=0)
    finally:
        torch.set_num_threads(2)
    two = _extract(data, tmp_path / "two", batch_size=4, commit_interval_s=0)
    assert (one.meta["extraction"]["threads"], one.meta["extraction"]["whole_batches_in_flight"]) \
        == (1, 0)  # one compute thread: each batch runs in the calling thread
    assert (two.meta["extraction"]["threads"], two.meta["extraction"]["whole_batches_in_flight"]) \
        == (2, 2)
    _assert_same_store(two, one)


def test_truncated_last_shard_keeps_every_complete_record(data, tmp_path):
    """A shard cut short (make_examples killed while writing it): every record that is
    whole in the file is extracted, in order, then the error names the first cut one."""
    d = tmp_path / "cut"
    spec = _write_shards(d, data["truth"])
    shard1 = Path(spec.replace("@2.gz", "-00001-of-00002.gz"))
    raw = shard1.read_bytes()
    cut = raw[: int(len(raw) * 0.6)]
    shard1.write_bytes(cut)
    # independent count of the records that are whole in what is left
    inflated = zlib.decompressobj(31).decompress(cut)
    whole = sum(1 for off, n in _record_offsets(inflated) if off + n + 4 <= len(inflated))
    assert 0 < whole < PER_SHARD
    out = tmp_path / "o"
    with pytest.raises(ExampleFormatError, match=f"record {whole}: truncated") as ei:
        _extract(data, out, spec=spec, workers=2)
    assert shard1.name in str(ei.value)
    s = open_store(out)
    n = PER_SHARD + whole
    assert s.n == n and s.meta["cursor"] == {"shard": 1, "record": whole, "position": n}
    pd.testing.assert_frame_equal(s.obs, data["baseline"].obs.iloc[:n])
    np.testing.assert_array_equal(s.layer("mixed5"), data["baseline"].layer("mixed5")[:n])


def _check_skipped(store, data, shard1) -> None:
    assert store.n == N - 1
    assert store.meta["skipped"]["count"] == 1
    first = store.meta["skipped"]["first"][0]
    assert first["record"] == 5 and Path(first["file"]).name == Path(shard1).name
    assert "CRC" in first["reason"]
    keep = [i for i in range(N) if i != PER_SHARD + 5]
    pd.testing.assert_frame_equal(store.obs, data["baseline"].obs.iloc[keep].reset_index(drop=True))
    np.testing.assert_array_equal(store.layer("mixed5"), data["baseline"].layer("mixed5")[keep])


def test_skip_corrupt_counts_and_reports(data, corrupt_spec, tmp_path):
    spec, shard1 = corrupt_spec
    s = _extract(data, tmp_path / "s", spec=spec, skip_corrupt=True)
    _check_skipped(s, data, shard1)


def test_a_sample_keeping_nothing_is_said_so_also_when_a_corrupt_record_was_skipped(
        data, corrupt_spec, tmp_path):
    spec, _ = corrupt_spec
    with pytest.raises(DvprobeError, match=r"--sample 1e-09 \(seed 0\) kept none of its "
                       r"records; sample a larger fraction \(1 corrupt record\(s\) skipped"):
        _extract(data, tmp_path / "s", spec=spec, skip_corrupt=True, sample=1e-9)


def test_each_skip_is_reported_once_also_with_loader_processes(data, corrupt_spec, tmp_path):
    """Every loader process frames every record; the skip is still said once."""
    spec, shard1 = corrupt_spec
    proc = subprocess.run(
        [sys.executable, "-c", "import cli; cli.main()", "extract", str(data["bundle"]), spec,
         "--out", str(tmp_path / "s"), "--skip-corrupt", "--workers", "2", "--batch-size", "8",
         "--device", "cpu", "--no-progress"],
        capture_output=True, text=True, cwd=Path(__file__).parents[1],
    )
    assert proc.returncode == 0, proc.stderr
    said = [line for line in proc.stderr.splitlines() if "skipping corrupt record" in line]
    assert len(said) == 1 and f"{Path(shard1).name}, record 5: payload CRC" in said[0], said


def test_corrupt_payload_that_passes_crc_is_reported_by_parser(data, tmp_path):
    """A record whose bytes are not a tf.Example at all (valid framing) -> parse error."""
    d = tmp_path / "bad"
    spec = _write_shards(d, data["truth"][:6], per_shard=6)
    path = spec.replace("@1.gz", "-00000-of-00001.gz")

    def replace_record(raw: bytearray) -> None:
        off, n = _record_offsets(bytes(raw))[2]
        junk = b"\xff" * 10
        head = struct.pack("<Q", len(junk))
        new = (
            head
            + struct.pack("<I", masked_crc32c(head))
            + junk
            + struct.pack("<I", masked_crc32c(junk))
        )
        raw[off - 12 : off + n + 4] = new

    _rewrite_gz(path, replace_record)
    for workers in (0, 2):
        out = tmp_path / f"o{workers}"
        with pytest.raises(ExampleFormatError, match="record 2"):
            _extract(data, out, spec=spec, batch_size=4, workers=workers)
        # records 0-1, which precede the bad one inside its batch, are kept
        kept = open_store(out)
        assert kept.n == 2 and kept.meta["cursor"] == {"shard": 0, "record": 2, "position": 2}
        pd.testing.assert_frame_equal(kept.obs, data["baseline"].obs.iloc[:2])
        # resuming under --skip-corrupt finishes the same STORE without redoing them
        s = _extract(data, out, spec=spec, batch_size=4, workers=workers, skip_corrupt=True)
        assert s.n == 5 and s.meta["skipped"]["count"] == 1
        assert s.obs["record"].tolist() == [0, 1, 3, 4, 5]


# ---- input checks ----------------------------------------------------------------------


def test_example_info_mismatch_names_both_shapes_and_channels(data, tmp_path):
    d = tmp_path / "mism"
    spec = _write_shards(d, data["truth"][:4], per_shard=4, info=False)
    shard0 = spec.replace("@1.gz", "-00000-of-00001.gz")
    write_example_info(shard0, (100, 221, 8), (1, 2, 3, 4, 5, 6, 9, 10), "1.6.0")
    with pytest.raises(ExampleFormatError) as ei:
        _extract(data, tmp_path / "o", spec=spec, workers=None)
    msg = str(ei.value)
    assert "8" in msg and "7" in msg and "channels" in msg
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_without_example_info_first_record_shape_is_checked(data, tmp_path):
    d = tmp_path / "noinfo"
    rng = np.random.default_rng(1)
    t = dict(data["truth"][0], image=rng.integers(0, 255, (100, 199, 7), dtype=np.uint8))
    spec = _write_shards(d, [t], per_shard=1, info=False)
    with pytest.raises(ExampleFormatError, match=r"\[100, 199, 7\].*\[100, 221, 7\]"):
        _extract(data, tmp_path / "o", spec=spec, workers=None)
    # matching shape without example_info.json is fine
    spec2 = _write_shards(tmp_path / "noinfo2", data["truth"][:3], per_shard=3, info=False)
    s = _extract(data, tmp_path / "o2", spec=spec2)
    assert s.meta["input_check"]["source"] == "first record" and s.n == 3


# ---- CLI -------------------------------------------------------------------------------


def test_without_memory_for_whole_batches_each_batch_is_split_and_the_run_says_so(
        data, tmp_path, monkeypatch, capsys):
    torch.set_num_threads(2)
    # 2 whole batches of 8 (fp32, 100 x 221): ~90 MB, more than a quarter of 200 MB
    _memory_available(monkeypatch, 200_000_000)
    s = _extract(data, tmp_path / "tight", progress=True, commit_interval_s=0)
    err = capsys.readouterr().err
    assert "each batch is split across the 2 compute threads" in err
    assert "--batch-size 4 or less would fit" in err
    assert s.meta["extraction"]["whole_batches_in_flight"] == 0
    base = data["baseline"]
    pd.testing.assert_frame_equal(s.obs.drop(columns=list(PROB_COLUMNS)),
                                  base.obs.drop(columns=list(PROB_COLUMNS)))
    for name in base.layers:
        np.testing.assert_allclose(s.layer(name), base.layer(name), rtol=1e-4, atol=1e-4)
    # with room to spare the same run computes whole batches, silently
    _memory_available(monkeypatch, 8 << 30)
    roomy = _extract(data, tmp_path / "roomy", progress=True, limit=24)
    assert roomy.meta["extraction"]["whole_batches_in_flight"] == 2
    assert "split across" not in capsys.readouterr().err


def test_cli_interrupted_run_says_how_to_resume_also_without_progress(data, tmp_path,
                                                                    monkeypatch):
    import typer
    from typer.testing import CliRunner

    from probing import commands_extract
    from probing.extract import ExtractionInterrupted

    said = "interrupted: 8 examples are committed in X; run the same command again to resume"

    def interrupted(*args, **kwargs):
        raise ExtractionInterrupted(said)

    monkeypatch.setattr("probing.extract.extract", interrupted)
    app = typer.Typer()
    commands_extract.register(app)
    app.command("noop")(lambda: None)
    for quiet in (["--no-progress"], []):
        r = CliRunner().invoke(app, ["extract", str(data["bundle"]), data["spec"], "--out",
                                     str(tmp_path / "o"), *quiet])
        assert r.exit_code != 0
        # said once: by extract's own log with progress on (patched away here), by the
        # command with --no-progress
        assert (said in r.output) == bool(quiet), r.output


def test_cli_extract_and_user_error_exit_code(data, tmp_path):
    import typer
    from typer.testing import CliRunner

    from probing import commands_extract

    app = typer.Typer()
    commands_extract.register(app)
    app.command("noop")(lambda: None)  # two commands: keep "extract" as a subcommand
    out = tmp_path / "cli"
    r = CliRunner().invoke(
        app,
        [
            "extract",
            str(data["bundle"]),
            data["spec"],
            "--out",
            str(out),
            "--layers",
            "mixed5,mixed10",
            "--limit",
            "5",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "5 examples" in r.output
    pd.testing.assert_frame_equal(open_store(out).obs, data["baseline"].obs.iloc[:5])
    bad_pool = ["extract", str(data["bundle"]), data["spec"], "--out", str(tmp_path / "x"),
                "--pool", "median", "--device", "cpu"]
    r = CliRunner().invoke(app, bad_pool)
    assert isinstance(r.exception, DvprobeError) and "--pool must be one of" in str(r.exception)
    r = CliRunner().invoke(app, [*bad_pool[:5], "--compile", "--device", "cpu"])
    assert isinstance(r.exception, DvprobeError)
    assert "--compile is for --device cuda" in str(r.exception)
    # through the real entry point: one line, exit 2, no traceback
    proc = subprocess.run(
        [sys.executable, "-c", "import cli; cli.main()", *bad_pool],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    assert proc.returncode == 2, proc.stderr
    assert "--pool must be one of" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("case", ["device", "out_under_a_file"])
def test_cli_bad_device_or_unwritable_out_is_one_line_not_a_traceback(data, tmp_path, case):
    afile = tmp_path / "afile"
    afile.write_text("x")
    args = {"device": ["--device", "gpu", "--out", str(tmp_path / "o")],
            "out_under_a_file": ["--device", "cpu", "--out", str(afile / "store")]}[case]
    proc = subprocess.run(
        [sys.executable, "-c", "import cli; cli.main()", "extract", str(data["bundle"]),
         data["spec"], "--limit", "2", "--no-progress", *args],
        capture_output=True, text=True, cwd=Path(__file__).parents[1],
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    expected = {"device": "--device must be auto, cpu, cuda or cuda:N, got 'gpu'",
                "out_under_a_file": f"{afile}"}[case]
    assert last.startswith("dvprobe: error:") and expected in last, proc.stderr


# ---- TensorFlow's own activations --------------------------------------------------------


@pytest.mark.tf
@pytest.mark.slow
def test_extracted_layers_equal_keras_mixed_outputs(ckpt_bundle, dv_keras_model, data, tmp_path):
    """Extraction through a bundle converted from a TF checkpoint reproduces the Keras
    model's own mixed5 / mixed10 outputs, max-pooled over H and W."""
    from dvtorch.keras_dv import layer_model

    s = extract(ExtractConfig(ckpt_bundle, data["spec"], tmp_path / "tf", limit=12,
                              batch_size=6, workers=1, device="cpu"), progress=False)
    images = np.stack([t["image"] for t in data["truth"][:12]])
    x = (images.astype(np.float32) - 128.0) / 128.0
    ref = layer_model(dv_keras_model)(x, training=False)
    for n in LAYERS:
        want = ref[n].numpy().max(axis=(1, 2))
        np.testing.assert_allclose(s.layer(n), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        s.obs[["p_hom_ref", "p_het", "p_hom_alt"]].to_numpy(),
        ref["classification"].numpy(),
        rtol=1e-4,
        atol=1e-5,
    )


@pytest.mark.parametrize(("cpus", "threads", "device", "expected"), [
    (2, 2, "cpu", 0),    # no free core: decode between forwards, never preempt a compute thread
    (16, 2, "cpu", 1),   # a free core: one loader process decodes ahead
    (16, 8, "cuda", 4),  # GPU boxes: enough loaders to keep the GPU fed
    (2, 2, "cuda", 1),
    (1, 1, "cuda", 1),
])
def test_default_workers_follow_free_cores(monkeypatch, cpus, threads, device, expected):
    import probing.extract as ex

    monkeypatch.setattr(ex, "_usable_cpus", lambda: cpus)
    monkeypatch.setattr(ex.torch, "get_num_threads", lambda: threads)
    assert ex.default_workers(torch.device(device)) == expected


def test_the_total_is_estimated_from_the_shards_read_to_the_end():
    """gzip shards' record counts are unknown until read: the bar's total (and ETA) comes
    from the records per byte of the shards already done."""
    from probing.extract import estimate_total
    from probing.loader import Cursor

    sizes = [100, 100, 200]
    assert estimate_total(Cursor(shard=0, record=40, position=40), sizes) is None
    assert estimate_total(Cursor(shard=1, record=5, position=55), sizes) == 200
    assert estimate_total(Cursor(shard=2, record=0, position=90), sizes) == 180
