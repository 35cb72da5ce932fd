"""Model types other than WGS, end to end: their shapes and channel lists reach every stage.

DeepVariant builds the same Inception-v3 for every model type; what changes is the input:
PacBio 1.9+ pileups are 147 columns wide with 10 channels (haplotype, base methylation and
the two alt-aligned diff channels: ``[1,2,3,4,5,6,7,23,9,10]``, the 1.9.0 testdata
example_info.json), hybrid models drop insert size (6 channels), MAS-Seq keeps width 199, and
DeepTrio stacks child and parent reads into taller pileups (``[140,221,9]``,
google/deepvariant issue 488). The shape and channel list always come from example_info.json.

Two kinds of test:

* without TensorFlow, for every shape the registry establishes: an untrained reference
  BUNDLE of that shape → examples → extract → cluster → report, and ``show`` / the report
  name the bundle's channels (never the WGS default);
* with TensorFlow (``tf``, ``slow``; two tests, minutes each on 2 cores): a Keras model built
  as DeepVariant builds it, every weight randomised, through convert → verify → extract →
  cluster → report, once per checkpoint layout: a DeepTrio-sized model in the *flat* layout
  written the way DeepVariant's train.py writes checkpoints, and a PacBio model in the
  *nested* layout served as DeepVariant 1.10.0's PacBio SavedModel from a loopback mirror and
  made a BUNDLE by ``dvprobe weights fetch NAME --convert``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_weights import server as loopback_mirror  # noqa: F401  (the fixture)
from typer.testing import CliRunner

import dvtorch
import weights
from dvtorch.errors import ExampleFormatError
from probing import analysis as pa
from probing import show as sh
from probing.channels import channel_name
from probing.examples import encode_example, write_example_info
from probing.extract import ExtractConfig, extract
from probing.report import build_report
from probing.tfrecord import write_records

#: (shape, channels) of the non-WGS inputs the TF fixtures use.
PACBIO = ((100, 147, 10), (1, 2, 3, 4, 5, 6, 7, 23, 9, 10))  # DeepVariant 1.9.0 testdata
# DeepTrio's shape (issue 488); the channel list (WGS's plus the alt-aligned diff channels)
# is illustrative: what matters is that nothing downstream assumes 100 rows or 7 channels.
TRIO = ((140, 221, 9), (1, 2, 3, 4, 5, 6, 19, 9, 10))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Never the user's cache, never an ambient mirror."""
    monkeypatch.setenv("DVPROBE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DVPROBE_CACHE", raising=False)
    monkeypatch.delenv("DVPROBE_WEIGHTS_MIRROR", raising=False)


def _registry_inputs() -> dict[str, tuple[tuple[int, int, int], tuple[int, ...]]]:
    """Every distinct non-WGS (shape, channels) the registry states, by one entry's name."""
    seen: dict[tuple, str] = {}
    for e in weights.list_models():
        if e.shape is None or e.channels is None or tuple(e.shape) == (100, 221, 7):
            continue
        seen.setdefault((tuple(e.shape), tuple(e.channels)), e.name)
    return {name: key for key, name in seen.items()}


REGISTRY_INPUTS = _registry_inputs()


