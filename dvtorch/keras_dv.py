"""DeepVariant's Keras (Keras 2 / ``tf_keras``) Inception-v3, rebuilt exactly as DeepVariant builds it.

Why rebuild instead of loading the SavedModel graph: tf2onnx gives clean, named graphs
(``…/mixed5/concat``) from a Keras model, and a rebuilt model lets us restore a *training
checkpoint* (which has no graph at all). The cost is that the restore must be checked
strictly: TF's object-graph restore silently skips variables it cannot map, so
:func:`restore_weights` verifies every variable by value after restoring.

Two layouts exist in the wild (see docs/architecture.md and the formats reference §5):

* **nested** – ``keras_modeling.inceptionv3`` calls the ``InceptionV3`` backbone *as a layer*,
  so checkpoint keys are ``layer_with_weights-0/layer_with_weights-N/...`` (backbone) and
  ``layer_with_weights-1/...`` (the Dense head);
* **flat** – backbone layers live directly in the outer model: ``layer_with_weights-N/...``
  with the Dense head at ``layer_with_weights-188``.

Keys may additionally be rooted at ``model/`` (``tf.train.Checkpoint(model=m)``, how
DeepVariant's train.py writes them) or at the model itself (``model.save_weights`` and the
``variables/`` checkpoint inside a SavedModel).

TensorFlow is imported lazily: it is the optional ``convert`` extra and the probing runtime
never needs it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from dvtorch.errors import ConversionError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import tf_keras

Layout = Literal["nested", "flat"]

#: Intermediate layers exposed for parity, in network order (all Keras ``Concatenate`` outputs).
MIXED_LAYERS: tuple[str, ...] = tuple(f"mixed{i}" for i in range(11))
#: Number of trainable + non-trainable variables of the DeepVariant model: 94 conv kernels,
#: 94 BN x (beta, moving_mean, moving_variance), Dense kernel + bias.
EXPECTED_NUM_VARIABLES = 94 + 94 * 3 + 2
DROPOUT_RATE = 0.2
NUM_CLASSES = 3

_VALUE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
_FIRST_KERNEL = {
    "nested": "layer_with_weights-0/layer_with_weights-0/kernel",
    "flat": "layer_with_weights-0/kernel",
}


def import_tf() -> Any:
    """Import TensorFlow quietly, or raise a ConversionError telling how to install it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" not in sys.modules:
        # Importing torchvision *after* TensorFlow segfaults (TF 2.21 + torch 2.x wheels,
        # clashing bundled libraries); onnx2torch imports torchvision, so load it first.
        for name in ("torch", "torchvision"):
            with contextlib.suppress(ImportError):
                importlib.import_module(name)
    try:
        import tensorflow as tf
        import tf_keras  # noqa: F401  (DeepVariant models are Keras 2 models)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConversionError(
            f"TensorFlow side not installed ({exc.name} missing): "
            "install the extra with `pip install 'dvprobe[convert]'`"
        ) from None
    return tf


def _keras() -> Any:
    import_tf()
    import tf_keras

    return tf_keras


def build_model(input_shape: tuple[int, int, int], layout: Layout = "nested") -> tf_keras.Model:
    """Build DeepVariant's classifier the way ``keras_modeling.inceptionv3`` does.

    InceptionV3 backbone (no top, ``pooling='avg'``, random init) → Dropout(0.2) →
    Dense(3, softmax, float32) named ``classification``. L2 regularisers are omitted: they add
    training losses only and own no variables, so checkpoints are identical.
    """
    keras = _keras()
    import tensorflow as tf

    h, w, c = (int(v) for v in input_shape)
    backbone = keras.applications.InceptionV3(
        include_top=False, weights=None, input_shape=(h, w, c), pooling="avg"
    )
    if layout == "nested":
        hid = backbone(backbone.input)
    elif layout == "flat":
        hid = backbone.output
    else:
        raise ValueError(f"layout must be 'nested' or 'flat', not {layout!r}")
    hid = keras.layers.Dropout(DROPOUT_RATE)(hid)
    out = keras.layers.Dense(
        NUM_CLASSES, activation="softmax", dtype=tf.float32, name="classification"
    )(hid)
    model = keras.Model(inputs=backbone.input, outputs=out, name="inceptionv3")
    model.dv_layout = layout  # remembered for layer_model()
    return model


