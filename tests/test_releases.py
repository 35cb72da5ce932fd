"""Loading a released model by name: ``dvtorch.load("deepvariant-1.10.0-wgs")`` and
``dvprobe extract deepvariant-1.10.0-wgs ...`` find the BUNDLE in the cache, a path still
wins, a missing bundle says how to make it, and a typo gets suggestions.

The TF-free tests put an untrained reference bundle where the cache keeps the release; the
``tf`` test downloads a real (randomised) Keras SavedModel from a loopback mirror by running
the very commands the error prints, then loads and extracts with the release name.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
from test_weights import server as loopback_mirror  # noqa: F401  (the fixture)
from typer.testing import CliRunner

import dvtorch
import weights
from dvtorch.errors import BundleError
from probing.channels import WGS_CHANNELS, WGS_SHAPE
from probing.examples import encode_example, write_example_info
from probing.extract import ExtractConfig, extract
from probing.tfrecord import write_records

RELEASE = "deepvariant-1.10.0-wgs"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own cache (never the user's) and no ambient mirror."""
    monkeypatch.setenv("DVPROBE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DVPROBE_CACHE", raising=False)
    monkeypatch.delenv("DVPROBE_WEIGHTS_MIRROR", raising=False)


def _cached_reference_bundle() -> Path:
    """An untrained bundle where the cache keeps ``RELEASE``'s conversion."""
    path = weights.default_bundle(weights.release_entries(RELEASE)[0])
    dvtorch.reference_bundle(path, seed=3)
    return path


def _examples(d: Path, n: int = 6) -> str:
    """``n`` WGS-shaped examples in one uncompressed TFRecord, with example_info.json."""
    rng = np.random.default_rng(0)
    d.mkdir(parents=True, exist_ok=True)
    path = d / "ex.tfrecord"
    write_records(path, [
        encode_example(rng.integers(0, 255, WGS_SHAPE, dtype=np.uint8), chrom="chr20",
                       start=1000 + 10 * i, end=1001 + 10 * i, ref="A", alts=("G",),
                       alt_allele_indices=(0,))
        for i in range(n)])
    write_example_info(path, WGS_SHAPE, WGS_CHANNELS, "1.10.0")
    return str(path)


def _cli(*args: str):
    from cli import app

    return CliRunner().invoke(app, list(args))


def test_load_by_release_name_finds_the_cached_bundle():
    path = _cached_reference_bundle()
    assert path == Path(dvtorch.resolve_bundle(RELEASE))
    model = dvtorch.load(RELEASE)
    assert model.bundle_meta["untrained"] is True
    assert model.input_shape == WGS_SHAPE


def test_an_existing_path_wins_over_a_release_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dvtorch.reference_bundle(tmp_path / RELEASE, seed=1)  # a local dir named like a release
    assert dvtorch.resolve_bundle(RELEASE) == Path(RELEASE)
    assert dvtorch.load(RELEASE).bundle_meta["source"]["seed"] == 1
    assert dvtorch.resolve_bundle("no/such/dir") == Path("no/such/dir")  # a path: as today
    with pytest.raises(BundleError, match="not a bundle directory"):
        dvtorch.load("no/such/dir")


def test_a_release_not_converted_yet_names_the_commands_one_per_line():
    entry = weights.release_entries(RELEASE)[0]
    with pytest.raises(BundleError) as info:
        dvtorch.load(RELEASE)
    lines = str(info.value).splitlines()
    assert str(weights.default_bundle(entry)) in lines[0]
    assert f"  dvprobe weights fetch {entry.name} --convert" in lines
    assert f"  dvprobe weights fetch {entry.name}" in lines
    assert (f"  dvprobe convert {weights.default_dest(entry)} --out "
            f"{weights.default_bundle(entry)}") in lines


def test_a_release_name_with_a_typo_gets_did_you_mean():
    with pytest.raises(weights.UnknownModelError, match="did you mean deepvariant-1.10.0-wgs"):
        dvtorch.load("deepvariant-1.10.0-wsg")


