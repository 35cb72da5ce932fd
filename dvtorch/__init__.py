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

# Lazy exports: ``dvtorch.errors`` is imported by torch-free code (STORE reading), which
# must not pay for importing torch through this package's __init__.
_EXPORTS = {
    "load": "dvtorch.bundle", "preprocess": "dvtorch.bundle",
    "reference_bundle": "dvtorch.bundle", "save_bundle": "dvtorch.bundle",
    "capture": "dvtorch.hooks",
    "DeepVariantInceptionV3": "dvtorch.inception", "fuse_batchnorm": "dvtorch.inception",
    "optimize_for_inference": "dvtorch.inception",
    "LAYER_NAMES": "dvtorch.layers", "LayerInfo": "dvtorch.layers",
    "all_layer_names": "dvtorch.layers", "layer_info": "dvtorch.layers",
    "resolve": "dvtorch.layers",
}

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


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dvtorch' has no attribute {name!r}")