def backbone_of(model: tf_keras.Model) -> tf_keras.Model:
    """The sub-model that owns ``mixed0``…``mixed10`` (the backbone when nested, else ``model``)."""
    for layer in model.layers:
        if layer.__class__.__name__ == "Functional" and any(
            sub.name == "mixed0" for sub in layer.layers
        ):
            return layer
    return model


def layer_model(model: tf_keras.Model) -> tf_keras.Model:
    """A Keras model with the same weights returning ``{mixed0..mixed10, classification}``.

    Works for both layouts because the nested model is built on the backbone's own input.
    """
    keras = _keras()
    body = backbone_of(model)
    outputs = {name: body.get_layer(name).output for name in MIXED_LAYERS}
    outputs["classification"] = model.output
    return keras.Model(inputs=model.input, outputs=outputs, name="inceptionv3_layers")


# --------------------------------------------------------------------------- checkpoints


@dataclass
class CheckpointLayout:
    """How a checkpoint's object graph is organised."""

    layout: Layout
    root: str  # "model/" for tf.train.Checkpoint(model=m), "" for save_weights / SavedModel
    num_channels: int
    variables: dict[str, tuple[int, ...]] = field(repr=False)  # checkpoint key -> shape


def _unreadable(prefix: str | Path, exc: BaseException) -> ConversionError:
    """The error for checkpoint bytes TF cannot read: a cut-short or corrupted download.

    Why a message of its own: TF reports these as IndexError("Read less bytes than
    requested") or a DataLossError about checksums, which read like a bug or a wrong model.
    """
    first = str(exc).splitlines()[0] if str(exc) else ""
    return ConversionError(
        f"{prefix}: the checkpoint's data cannot be read ({type(exc).__name__}: {first}); a "
        "file is truncated or corrupt: download it again (`dvprobe weights fetch` checks "
        "sha256)"
    )


def _is_damage(tf: Any, exc: BaseException) -> bool:
    """Whether ``exc`` from TF's checkpoint reader means damaged bytes (not a wrong model)."""
    return isinstance(exc, (IndexError, tf.errors.DataLossError, tf.errors.OutOfRangeError))


def _read_object_graph(reader: Any, prefix: str | Path) -> Any:
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    if not reader.has_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"):
        raise ConversionError(
            f"{prefix}: a TF1 name-based checkpoint (no object graph); DeepVariant 1.6+ "
            "checkpoints are TF2 object-based — this is not one of them"
        )
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    return graph


def _child(graph: Any, node: int | None, name: str) -> int | None:
    if node is None:
        return None
    return next((c.node_id for c in graph.nodes[node].children if c.local_name == name), None)


def _variable_key(graph: Any, node: int | None) -> str | None:
    if node is None:
        return None
    return next(
        (a.checkpoint_key for a in graph.nodes[node].attributes if a.name == "VARIABLE_VALUE"),
        None,
    )


