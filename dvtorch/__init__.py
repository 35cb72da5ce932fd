"""dvtorch: DeepVariant Inception-v3 in PyTorch, named like the Keras graph, built for probing.

Quick start::

    import dvtorch
    model = dvtorch.load("BUNDLE")                      # or dvtorch.reference_bundle(...)
    x = dvtorch.preprocess(images_uint8_nhwc)           # (x - 128) / 128, like call_variants
    with dvtorch.capture(model, ["mixed5"], pool="max") as acts:
        probs = model(x)
    acts["mixed5"]                                       # [N, 768]

The TensorFlow side (checkpoint / SavedModel -> BUNDLE) lives in ``dvtorch.convert`` and
needs the optional ``convert`` extra; nothing imported here needs TensorFlow.
"""

from dvtorch.bundle import load, preprocess, reference_bundle, save_bundle
from dvtorch.hooks import capture
from dvtorch.inception import DeepVariantInceptionV3, fuse_batchnorm, optimize_for_inference
from dvtorch.layers import LAYER_NAMES, LayerInfo, all_layer_names, layer_info, resolve

__all__ = [
    "DeepVariantInceptionV3",
    "LAYER_NAMES",
    "LayerInfo",
    "all_layer_names",
    "capture",
    "fuse_batchnorm",
    "layer_info",
    "load",
    "optimize_for_inference",
    "preprocess",
    "reference_bundle",
    "resolve",
    "save_bundle",
]
