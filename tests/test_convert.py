"""DeepVariant checkpoint / SavedModel / ONNX → BUNDLE, with parity asserted per layer.

The source models have every weight randomised (BN moving statistics and beta included), so a
wrong or partial mapping shows up as a numeric difference, not as a silent pass.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dvtorch.errors import BundleError, ConversionError, ParityError

MIXED = [f"mixed{i}" for i in range(11)]
INPUT_SHAPE = (100, 221, 7)  # the WGS shape the conftest models are built with


def _report(bundle: Path):
    from dvtorch.verify import ParityReport

    meta = json.loads((bundle / "bundle.json").read_text())
    return meta, ParityReport.from_dict(meta["parity"])


def _assert_full_parity(report, candidates: set[str]) -> None:
    """Every mixedN under max and mean, and the softmax, for every candidate, within 1e-4."""
    assert report.reference == "tensorflow"
    assert candidates <= set(report.candidates), (report.candidates, report.skipped)
    for cand in candidates - {"savedmodel-signature"}:
        seen = {(r.layer, r.pool) for r in report.rows if r.candidate == cand}
        assert seen == {(m, p) for m in MIXED for p in ("max", "mean")} | {("classification", "-")}
    for row in report.rows:
        assert row.passed, row
        assert row.rel <= 1e-4, row
        assert row.ref_max_abs > 0.0, row  # a dead (all-zero) layer would make parity vacuous
        if row.layer == "classification":
            assert row.argmax_agree == 1.0
    assert report.passed


# --------------------------------------------------------------------------- happy paths


@pytest.mark.tf
def test_convert_nested_checkpoint(ckpt_bundle: Path, dv_keras_ckpt: Path) -> None:
    meta, report = _report(ckpt_bundle)
    print("\nnested checkpoint parity:\n" + report.table())
    _assert_full_parity(report, {"onnxruntime", "torch", "torch-unfused", "onnx2torch"})
    assert meta["source"]["kind"] == "checkpoint"
    assert set(meta["source"]["files"]) == {
        "deepvariant.wgs.ckpt.index",
        "deepvariant.wgs.ckpt.data-00000-of-00001",
        "example_info.json",
    }
    from dvtorch.files import sha256_file

    assert meta["source"]["files"]["example_info.json"] == sha256_file(
        dv_keras_ckpt.parent / "example_info.json"
    )
    assert meta["deepvariant_version"] == "1.6.1"
    assert meta["input_shape"] == list(INPUT_SHAPE)
    assert meta["channels"] == [1, 2, 3, 4, 5, 6, 19]
    assert meta["opset"] == 17
    for tool in ("tensorflow", "tf2onnx", "onnx", "onnxruntime", "onnx2torch", "torch"):
        assert meta["converters"][tool], tool
    assert (ckpt_bundle / "model.onnx").is_file()
    # Nothing left behind beside the bundle (staging directories are removed).
    assert [p.name for p in ckpt_bundle.parent.iterdir()] == [ckpt_bundle.name]


@pytest.mark.tf
def test_convert_savedmodel(savedmodel_bundle: Path) -> None:
    meta, report = _report(savedmodel_bundle)
    print("\nSavedModel parity:\n" + report.table())
    # savedmodel-signature = the SavedModel's own serving graph, independent of our rebuild.
    _assert_full_parity(
        report, {"onnxruntime", "torch", "torch-unfused", "onnx2torch", "savedmodel-signature"}
    )
    assert meta["source"]["kind"] == "savedmodel"
    assert "saved_model.pb" in meta["source"]["files"]
    assert "variables/variables.index" in meta["source"]["files"]


@pytest.mark.tf
def test_same_weights_same_bundle(ckpt_bundle: Path, savedmodel_bundle: Path) -> None:
    """Checkpoint and SavedModel of one model must give identical native weights."""
    from safetensors.numpy import load_file

    a = load_file(str(ckpt_bundle / "weights.safetensors"))
    b = load_file(str(savedmodel_bundle / "weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.tf
@pytest.mark.slow
def test_convert_flat_checkpoint(dv_flat_ckpt: Path, tmp_path: Path) -> None:
    """Flat layout (backbone layers in the outer model), keys rooted at the model itself."""
    from dvtorch import keras_dv
    from dvtorch.convert import convert

    info = keras_dv.inspect_checkpoint(dv_flat_ckpt)
    assert (info.layout, info.root, info.num_channels) == ("flat", "", 7)
    out = convert(dv_flat_ckpt, tmp_path / "flat_bundle")
    _, report = _report(out)
    print("\nflat checkpoint parity:\n" + report.table())
    _assert_full_parity(report, {"onnxruntime", "torch", "torch-unfused", "onnx2torch"})


@pytest.mark.tf
def test_convert_onnx_source(dv_onnx_path: Path, tmp_path: Path) -> None:
    """An .onnx source: shape from the graph input, channels from the flag; ORT is reference."""
    from dvtorch.convert import convert

    out = convert(dv_onnx_path, tmp_path / "b", channels="1,2,3,4,5,6,19")
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["source"]["kind"] == "onnx"
    assert meta["input_shape"] == list(INPUT_SHAPE)
    assert meta["parity"]["reference"] == "onnxruntime"
    assert meta["parity"]["passed"]
    assert {"torch", "onnx2torch"} <= set(meta["parity"]["candidates"])


# --------------------------------------------------------------------------- strict restore


@pytest.mark.tf
def test_restore_rejects_backbone_only_checkpoint(tmp_path: Path) -> None:
    """A backbone-only checkpoint maps onto the flat model but would leave the head random.

    TF's object-graph restore accepts it silently; the variable count must refuse it.
    """
    from dvtorch import keras_dv

    tf = keras_dv.import_tf()
    import tf_keras

    backbone = tf_keras.applications.InceptionV3(
        include_top=False, weights=None, input_shape=INPUT_SHAPE, pooling="avg"
    )
    prefix = tf.train.Checkpoint(model=backbone).write(str(tmp_path / "bb.ckpt"))
    info = keras_dv.inspect_checkpoint(prefix)
    assert info.layout == "flat"
    with pytest.raises(ConversionError, match="holds 376 model variables.*has 378"):
        keras_dv.load_checkpoint(prefix, INPUT_SHAPE)


@pytest.mark.tf
def test_not_a_deepvariant_checkpoint(tmp_path: Path) -> None:
    """Any other TF checkpoint is named as such, not half-restored."""
    from dvtorch import keras_dv

    tf = pytest.importorskip("tensorflow")
    prefix = tf.train.Checkpoint(v=tf.Variable([1.0, 2.0])).write(str(tmp_path / "other"))
    with pytest.raises(ConversionError, match="not a DeepVariant Inception-v3 checkpoint"):
        keras_dv.inspect_checkpoint(prefix)


# --------------------------------------------------------------------------- bad inputs


def _copy_ckpt(prefix: Path, dest: Path, *, data: bool = True, info: bool = True) -> Path:
    dest.mkdir(parents=True)
    shutil.copyfile(f"{prefix}.index", dest / f"{prefix.name}.index")
    if data:
        shutil.copyfile(
            f"{prefix}.data-00000-of-00001", dest / f"{prefix.name}.data-00000-of-00001"
        )
    if info:
        shutil.copyfile(prefix.parent / "example_info.json", dest / "example_info.json")
    return dest / prefix.name


@pytest.mark.tf
def test_missing_example_info(dv_keras_ckpt: Path, tmp_path: Path) -> None:
    from dvtorch.convert import convert

    prefix = _copy_ckpt(dv_keras_ckpt, tmp_path / "m", info=False)
    out = tmp_path / "out"
    with pytest.raises(ConversionError) as exc:
        convert(prefix, out)
    msg = str(exc.value)
    assert "example_info.json" in msg and "--example-info" in msg and "--shape" in msg
    assert "--channels" in msg
    assert not out.exists()


@pytest.mark.tf
def test_missing_data_file(dv_keras_ckpt: Path, tmp_path: Path) -> None:
    from dvtorch.convert import convert

    prefix = _copy_ckpt(dv_keras_ckpt, tmp_path / "m", data=False)
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=r"deepvariant\.wgs\.ckpt\.data-00000-of-00001"):
        convert(prefix, out)
    assert not out.exists()


def test_not_a_model_directory(tmp_path: Path) -> None:
    from dvtorch.convert import convert

    d = tmp_path / "notamodel"
    d.mkdir()
    (d / "README.txt").write_text("hello")
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match="not a model directory"):
        convert(d, out)
    assert not out.exists()


def test_missing_source(tmp_path: Path) -> None:
    from dvtorch.convert import convert

    with pytest.raises(ConversionError, match="no such checkpoint prefix"):
        convert(tmp_path / "nothing.ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.tf
@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_corrupt_onnx(kind: str, tmp_path: Path, request) -> None:
    from dvtorch.convert import convert

    bad = tmp_path / "bad.onnx"
    if kind == "garbage":
        bad.write_bytes(b"this is not a protobuf \x00\xff" * 10)
    else:
        good = request.getfixturevalue("dv_onnx_path").read_bytes()
        bad.write_bytes(good[: len(good) // 3])
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match="corrupt or invalid ONNX"):
        convert(bad, out, shape="100,221,7", channels="1,2,3,4,5,6,19")
    assert not out.exists()


@pytest.mark.tf
def test_channel_mismatch_checkpoint(dv_keras_ckpt: Path, tmp_path: Path) -> None:
    from dvtorch.convert import convert

    info = tmp_path / "ei.json"
    info.write_text(
        json.dumps({"version": "1.6.1", "shape": [100, 221, 6], "channels": [1, 2, 3, 4, 5, 6]})
    )
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=r"takes 7 channels.*says 6"):
        convert(dv_keras_ckpt, out, example_info=info)
    assert not out.exists()


@pytest.mark.tf
def test_channel_mismatch_onnx(dv_onnx_path: Path, tmp_path: Path) -> None:
    from dvtorch.convert import convert

    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=r"C=7 .*C=8"):
        convert(dv_onnx_path, out, shape="100,221,8", channels="1,2,3,4,5,6,19,9")
    assert not out.exists()


@pytest.mark.tf
def test_an_onnx_source_needs_only_its_channels(dv_onnx_path: Path, tmp_path: Path) -> None:
    from dvtorch.convert import convert

    with pytest.raises(ConversionError, match=r"or --channels c1,c2,… \(the graph gives the "
                                              r"shape"):
        convert(dv_onnx_path, tmp_path / "out")


@pytest.mark.tf
def test_channels_flag_disagrees_with_shape(dv_onnx_path: Path, tmp_path: Path) -> None:
    from dvtorch.convert import convert

    with pytest.raises(ConversionError, match="3 entries but the shape says C=7"):
        convert(dv_onnx_path, tmp_path / "out", channels="1,2,3")


@pytest.mark.tf
def test_existing_out_needs_overwrite(dv_onnx_path: Path, tmp_path: Path) -> None:
    from dvtorch.convert import convert

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ConversionError, match="--overwrite"):
        convert(dv_onnx_path, out, channels="1,2,3,4,5,6,19")
    # --overwrite replaces bundles only: a directory of someone else's is never deleted
    with pytest.raises(BundleError, match="not a dvprobe BUNDLE"):
        convert(dv_onnx_path, out, channels="1,2,3,4,5,6,19", overwrite=True)
    assert (out / "keep.txt").read_text() == "x"
    shutil.rmtree(out)
    convert(dv_onnx_path, out, channels="1,2,3,4,5,6,19", check_parity=False)
    first = json.loads((out / "bundle.json").read_text())
    convert(dv_onnx_path, out, channels="1,2,3,4,5,6,19", overwrite=True)
    second = json.loads((out / "bundle.json").read_text())
    assert first["parity"] is None and second["parity"]["passed"]  # replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging left


@pytest.mark.tf
def test_a_killed_conversions_staging_is_removed_by_the_next(dv_onnx_path: Path,
                                                             tmp_path: Path) -> None:
    import os
    import subprocess

    from dvtorch.convert import convert
    from dvtorch.files import writer_dir

    done = subprocess.Popen(["true"])
    done.wait()  # a pid no process has any more
    mine = writer_dir(tmp_path, "out")  # named as a conversion of this process names it
    host = mine.name.split(".")[3]
    dead = tmp_path / f".out.dvprobe-tmp.{host}.{done.pid}.abc123"
    alive = tmp_path / f".out.dvprobe-tmp.{host}.{os.getpid()}.def456"  # a conversion running
    other = tmp_path / f".out.dvprobe-tmp.otherhost.{done.pid}.ghi789"  # on another machine
    for d in (dead, alive, other):
        (d / "bundle").mkdir(parents=True)
    convert(dv_onnx_path, tmp_path / "out", channels="1,2,3,4,5,6,19", check_parity=False)
    assert not dead.exists() and alive.is_dir() and other.is_dir() and mine.is_dir()


@pytest.mark.tf
def test_overwrite_never_deletes_the_source(dv_keras_ckpt: Path, tmp_path: Path) -> None:
    """`--out` naming the checkpoint's own directory (or one above it) is refused up front."""
    from dvtorch.convert import convert

    prefix = _copy_ckpt(dv_keras_ckpt, tmp_path / "download")
    before = sorted(p.name for p in prefix.parent.iterdir())
    for out in (prefix.parent, tmp_path):
        with pytest.raises(BundleError, match="holds the source"):
            convert(prefix, out, overwrite=True)
    assert sorted(p.name for p in prefix.parent.iterdir()) == before