def write_examples(d: Path, shape, channels, n: int = 16, version: str = "1.10.0") -> str:
    """``n`` examples of ``shape`` (pileup-like: a reference band, reads, a variant column)
    in one gzip shard, with example_info.json naming ``channels``."""
    rng = np.random.default_rng(sum(shape))
    d.mkdir(parents=True, exist_ok=True)
    h, w, c = shape
    payloads = []
    for i in range(n):
        img = np.zeros(shape, np.uint8)
        depth = 10 + (i * 7) % (h - 10)
        img[:5] = rng.integers(30, 255, (1, w, c), dtype=np.uint8)
        img[5:5 + depth] = rng.integers(0, 255, (depth, w, c), dtype=np.uint8)
        img[5:5 + depth:2, w // 2] = 254
        pos = 10_000 + 50 * i
        payloads.append(encode_example(img, chrom="chr20", start=pos, end=pos + 1, ref="A",
                                       alts=("G",), alt_allele_indices=(0,), label=i % 3))
    shard = d / "make_examples.tfrecord-00000-of-00001.gz"
    write_records(shard, payloads)
    write_example_info(shard, shape, channels, version)
    return str(shard)


def labels_of(channels) -> list[str]:
    return [f"{c} {channel_name(c)}" for c in channels]


def extract_and_show(bundle, spec: str, out: Path, channels, layers=("mixed5",)):
    """extract, then ``show`` one STORE row: the figure names the bundle's channels."""
    store = extract(ExtractConfig(bundle, spec, out / "store", layers=list(layers), workers=0,
                                  device="cpu", batch_size=8), progress=False)
    assert store.meta["channels"] == list(channels)
    figure = sh.show(store=store.path, key=store.obs["key"].iat[1], out=out / "show.svg")
    text = figure[0].path.read_text()
    for label in labels_of(channels):
        assert label in text, label
    if 19 not in channels:
        assert "insert_size" not in text  # no WGS label drawn on another model's pileup
    return store


def run_chain(bundle, spec: str, out: Path, channels):
    """extract → show → k-means → report; the report's pileup thumbnails name the bundle's
    channels. Returns the STORE."""
    store = extract_and_show(bundle, spec, out, channels, layers=("mixed5", "mixed10"))
    run = pa.cluster(store, "kmeans", layer="mixed5", k=3, pca=4, seed=0, run="km",
                     backend="sklearn")
    assert set(run.obs["cluster"]) <= {0, 1, 2} and len(run.obs) == store.n
    build_report(store, out / "report.html", thumbnails=3)
    html = (out / "report.html").read_text()
    for label in labels_of(channels):
        assert json.dumps(label) in html, label
    if 19 not in channels:
        assert "insert_size" not in html
    return store


# --------------------------------------------------------------------- without TensorFlow


@pytest.mark.parametrize("name", sorted(REGISTRY_INPUTS))
def test_every_registry_input_shape_extracts_and_shows_its_own_channels(name, tmp_path):
    shape, channels = REGISTRY_INPUTS[name]
    bundle = dvtorch.reference_bundle(tmp_path / "bundle", seed=1, input_shape=shape,
                                      channels=channels)
    spec = write_examples(tmp_path / "ex", shape, channels, n=4)
    store = extract_and_show(bundle, spec, tmp_path, channels)
    assert store.layer("mixed5").shape == (4, 768)


def test_the_registry_states_the_non_wgs_shapes_these_tests_rely_on():
    inputs = set(REGISTRY_INPUTS.values())
    assert PACBIO in inputs  # the verified 1.9.0 PacBio shape
    assert ((100, 221, 6), (1, 2, 3, 4, 5, 6)) in inputs  # hybrid: no insert size
    assert any(shape[1] == 199 for shape, _ in inputs)  # MAS-Seq / older long-read width


def test_a_taller_trio_pileup_runs_extract_cluster_report_and_show(tmp_path):
    shape, channels = TRIO
    bundle = dvtorch.reference_bundle(tmp_path / "bundle", seed=2, input_shape=shape,
                                      channels=channels)
    assert dvtorch.load(bundle).input_shape == shape
    run_chain(bundle, write_examples(tmp_path / "ex", shape, channels, n=9), tmp_path, channels)


def test_examples_of_another_channel_set_are_refused_naming_both(tmp_path):
    """Same shape, another channel list (PacBio's with mean coverage instead of
    methylation): refused before any work, both lists named."""
    shape, channels = PACBIO
    bundle = dvtorch.reference_bundle(tmp_path / "bundle", seed=1, input_shape=shape,
                                      channels=channels)
    other = (1, 2, 3, 4, 5, 6, 7, 22, 9, 10)
    spec = write_examples(tmp_path / "ex", shape, other, n=2)
    with pytest.raises(ExampleFormatError) as err:
        extract(ExtractConfig(bundle, spec, tmp_path / "s", layers=["mixed5"], workers=0,
                              device="cpu"), progress=False)
    msg = str(err.value)
    assert "23 base_methylation" in msg and "22 mean_coverage" in msg
    assert not (tmp_path / "s" / "store.json").exists()
    # ... and so are examples of another shape (a WGS run handed to the PacBio bundle)
    wgs = write_examples(tmp_path / "wgs", (100, 221, 7), (1, 2, 3, 4, 5, 6, 19), n=2)
    with pytest.raises(ExampleFormatError, match=r"\[100, 221, 7\].*\[100, 147, 10\]"):
        extract(ExtractConfig(bundle, wgs, tmp_path / "s2", layers=["mixed5"], workers=0,
                              device="cpu"), progress=False)


def test_show_without_a_channel_list_does_not_guess_wgs_names():
    """A 7-channel pileup whose channels nobody recorded is labelled by position: a WGS
    name on another model's channel would mislead."""
    labels = [label for label, _ in sh.channel_images(np.zeros((100, 221, 7), np.uint8), None)]
    assert labels == [f"channel {i}" for i in range(7)]
    named = sh.channel_images(np.zeros((100, 147, 10), np.uint8), PACBIO[1])
    assert named[7][0] == "23 base_methylation"


# --------------------------------------------------------------------- with TensorFlow


def _keras_model(shape, layout: str, seed: int):
    pytest.importorskip("tf2onnx")
    from dvtorch import keras_dv

    keras_dv.import_tf()
    import tf_keras

    tf_keras.backend.clear_session()
    model = keras_dv.build_model(shape, layout)
    keras_dv.randomize_all_weights(model, seed)
    return model


def _keras_probabilities(model, spec: str) -> np.ndarray:
    from probing.examples import read_examples

    images = np.stack([np.array(ex.image) for ex in read_examples(spec)]).astype(np.float32)
    return model.predict((images - 128.0) / 128.0, verbose=0)


def _assert_parity(bundle: Path, candidates: set[str]) -> None:
    from test_convert import _assert_full_parity, _report

    _, report = _report(bundle)
    print("\n" + report.table())
    _assert_full_parity(report, candidates)
    softmax = [r for r in report.rows if r.layer == "classification"]
    assert softmax and all(r.rel <= 1e-5 for r in softmax), softmax  # the bar


def _verify_on_examples(bundle, spec: str) -> None:
    from dvtorch.verify import verify
    from probing.bundle_inputs import read_pileups

    report = verify(bundle, images=read_pileups(spec, bundle, 4), inputs=f"examples {spec}")
    assert report.passed and report.reference == "tensorflow", report.table()


@pytest.mark.tf
@pytest.mark.slow
def test_deeptrio_flat_checkpoint_converts_and_runs_the_whole_chain(tmp_path):
    """Flat layout, keys ``model/layer_with_weights-N/...`` (``Checkpoint(model=m)``, as
    DeepVariant's train.py saves), DeepTrio's taller [140,221,9] input."""
    from dvtorch import keras_dv
    from dvtorch.convert import convert

    tf = keras_dv.import_tf()
    shape, channels = TRIO
    model = _keras_model(shape, "flat", seed=140)
    d = tmp_path / "checkpoints" / "trio"
    d.mkdir(parents=True)
    prefix = tf.train.Checkpoint(model=model).write(str(d / "deepvariant.wgs_child.ckpt"))
    write_example_info(d / "example_info.json", shape, channels, "1.6.0")
    keys = tf.train.load_checkpoint(prefix).get_variable_to_shape_map()
    first = "model/layer_with_weights-0/kernel/.ATTRIBUTES/VARIABLE_VALUE"
    assert keys[first] == [3, 3, 9, 32]  # the name keras_modeling reads the channels from
    assert not any("layer_with_weights-0/layer_with_weights-0" in k for k in keys)
    layout = keras_dv.inspect_checkpoint(prefix)
    assert (layout.layout, layout.root, layout.num_channels) == ("flat", "model/", 9)

    bundle = convert(prefix, tmp_path / "bundle")
    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["input_shape"] == list(shape) and meta["channels"] == list(channels)
    assert meta["deepvariant_version"] == "1.6.0"
    _assert_parity(bundle, {"onnxruntime", "torch", "torch-unfused", "onnx2torch"})

    spec = write_examples(tmp_path / "ex", shape, channels, n=12, version="1.6.0")
    _verify_on_examples(bundle, spec)
    store = run_chain(bundle, spec, tmp_path / "chain", channels)
    got = store.obs[["p_hom_ref", "p_het", "p_hom_alt"]].to_numpy()
    np.testing.assert_allclose(got, _keras_probabilities(model, spec), rtol=1e-4, atol=1e-5)


@pytest.mark.tf
@pytest.mark.slow
def test_pacbio_1_10_nested_savedmodel_fetched_converted_and_run_by_name(
        loopback_mirror, tmp_path):  # noqa: F811
    """Nested layout (the backbone called as a layer) in a SavedModel of PacBio's
    [100,147,10] input, published on a loopback mirror at the registry's path of
    DeepVariant 1.10.0's PacBio model: ``weights fetch NAME --convert`` checks it and makes
    the BUNDLE, which then runs by its release name."""
    from dvtorch import keras_dv

    tf = keras_dv.import_tf()
    shape, channels = PACBIO
    model = _keras_model(shape, "nested", seed=147)
    saved = tmp_path / "deepvariant.pacbio.savedmodel"
    tf.saved_model.save(model, str(saved))
    write_example_info(saved / "example_info.json", shape, channels, "1.10.0")
    layout = keras_dv.inspect_checkpoint(saved / "variables" / "variables")
    assert (layout.layout, layout.num_channels) == ("nested", 10)

    base, state = loopback_mirror
    entry = weights.get("deepvariant-1.10.0-pacbio-savedmodel")
    for file in entry.files:
        state.files["/" + entry.bucket_path + file] = (saved / file).read_bytes()
    res = CliRunner().invoke(__import__("cli").app, [
        "weights", "fetch", entry.release, "--convert", "--mirror", base, "--no-progress"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    bundle = weights.default_bundle(entry)
    assert f"bundle {bundle}" in res.output
    _assert_parity(bundle, {"onnxruntime", "torch", "torch-unfused", "onnx2torch",
                            "savedmodel-signature"})
    loaded = dvtorch.load(entry.release)
    assert loaded.input_shape == shape
    assert loaded.bundle_meta["source"]["download"]["name"] == entry.name

    spec = write_examples(tmp_path / "ex", shape, channels, n=12, version="1.10.0")
    # `verify` on examples is the flat test's: one more TensorFlow pass here buys nothing
    store = run_chain(entry.release, spec, tmp_path / "chain", channels)
    got = store.obs[["p_hom_ref", "p_het", "p_hom_alt"]].to_numpy()
    np.testing.assert_allclose(got, _keras_probabilities(model, spec), rtol=1e-4, atol=1e-5)
