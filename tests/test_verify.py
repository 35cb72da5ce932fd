"""``verify`` / ``dvprobe verify``: parity of a BUNDLE against its source and runtimes."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dvtorch.errors import BundleError, ParityError


def _run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run ``dvprobe`` exactly as the console script does; returns (exit code, out, err)."""
    try:
        import cli
    except ImportError as exc:  # cli.py is not ours; report instead of failing on it
        pytest.skip(f"cli.py cannot be imported ({exc}); commands are tested via CliRunner")
    monkeypatch.setattr("sys.argv", ["dvprobe", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _invoke(*args: str):
    """Our commands on a bare typer app (independent of the other areas' registrations)."""
    import typer
    from typer.testing import CliRunner

    from dvtorch.commands import register

    app = typer.Typer()
    register(app)
    return CliRunner().invoke(app, list(args))


def _corrupt_copy(bundle: Path, dest: Path) -> Path:
    """Copy ``bundle`` and swap one BN's running_mean with its beta (a classic import bug)."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(bundle, dest)
    weights = load_file(str(dest / "weights.safetensors"))
    key = next(k for k in weights if k.endswith("running_mean") and "mixed2" in k)
    beta = key.replace("running_mean", "beta")
    assert not np.array_equal(weights[key], weights[beta])
    weights[key], weights[beta] = weights[beta].copy(), weights[key].copy()
    save_file(weights, str(dest / "weights.safetensors"))
    # Keep bundle.json consistent, as a buggy converter would: the sha256 check must not be
    # what catches this, parity must.
    meta = json.loads((dest / "bundle.json").read_text())
    digest = hashlib.sha256((dest / "weights.safetensors").read_bytes()).hexdigest()
    meta["files"]["weights.safetensors"] = digest
    (dest / "bundle.json").write_text(json.dumps(meta))
    return dest


@pytest.mark.tf
def test_verify_against_tf_source(ckpt_bundle: Path) -> None:
    from dvtorch.verify import verify

    report = verify(ckpt_bundle, batch=4, seed=7)
    print("\nverify (fresh inputs, seed 7):\n" + report.table())
    assert report.reference == "tensorflow"
    assert {"onnxruntime", "torch", "onnx2torch"} <= set(report.candidates)
    assert report.passed
    worst = max(r.rel for r in report.rows)
    assert 0.0 < worst <= 1e-4  # exactly 0 would mean we compared a backend with itself
    d = json.loads(report.to_json())
    assert d["passed"] and d["reference"] == "tensorflow" and len(d["rows"]) == len(report.rows)


@pytest.mark.tf
def test_verify_without_source_uses_onnxruntime(ckpt_bundle: Path, tmp_path: Path) -> None:
    """A recorded source that has gone is skipped with the reason; ORT becomes the reference."""
    from dvtorch.verify import verify

    moved = tmp_path / "moved"
    shutil.copytree(ckpt_bundle, moved)
    meta = json.loads((moved / "bundle.json").read_text())
    meta["source"]["path"] = str(tmp_path / "moved.ckpt")
    (moved / "bundle.json").write_text(json.dumps(meta))
    report = verify(moved, batch=2)
    assert report.reference == "onnxruntime"
    assert "no longer exists" in report.skipped["tensorflow"]
    assert report.passed


@pytest.mark.tf
def test_verify_refuses_an_explicit_source_that_is_not_there(
    ckpt_bundle: Path, tmp_path: Path
) -> None:
    """A mistyped --source must not quietly drop the TensorFlow check and still PASS."""
    from dvtorch.verify import verify

    with pytest.raises(BundleError, match=r"typo\.ckpt: no checkpoint there.*--no-tf"):
        verify(ckpt_bundle, batch=2, source=tmp_path / "typo.ckpt")
    report = verify(ckpt_bundle, batch=2, skip_tf=True)
    assert report.reference == "onnxruntime"
    assert report.skipped["tensorflow"] == "skipped on request"


@pytest.mark.tf
def test_verify_checks_the_bundle_files_before_any_parity(ckpt_bundle: Path,
                                                          tmp_path: Path) -> None:
    """A modified or missing model.onnx, or an edited input_shape, is named as such: not a
    parity failure that would blame the PyTorch port, not an onnxruntime traceback."""
    from dvtorch.verify import verify

    tampered = tmp_path / "tampered"
    shutil.copytree(ckpt_bundle, tampered)
    blob = bytearray((tampered / "model.onnx").read_bytes())
    blob[len(blob) // 2] ^= 0x01  # inside an initializer: still a loadable graph
    (tampered / "model.onnx").write_bytes(blob)
    with pytest.raises(BundleError, match=r"model\.onnx: sha256 .* was modified"):
        verify(tampered, batch=2, skip_tf=True)

    missing = tmp_path / "missing"
    shutil.copytree(ckpt_bundle, missing)
    (missing / "model.onnx").unlink()
    with pytest.raises(BundleError, match="missing, though bundle.json records it"):
        verify(missing, batch=2)

    edited = tmp_path / "edited"
    shutil.copytree(ckpt_bundle, edited)
    meta = json.loads((edited / "bundle.json").read_text())
    meta["input_shape"] = [100, 199, 7]
    (edited / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"input_shape \[100, 199, 7\] but model\.onnx takes "
                                          r"\[100, 221, 7\]"):
        verify(edited, batch=2, skip_tf=True)


@pytest.mark.tf
def test_verify_detects_swapped_bn_stats(ckpt_bundle: Path, tmp_path: Path) -> None:
    from dvtorch.verify import verify

    bad = _corrupt_copy(ckpt_bundle, tmp_path / "bad")
    with pytest.raises(ParityError, match="exceed relative") as exc:
        verify(bad, batch=2, skip_tf=True)
    assert "torch" in str(exc.value)
    report = verify(bad, batch=2, skip_tf=True, check=False)
    failed = {(r.candidate, r.layer) for r in report.rows if not r.passed}
    # The error starts at mixed2 and propagates; earlier layers still agree.
    for cand in ("torch", "torch-unfused"):
        assert (cand, "mixed2") in failed and (cand, "mixed1") not in failed
    assert not any(c == "onnx2torch" for c, _ in failed)  # the ONNX itself is intact


@pytest.mark.tf
def test_commands_verify_and_layers(ckpt_bundle: Path, tmp_path: Path) -> None:
    result = _invoke("verify", str(ckpt_bundle), "--batch", "2", "--no-tf")
    assert result.exit_code == 0, result.output
    assert "mixed5" in result.output and "PASS" in result.output
    result = _invoke("verify", str(ckpt_bundle), "--json", "--batch", "2", "--no-tf")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["passed"] is True
    bad = _corrupt_copy(ckpt_bundle, tmp_path / "bad")
    result = _invoke("verify", str(bad), "--batch", "2", "--no-tf")
    assert result.exit_code != 0 and isinstance(result.exception, ParityError)
    assert "FAIL" in result.stdout  # the table is printed before the error
    result = _invoke("layers", str(ckpt_bundle))
    assert result.exit_code == 0 and "mixed10" in result.stdout


@pytest.mark.tf
def test_cli_verify_exit_codes(ckpt_bundle: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    # --no-tf: the TF path is covered above
    code, out, _ = _run_cli(
        monkeypatch, capsys, "verify", str(ckpt_bundle), "--batch", "2", "--no-tf"
    )
    assert code == 0, out
    assert "mixed5" in out and "PASS" in out

    code, out, _ = _run_cli(
        monkeypatch, capsys, "verify", str(ckpt_bundle), "--json", "--batch", "2", "--no-tf"
    )
    assert code == 0
    assert json.loads(out)["passed"] is True

    bad = _corrupt_copy(ckpt_bundle, tmp_path / "bad")
    code, out, err = _run_cli(
        monkeypatch, capsys, "verify", str(bad), "--batch", "2", "--no-tf"
    )
    assert code == 3  # a parity failure, told apart from bad input (2) by scripts
    assert "FAIL" in out  # the table is printed before the error
    *progress_lines, error_line = err.strip().splitlines()
    assert all(line.startswith("[dvprobe] running") for line in progress_lines), err
    assert "exceed relative" in error_line  # the error itself is one line

    code, _, err = _run_cli(monkeypatch, capsys, "verify", str(tmp_path / "no-such-bundle"))
    assert code == 2 and "no-such-bundle" in err

    code, _, err = _run_cli(
        monkeypatch, capsys, "verify", str(ckpt_bundle), "--source", str(tmp_path / "typo.ckpt")
    )
    assert code == 2 and "typo.ckpt: no checkpoint there" in err


@pytest.mark.tf
def test_cli_layers(ckpt_bundle: Path, monkeypatch, capsys) -> None:
    code, out, _ = _run_cli(monkeypatch, capsys, "layers", str(ckpt_bundle))
    assert code == 0
    lines = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:]}
    assert lines["mixed5"] == ["4x12x768", "768"]
    assert lines["mixed0"] == ["10x25x256", "256"]
    assert lines["classification"][-1] == "3"
    assert "conv2d_40" not in lines
    code, out, _ = _run_cli(monkeypatch, capsys, "layers", str(ckpt_bundle), "--all")
    every = [line.split()[0] for line in out.splitlines()[1:]]
    assert code == 0 and len(every) == 116 and "conv2d_40" in every and "concatenate_1" in every
    assert "max_pooling2d_2" in every and "max_pooling2d_3" in every  # the branch pools


def test_report_table_and_json_roundtrip() -> None:
    """The report is built from real comparisons; a single bad value flips it to FAIL."""
    from dvtorch.verify import ParityReport, compare

    rng = np.random.default_rng(0)
    ref = {f"mixed{i}": rng.normal(size=(2, 3, 4, 5)) for i in range(11)}
    ref["classification"] = rng.dirichlet(np.ones(3), size=2)
    near = {k: v * (1 + 1e-7) for k, v in ref.items()}
    far = {k: v.copy() for k, v in ref.items()}
    far["mixed3"][0, 1, 1, 1] += 1.0
    report = compare({"tf": ref, "near": near, "far": far}, "tf", batch=2, inputs="unit")
    assert [r.passed for r in report.rows if r.candidate == "near"] == [True] * 23
    bad = [(r.layer, r.pool) for r in report.rows if not r.passed]
    assert ("mixed3", "max") in bad or ("mixed3", "mean") in bad
    assert all(layer == "mixed3" for layer, _ in bad)
    assert not report.passed and "FAIL" in report.table()
    again = ParityReport.from_dict(json.loads(report.to_json()))
    assert again.rows == report.rows and again.passed is False


# ---- --examples against the bundle's channel list (no TensorFlow, no ONNX) -------------

SMALL = (75, 80, 7)
WGS = [1, 2, 3, 4, 5, 6, 19]


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory) -> Path:
    """A bundle without model.onnx or source: verify refuses it only *after* checking inputs."""
    from dvtorch.bundle import save_bundle
    from dvtorch.inception import DeepVariantInceptionV3

    return save_bundle(tmp_path_factory.mktemp("small") / "bundle",
                       DeepVariantInceptionV3(SMALL).state_dict(),
                       {"input_shape": list(SMALL), "channels": WGS})


def _examples(d: Path, channels: list[int]) -> str:
    """Two records of the bundle's shape, with an example_info.json listing ``channels``."""
    from probing.examples import encode_example, write_example_info
    from probing.tfrecord import write_records

    d.mkdir()
    rng = np.random.default_rng(0)
    path = d / "ex.tfrecord.gz"
    write_records(path, [encode_example(rng.integers(0, 256, SMALL, dtype=np.uint8),
                                        chrom="chr20", start=100 + i, end=101 + i, ref="A",
                                        alts=("G",), alt_allele_indices=(0,)) for i in range(2)])
    write_example_info(path, SMALL, channels, "1.6.1")
    return str(path)


def test_examples_whose_channel_list_is_not_the_bundles_are_refused(small_bundle, tmp_path):
    from dvtorch.errors import ExampleFormatError
    from dvtorch.verify import verify
    from probing.bundle_inputs import read_pileups

    reordered = _examples(tmp_path / "reordered", [1, 2, 3, 4, 6, 5, 19])
    with pytest.raises(ExampleFormatError, match=r"channel list differs.*different order"):
        read_pileups(reordered, small_bundle, 2)
    other = _examples(tmp_path / "other", [1, 2, 3, 4, 5, 6, 9])
    with pytest.raises(ExampleFormatError, match=r"missing in examples: \[19 .*not used by"):
        read_pileups(other, small_bundle, 2)
    # the same list passes the check (and this bundle then has nothing to compare against)
    same = _examples(tmp_path / "same", WGS)
    images = read_pileups(same, small_bundle, 2)
    assert images.shape == (2, *SMALL) and images.dtype == np.uint8
    with pytest.raises(BundleError, match="nothing to verify against"):
        verify(small_bundle, images=images, batch=2)


def test_verify_refuses_pileups_of_another_shape_before_loading_the_model(small_bundle,
                                                                          monkeypatch):
    from dvtorch.verify import verify

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the pileups were checked")

    monkeypatch.setattr("dvtorch.bundle.load", no_load)
    with pytest.raises(ValueError, match=r"shape \(2, 75, 80, 6\).*\[N >= 1, 75, 80, 7\]"):
        verify(small_bundle, images=np.zeros((2, 75, 80, 6), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        verify(small_bundle, images=np.zeros((2, *SMALL), np.float32))


def test_cli_verify_refuses_other_channels_in_one_line_with_exit_2(
        small_bundle, tmp_path, monkeypatch, capsys) -> None:
    other = _examples(tmp_path / "other", [1, 2, 3, 4, 5, 6, 9])
    code, out, err = _run_cli(monkeypatch, capsys, "verify", str(small_bundle),
                              "--examples", other, "--batch", "2")
    assert code == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert line.startswith("dvprobe: error: ") and "example_info.json" in line
    assert "channel list differs" in line and "9" in line and "19" in line