def inspect_checkpoint(prefix: str | Path) -> CheckpointLayout:
    """Detect layout, root and channel count from the checkpoint's object graph.

    Keys alone are not enough: TF names each variable by the *first* path found, so a
    nested model saved with ``tf.saved_model.save`` stores backbone weights as
    ``variables/N`` while ``Checkpoint(model=m)`` stores the same ones as
    ``model/layer_with_weights-0/layer_with_weights-N/...``. The object graph has both.
    """
    tf = import_tf()
    try:
        reader = tf.train.load_checkpoint(str(prefix))
    except Exception as exc:  # tf raises NotFoundError / DataLossError / ...
        raise ConversionError(
            f"{prefix}: cannot read TensorFlow checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    try:
        graph = _read_object_graph(reader, prefix)
    except (IndexError, tf.errors.OpError) as exc:
        raise _unreadable(prefix, exc) from exc
    shapes = reader.get_variable_to_shape_map()
    for root, model_node in (("model/", _child(graph, 0, "model")), ("", 0)):
        first = _child(graph, model_node, "layer_with_weights-0")
        for layout, kernel_node in (
            ("nested", _child(graph, _child(graph, first, "layer_with_weights-0"), "kernel")),
            ("flat", _child(graph, first, "kernel")),
        ):
            key = _variable_key(graph, kernel_node)
            if key is None or len(shapes.get(key, ())) != 4:
                continue
            # Every variable reachable from the model node (optimizer slots hang off the
            # optimizer, a sibling, and are not reached).
            keys: set[str] = set()
            seen, stack = set(), [model_node]
            while stack:
                node = stack.pop()
                if node in seen:
                    continue
                seen.add(node)
                if (k := _variable_key(graph, node)) is not None:
                    keys.add(k)
                stack.extend(c.node_id for c in graph.nodes[node].children)
            return CheckpointLayout(
                layout,  # type: ignore[arg-type]
                root,
                int(shapes[key][2]),
                {k: tuple(shapes[k]) for k in sorted(keys)},
            )
    sample = ", ".join(sorted(shapes)[:3])
    raise ConversionError(
        f"{prefix}: not a DeepVariant Inception-v3 checkpoint (no "
        f"'layer_with_weights-0/…/kernel' convolution in its object graph; first keys: {sample})"
    )


def _fingerprints(arrays: list[np.ndarray]) -> Counter[tuple[Any, ...]]:
    return Counter(
        (a.shape, str(a.dtype), hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest())
        for a in arrays
    )


def restore_weights(model: tf_keras.Model, prefix: str | Path, info: CheckpointLayout) -> int:
    """Restore ``prefix`` into ``model`` and prove that every variable was mapped.

    Checks, in order: the checkpoint holds exactly :data:`EXPECTED_NUM_VARIABLES` model
    variables; TF's own ``assert_existing_objects_matched``; then, independently of TF's
    bookkeeping, that the model's 378 values after restore are exactly the checkpoint's 378
    values (as a multiset of byte-identical tensors) — a variable left at its initial value
    or restored from the wrong tensor cannot pass. Positions are then proven by parity
    (and, for SavedModels, against the SavedModel's own serving graph).
    Returns the number of verified variables.
    """
    tf = import_tf()
    if len(model.weights) != EXPECTED_NUM_VARIABLES:
        raise ConversionError(
            f"internal: rebuilt model has {len(model.weights)} variables, "
            f"expected {EXPECTED_NUM_VARIABLES}"
        )
    if len(info.variables) != EXPECTED_NUM_VARIABLES:
        raise ConversionError(
            f"{prefix}: checkpoint holds {len(info.variables)} model variables, a DeepVariant "
            f"Inception-v3 has {EXPECTED_NUM_VARIABLES}; this is not a DeepVariant model "
            "(or a different architecture)"
        )
    ckpt = (
        tf.train.Checkpoint(model=model)
        if info.root == "model/"
        else tf.train.Checkpoint(root=model)
    )
    try:
        status = ckpt.read(str(prefix))
        status.assert_existing_objects_matched()
        status.expect_partial()  # optimizer slots, save_counter, EMA copies are not ours
    except (AssertionError, ValueError, IndexError, tf.errors.OpError) as exc:
        if _is_damage(tf, exc):
            raise _unreadable(prefix, exc) from exc
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConversionError(
            f"{prefix}: checkpoint does not match DeepVariant's {info.layout} Inception-v3 "
            f"({first})"
        ) from None

    reader = tf.train.load_checkpoint(str(prefix))
    try:
        source = _fingerprints([reader.get_tensor(k) for k in info.variables])
    except (IndexError, tf.errors.OpError) as exc:
        raise _unreadable(prefix, exc) from exc
    restored = _fingerprints([w.numpy() for w in model.weights])
    if source != restored:
        unmatched = sum((source - restored).values())
        raise ConversionError(
            f"{prefix}: {unmatched} of {EXPECTED_NUM_VARIABLES} checkpoint variables were not "
            "restored faithfully into the rebuilt model"
        )
    return len(info.variables)


def load_checkpoint(
    prefix: str | Path, input_shape: tuple[int, int, int]
) -> tuple[tf_keras.Model, CheckpointLayout]:
    """Rebuild the model in the checkpoint's layout and restore it strictly."""
    info = inspect_checkpoint(prefix)
    if info.num_channels != int(input_shape[2]):
        raise ConversionError(
            f"{prefix}: the checkpoint's first convolution takes {info.num_channels} channels "
            f"but example_info/--shape says {int(input_shape[2])}; fix example_info.json or "
            "--shape/--channels"
        )
    model = build_model(input_shape, info.layout)
    restore_weights(model, prefix, info)
    return model, info


def load_savedmodel(
    directory: str | Path, input_shape: tuple[int, int, int]
) -> tuple[tf_keras.Model, CheckpointLayout]:
    """Rebuild a SavedModel's Keras model from its ``variables/variables`` checkpoint."""
    return load_checkpoint(Path(directory) / "variables" / "variables", input_shape)


def savedmodel_predict(directory: str | Path, x: np.ndarray) -> np.ndarray:
    """Run the SavedModel's own ``serving_default`` graph (independent of our rebuild).

    DeepVariant's call_variants reads the ``classification`` output of this signature.
    """
    tf = import_tf()
    loaded = tf.saved_model.load(str(directory))
    fn = loaded.signatures["serving_default"]
    (arg_name,) = fn.structured_input_signature[1].keys()
    out = fn(**{arg_name: tf.constant(x, dtype=tf.float32)})
    key = "classification" if "classification" in out else next(iter(out))
    return out[key].numpy()


# --------------------------------------------------------------------------- test helpers


def randomize_all_weights(model: tf_keras.Model, seed: int) -> None:
    """Give *every* variable a distinct random value, BN statistics included.

    Default Keras init leaves beta = moving_mean = 0 and moving_variance = 1, so a converter
    that drops or swaps BN statistics would still match; randomising all of them (variance
    strictly positive) makes any mapping error visible. Scales keep activations O(1) through
    94 layers so the softmax stays unsaturated and errors are not hidden by saturation.
    """
    rng = np.random.default_rng(seed)
    for var in model.weights:
        name = var.name.split("/")[-1].split(":")[0]
        shape = tuple(var.shape)
        if name == "kernel" and len(shape) == 4:
            fan_in = shape[0] * shape[1] * shape[2]
            value = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
        elif name == "kernel":
            value = rng.normal(0.0, 3.0 / np.sqrt(shape[0]), shape)
        elif name == "bias":
            value = rng.normal(0.0, 0.5, shape)
        elif name == "beta":
            value = rng.normal(0.0, 0.3, shape)
        elif name == "moving_mean":
            value = rng.normal(0.1, 0.2, shape)
        elif name == "moving_variance":
            value = rng.uniform(0.5, 2.0, shape)
        else:  # pragma: no cover - the DeepVariant model has no other variable kinds
            raise ValueError(f"unexpected variable {var.name}")
        var.assign(value.astype(np.float32))


_CONV_NAME = re.compile(r"^conv2d(_\d+)?$")


def conv_layer_names(model: tf_keras.Model) -> list[str]:
    """Keras names of the 94 convolutions (handy for tests and diagnostics)."""
    return [layer.name for layer in backbone_of(model).layers if _CONV_NAME.match(layer.name)]
