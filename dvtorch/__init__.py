"""dvtorch: DeepVariant Inception-v3 in PyTorch, named like the Keras graph, built for probing.

Quick start::

    import dvtorch
    model = dvtorch.load("BUNDLE")                      # a plain nn.Module
    model = dvtorch.load("deepvariant-1.10.0-wgs")      # a release, converted in the cache
    probs, cache = dvtorch.run_with_cache(model, images_uint8_nhwc, ["mixed5"])
    with dvtorch.patch(model, {"mixed5": lambda out, name: out * 0}):
        ablated = model(images_uint8_nhwc)
    engine = dvtorch.make_engine(model, ["mixed5"], pool="max")   # fast bulk inference
    probs, acts = engine(images_uint8_nhwc)              # acts["mixed5"]: [N, 768]

The TensorFlow side (checkpoint / SavedModel -> BUNDLE) lives in ``dvtorch.convert`` and
needs the optional ``convert`` extra; nothing imported here needs TensorFlow.
"""

# Lazy exports: ``dvtorch.errors`` is imported by torch-free code (STORE reading), which
# must not pay for importing torch through this package's __init__.
_EXPORTS = {
    "load": "dvtorch.bundle", "preprocess": "dvtorch.bundle",
    "reference_bundle": "dvtorch.bundle", "save_bundle": "dvtorch.bundle",
    "resolve_bundle": "dvtorch.bundle",
    "capture": "dvtorch.hooks", "patch": "dvtorch.hooks", "run_with_cache": "dvtorch.hooks",
    "make_engine": "dvtorch.engine",
    "DeepVariantInceptionV3": "dvtorch.inception", "fuse_batchnorm": "dvtorch.inception",
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
    "make_engine",
    "patch",
    "preprocess",
    "reference_bundle",
    "resolve",
    "resolve_bundle",
    "run_with_cache",
    "save_bundle",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dvtorch' has no attribute {name!r}")