def test_out_under_a_file_is_refused_before_converting(tmp_path: Path) -> None:
    from dvtorch.convert import convert

    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConversionError, match="afile is a file, not a directory"):
        convert(tmp_path / "nothing.ckpt", tmp_path / "afile" / "sub")


@pytest.mark.tf
@pytest.mark.parametrize("damage", ["truncated", "flipped byte"])
def test_damaged_checkpoint_data_is_one_line(damage: str, dv_keras_ckpt: Path,
                                             tmp_path: Path) -> None:
    """An interrupted or bit-rotted download: TF's IndexError / DataLossError, named as such."""
    from dvtorch.convert import convert

    prefix = _copy_ckpt(dv_keras_ckpt, tmp_path / "m")
    data = Path(f"{prefix}.data-00000-of-00001")
    blob = bytearray(data.read_bytes())
    if damage == "truncated":
        data.write_bytes(blob[: len(blob) // 2])
    else:
        blob[len(blob) // 3] ^= 0xFF
        data.write_bytes(blob)
    with pytest.raises(ConversionError, match="truncated or corrupt: download it again"):
        convert(prefix, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.tf
def test_download_record_is_checked_and_kept(dv_keras_ckpt: Path, tmp_path: Path) -> None:
    """checksums.json from `dvprobe weights fetch` beside the source: checked, then recorded."""
    from dvtorch.convert import DOWNLOAD_LOCK, convert
    from dvtorch.files import sha256_file
    from weights.fetch import LOCK_FORMAT, LOCK_NAME

    assert DOWNLOAD_LOCK == LOCK_NAME
    prefix = _copy_ckpt(dv_keras_ckpt, tmp_path / "m")
    data = Path(f"{prefix}.data-00000-of-00001")
    lock = {"format": LOCK_FORMAT, "name": "deepvariant-1.6.1-wgs-checkpoint",
            "deepvariant_version": "1.6.1", "confidence": "official",
            "files": {data.name: {"sha256": "0" * 64, "size": 1, "url": "https://x/y",
                                  "fetched": "2026-11-29T00:00:00+00:00",
                                  "verified_against": "trust-on-first-use"}}}
    (prefix.parent / LOCK_NAME).write_text(json.dumps(lock))
    with pytest.raises(ConversionError, match=r"differs from its download recorded in .*"
                                              r"checksums\.json.*fetch it again"):
        convert(prefix, tmp_path / "out", check_parity=False)
    lock["files"][data.name]["sha256"] = sha256_file(data)
    (prefix.parent / LOCK_NAME).write_text(json.dumps(lock))
    out = convert(prefix, tmp_path / "out", check_parity=False)
    source = json.loads((out / "bundle.json").read_text())["source"]
    assert source["download"]["name"] == "deepvariant-1.6.1-wgs-checkpoint"
    assert source["download"]["files"][data.name]["url"] == "https://x/y"
    assert LOCK_NAME not in source["files"]


@pytest.mark.tf
def test_incomplete_sources_name_the_missing_file(dv_keras_ckpt: Path, dv_savedmodel: Path,
                                                  tmp_path: Path) -> None:
    from dvtorch.convert import convert

    prefix = _copy_ckpt(dv_keras_ckpt, tmp_path / "noindex")
    Path(f"{prefix}.index").unlink()
    with pytest.raises(ConversionError, match=r"checkpoint index .*ckpt\.index is missing"):
        convert(prefix, tmp_path / "out")
    sm = tmp_path / "sm"
    shutil.copytree(dv_savedmodel, sm)
    next((sm / "variables").glob("variables.data-*")).unlink()
    with pytest.raises(ConversionError, match=r"variables\.data-00000-of-00001 is missing"):
        convert(sm, tmp_path / "out")
    for shape in ("0,0,7", "-5,221,7", "60,221,7"):
        with pytest.raises(ConversionError, match="H and W must be at least 75"):
            convert(dv_keras_ckpt, tmp_path / "out", shape=shape)
    with pytest.raises(ConversionError, match=r"--opset 99: tf2onnx .* writes opsets"):
        convert(dv_keras_ckpt, tmp_path / "out", opset=99)
    assert not (tmp_path / "out").exists()


@pytest.mark.tf
def test_parity_failure_writes_nothing(dv_onnx_path: Path, tmp_path: Path, monkeypatch) -> None:
    """A wrong weight import is caught by the parity gate and OUT is never created."""
    import dvtorch.onnx_import as oi
    from dvtorch.convert import convert

    real = oi.state_dict_from_onnx

    def swapped_bn(model):
        sd = real(model)
        key = next(k for k in sd if k.endswith("running_mean") and "mixed5" in k)
        beta = key.replace("running_mean", "beta")
        sd[key], sd[beta] = sd[beta].clone(), sd[key].clone()
        return sd

    monkeypatch.setattr(oi, "state_dict_from_onnx", swapped_bn)
    out = tmp_path / "out"
    with pytest.raises(ParityError, match="nothing written"):
        convert(dv_onnx_path, out, channels="1,2,3,4,5,6,19")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_cli_convert_error_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    try:
        import cli
    except ImportError as exc:  # cli.py is not ours; report instead of failing on it
        pytest.skip(f"cli.py cannot be imported ({exc})")
    d = tmp_path / "empty"
    d.mkdir()
    monkeypatch.setattr("sys.argv", ["dvprobe", "convert", str(d), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a model directory" in err


def test_a_models_flags_for_calling_are_kept_for_the_bundle(tmp_path: Path) -> None:
    """A model example_info.json listing the flags run_deepvariant calls it with (small model
    included) hands them on; flags given on the command line keep them too."""
    from dvtorch.convert import Source, read_example_info, resolve_example_info

    flags = {"trained_small_model_path": "/opt/smallmodels/wgs", "track_ref_reads": True}
    path = tmp_path / "example_info.json"
    path.write_text(json.dumps({"version": "1.10.0", "shape": [100, 221, 7],
                                "channels": [1, 2, 3, 4, 5, 6, 19], "flags_for_calling": flags}))
    assert read_example_info(path).flags_for_calling == flags
    src = Source("checkpoint", tmp_path / "deepvariant.wgs.ckpt", [])
    assert resolve_example_info(src, None, None, None).flags_for_calling == flags
    path.write_text(json.dumps({"shape": [100, 221, 7], "channels": [1, 2, 3, 4, 5, 6, 19]}))
    assert resolve_example_info(src, None, None, None).flags_for_calling is None