def test_extract_by_release_name_records_the_resolved_bundle(tmp_path):
    bundle = _cached_reference_bundle()
    spec = _examples(tmp_path / "ex")
    by_name = extract(ExtractConfig(RELEASE, spec, tmp_path / "a", layers=["mixed5"],
                                    workers=0, device="cpu", batch_size=4), progress=False)
    by_path = extract(ExtractConfig(bundle, spec, tmp_path / "b", layers=["mixed5"],
                                    workers=0, device="cpu", batch_size=4), progress=False)
    meta = json.loads((tmp_path / "a" / "store.json").read_text())
    assert meta["bundle"] == str(bundle.resolve())
    assert meta["inputs"]["bundle_sha256"] == json.loads(
        (tmp_path / "b" / "store.json").read_text())["inputs"]["bundle_sha256"]
    np.testing.assert_array_equal(by_name.layer("mixed5"), by_path.layer("mixed5"))


def test_cli_extract_by_release_name(tmp_path):
    spec = _examples(tmp_path / "ex")
    res = _cli("extract", RELEASE, spec, "--out", str(tmp_path / "s"), "--layers", "mixed5",
               "--device", "cpu", "--workers", "0", "--no-progress")
    assert isinstance(res.exception, BundleError)  # nothing converted yet
    assert "dvprobe weights fetch deepvariant-1.10.0-wgs-savedmodel --convert" in str(
        res.exception)
    _cached_reference_bundle()
    res = _cli("extract", RELEASE, spec, "--out", str(tmp_path / "s"), "--layers", "mixed5",
               "--device", "cpu", "--workers", "0", "--no-progress")
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert (tmp_path / "s" / "store.json").is_file()


# ------------------------------------------------------------ the printed commands, for real


def _publish_savedmodel(state, entry: weights.ModelEntry, savedmodel: Path) -> None:
    """Serve a SavedModel directory on the loopback mirror at ``entry``'s bucket path."""
    for file in entry.files:
        src = savedmodel / file
        if not src.is_file():
            pytest.fail(f"fixture SavedModel lacks {file}")
        state.files["/" + entry.bucket_path + file] = src.read_bytes()


@pytest.mark.tf
@pytest.mark.slow
def test_the_commands_in_the_error_make_the_bundle_that_loads_by_name(
        dv_savedmodel, loopback_mirror, monkeypatch, tmp_path):  # noqa: F811
    base, state = loopback_mirror
    entry = weights.release_entries(RELEASE)[0]
    _publish_savedmodel(state, entry, dv_savedmodel)
    monkeypatch.setenv("DVPROBE_WEIGHTS_MIRROR", base)
    with pytest.raises(BundleError) as info:
        dvtorch.load(RELEASE)
    steps = [line.strip() for line in str(info.value).splitlines()
             if line.startswith("  dvprobe ") and not line.endswith("--convert")]
    assert len(steps) == 2
    for step in steps:
        res = _cli(*shlex.split(step)[1:], *(["--no-progress"] if "fetch" in step else []))
        assert res.exit_code == 0, step + "\n" + res.output + repr(res.exception)
    model = dvtorch.load(RELEASE)
    assert model.bundle_meta["source"]["download"]["name"] == entry.name
    assert model.bundle_meta["parity"]["passed"] is True
    store = extract(ExtractConfig(RELEASE, _examples(tmp_path / "ex"), tmp_path / "s",
                                  layers=["mixed5"], workers=0, device="cpu"), progress=False)
    assert len(store.obs) == 6


@pytest.mark.tf
@pytest.mark.slow
def test_fetch_convert_does_both_in_one_command(dv_savedmodel, loopback_mirror,  # noqa: F811
                                                tmp_path):
    base, state = loopback_mirror
    entry = weights.get("deepvariant-1.10.0-wgs-savedmodel")
    _publish_savedmodel(state, entry, dv_savedmodel)
    res = _cli("weights", "fetch", RELEASE, "--convert", "--mirror", base, "--no-progress")
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert f"bundle {weights.default_bundle(entry)}" in res.output
    assert dvtorch.load(RELEASE).bundle_meta["source"]["download"]["name"] == entry.name
    res = _cli("weights", "fetch", RELEASE, "--convert", "--mirror", base, "--no-progress")
    assert res.exit_code == 0 and "already exists" in res.output
