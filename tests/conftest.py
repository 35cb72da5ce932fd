"""Shared pytest fixtures.

TensorFlow artefacts (a randomised DeepVariant model saved as checkpoint and SavedModel, its
ONNX export and the converted bundles) are expensive on a 2-core machine, so they are
session-scoped and built once per test run under ``tmp_path_factory``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Importing torchvision after TensorFlow segfaults with the TF 2.21 / torch 2.x wheels
# (onnx2torch pulls torchvision in). Load the torch side first, before any test imports TF.
for _name in ("torch", "torchvision"):
    with contextlib.suppress(ImportError):
        __import__(_name)

INPUT_SHAPE = (100, 221, 7)
WGS_EXAMPLE_INFO = {
    "version": "1.6.1",
    "shape": list(INPUT_SHAPE),
    "channels": [1, 2, 3, 4, 5, 6, 19],
}
WEIGHT_SEED = 20240611


def write_example_info(path: Path, info: dict | None = None) -> Path:
    """Write DeepVariant's example_info.json (default: the 1.6.1 WGS model's)."""
    path.write_text(json.dumps(info or WGS_EXAMPLE_INFO))
    return path


def _tf():
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf_keras")
    pytest.importorskip("tf2onnx")
    from dvtorch import keras_dv

    return keras_dv.import_tf()


@pytest.fixture(scope="session")
def dv_keras_model():
    """DeepVariant's nested Keras model with *every* weight randomised (BN stats included)."""
    _tf()
    from dvtorch import keras_dv

    model = keras_dv.build_model(INPUT_SHAPE, "nested")
    keras_dv.randomize_all_weights(model, WEIGHT_SEED)
    return model


@pytest.fixture(scope="session")
def dv_keras_ckpt(tmp_path_factory, dv_keras_model) -> Path:
    """Checkpoint prefix written the way DeepVariant's train.py does (``Checkpoint(model=…)``)."""
    tf = _tf()
    d = tmp_path_factory.mktemp("ckpt_nested") / "wgs"
    d.mkdir()
    prefix = d / "deepvariant.wgs.ckpt"
    tf.train.Checkpoint(model=dv_keras_model).write(str(prefix))
    write_example_info(d / "example_info.json")
    return prefix


@pytest.fixture(scope="session")
def dv_flat_ckpt(tmp_path_factory) -> Path:
    """Same architecture in the flat layout, saved with ``model.save_weights`` (root keys)."""
    _tf()
    from dvtorch import keras_dv

    model = keras_dv.build_model(INPUT_SHAPE, "flat")
    keras_dv.randomize_all_weights(model, WEIGHT_SEED + 1)
    d = tmp_path_factory.mktemp("ckpt_flat")
    prefix = d / "deepvariant.wgs.ckpt"
    model.save_weights(str(prefix))
    (d / "checkpoint").unlink(missing_ok=True)  # save_weights' bookkeeping file, not needed
    write_example_info(d / "example_info.json")
    return prefix


@pytest.fixture(scope="session")
def dv_savedmodel(tmp_path_factory, dv_keras_model) -> Path:
    """``tf.saved_model.save`` of the same model, example_info.json inside (as released)."""
    tf = _tf()
    d = tmp_path_factory.mktemp("savedmodel") / "deepvariant.wgs.savedmodel"
    tf.saved_model.save(dv_keras_model, str(d))
    write_example_info(d / "example_info.json")
    return d


@pytest.fixture(scope="session")
def ckpt_bundle(tmp_path_factory, dv_keras_ckpt) -> Path:
    """Bundle converted from the nested checkpoint (parity checked during conversion)."""
    from dvtorch.convert import convert

    return convert(dv_keras_ckpt, tmp_path_factory.mktemp("bundles") / "ckpt_bundle")


@pytest.fixture(scope="session")
def savedmodel_bundle(tmp_path_factory, dv_savedmodel) -> Path:
    from dvtorch.convert import convert

    return convert(dv_savedmodel, tmp_path_factory.mktemp("bundles") / "sm_bundle")


@pytest.fixture(scope="session")
def dv_onnx_path(tmp_path_factory, ckpt_bundle) -> Path:
    """tf2onnx export of the nested model (the one stored in the checkpoint's bundle)."""
    d = tmp_path_factory.mktemp("onnx")
    path = d / "deepvariant.wgs.onnx"
    shutil.copyfile(ckpt_bundle / "model.onnx", path)
    return path
