"""The few protobuf messages DeepVariant examples use, defined without TensorFlow or protoc.

Why this module exists: reading ``make_examples`` output must not require TensorFlow (a
2 GB dependency) nor generated ``_pb2`` files (which would need protoc at build time and
pin a protobuf runtime version). Instead the message schemas are written here as
``FileDescriptorProto`` objects in Python and turned into classes by the protobuf runtime.

Wire compatibility: field numbers, types, labels and proto syntax are copied from upstream
(``tensorflow/core/example/{example,feature}.proto``,
``third_party/nucleus/protos/variants.proto``, ``deepvariant/protos/deepvariant.proto``), so
bytes written by TensorFlow / nucleus parse here and bytes written here parse there. Fields
this project never reads (``Variant.info``, ``VariantCall.info``,
``CallVariantsOutput.debug_info``) are left out on purpose; protobuf keeps them as unknown
fields, so a parse -> serialize round trip still preserves them.

Isolation: the descriptors live in a *private* ``DescriptorPool``. TensorFlow registers its
own ``tensorflow.Example`` in the default pool; adding ours there would clash ("duplicate
file name" / "conflicting definition") whenever both are imported in one process.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto

_POOL = descriptor_pool.DescriptorPool()


def _field(
    msg: descriptor_pb2.DescriptorProto,
    name: str,
    number: int,
    ftype: int,
    *,
    repeated: bool = False,
    type_name: str | None = None,
    oneof_index: int | None = None,
    packed: bool | None = None,
) -> None:
    """Append one field definition to ``msg`` (keeps the schema tables below readable)."""
    f = msg.field.add()
    f.name = name
    f.number = number
    f.type = ftype
    f.label = _F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL
    if type_name is not None:
        f.type_name = type_name
    if oneof_index is not None:
        f.oneof_index = oneof_index
    if packed is not None:
        f.options.packed = packed


def _example_file() -> descriptor_pb2.FileDescriptorProto:
    """tensorflow/core/example/{feature,example}.proto merged into one private file."""
    fd = descriptor_pb2.FileDescriptorProto(
        name="dvprobe/tensorflow_example.proto", package="tensorflow", syntax="proto3"
    )
    bl = fd.message_type.add(name="BytesList")
    _field(bl, "value", 1, _F.TYPE_BYTES, repeated=True)
    fl = fd.message_type.add(name="FloatList")
    _field(fl, "value", 1, _F.TYPE_FLOAT, repeated=True, packed=True)
    il = fd.message_type.add(name="Int64List")
    _field(il, "value", 1, _F.TYPE_INT64, repeated=True, packed=True)

    feat = fd.message_type.add(name="Feature")
    feat.oneof_decl.add(name="kind")
    _field(feat, "bytes_list", 1, _F.TYPE_MESSAGE, type_name=".tensorflow.BytesList", oneof_index=0)
    _field(feat, "float_list", 2, _F.TYPE_MESSAGE, type_name=".tensorflow.FloatList", oneof_index=0)
    _field(feat, "int64_list", 3, _F.TYPE_MESSAGE, type_name=".tensorflow.Int64List", oneof_index=0)

    feats = fd.message_type.add(name="Features")
    entry = feats.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    _field(entry, "key", 1, _F.TYPE_STRING)
    _field(entry, "value", 2, _F.TYPE_MESSAGE, type_name=".tensorflow.Feature")
    _field(
        feats,
        "feature",
        1,
        _F.TYPE_MESSAGE,
        repeated=True,
        type_name=".tensorflow.Features.FeatureEntry",
    )

    ex = fd.message_type.add(name="Example")
    _field(ex, "features", 1, _F.TYPE_MESSAGE, type_name=".tensorflow.Features")
    return fd


def _variants_file() -> descriptor_pb2.FileDescriptorProto:
    """The subset of nucleus ``variants.proto`` that examples carry (Variant, VariantCall)."""
    fd = descriptor_pb2.FileDescriptorProto(
        name="dvprobe/nucleus_variants.proto", package="nucleus.genomics.v1", syntax="proto3"
    )
    call = fd.message_type.add(name="VariantCall")
    _field(call, "genotype_likelihood", 6, _F.TYPE_DOUBLE, repeated=True)
    _field(call, "genotype", 7, _F.TYPE_INT32, repeated=True)
    _field(call, "call_set_name", 9, _F.TYPE_STRING)
    _field(call, "is_phased", 10, _F.TYPE_BOOL)
    # info = 2 (map<string, ListValue>) deliberately omitted: kept as unknown fields.

    var = fd.message_type.add(name="Variant")
    _field(var, "names", 3, _F.TYPE_STRING, repeated=True)
    _field(var, "reference_bases", 6, _F.TYPE_STRING)
    _field(var, "alternate_bases", 7, _F.TYPE_STRING, repeated=True)
    _field(var, "quality", 8, _F.TYPE_DOUBLE)
    _field(var, "filter", 9, _F.TYPE_STRING, repeated=True)
    _field(
        var,
        "calls",
        11,
        _F.TYPE_MESSAGE,
        repeated=True,
        type_name=".nucleus.genomics.v1.VariantCall",
    )
    _field(var, "end", 13, _F.TYPE_INT64)
    _field(var, "reference_name", 14, _F.TYPE_STRING)
    _field(var, "start", 16, _F.TYPE_INT64)
    # info = 10 omitted (see module docstring); id=2, created=12, variant_set_id=15 are
    # deprecated upstream and never written by DeepVariant.
    return fd


def _deepvariant_file() -> descriptor_pb2.FileDescriptorProto:
    """``CallVariantsOutput`` with its nested ``AltAlleleIndices`` (deepvariant.proto)."""
    fd = descriptor_pb2.FileDescriptorProto(
        name="dvprobe/deepvariant.proto",
        package="learning.genomics.deepvariant",
        syntax="proto3",
        dependency=["dvprobe/nucleus_variants.proto"],
    )
    cvo = fd.message_type.add(name="CallVariantsOutput")
    aai = cvo.nested_type.add(name="AltAlleleIndices")
    _field(aai, "indices", 1, _F.TYPE_INT32, repeated=True)
    _field(cvo, "variant", 1, _F.TYPE_MESSAGE, type_name=".nucleus.genomics.v1.Variant")
    _field(
        cvo,
        "alt_allele_indices",
        2,
        _F.TYPE_MESSAGE,
        type_name=".learning.genomics.deepvariant.CallVariantsOutput.AltAlleleIndices",
    )
    _field(cvo, "genotype_probabilities", 3, _F.TYPE_DOUBLE, repeated=True)
    # debug_info = 4 omitted (kept as unknown fields).
    return fd


for _fd in (_example_file(), _variants_file(), _deepvariant_file()):
    _POOL.Add(_fd)


def _cls(full_name: str) -> type:
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(full_name))


BytesList = _cls("tensorflow.BytesList")
FloatList = _cls("tensorflow.FloatList")
Int64List = _cls("tensorflow.Int64List")
Feature = _cls("tensorflow.Feature")
Features = _cls("tensorflow.Features")
Example = _cls("tensorflow.Example")
VariantCall = _cls("nucleus.genomics.v1.VariantCall")
Variant = _cls("nucleus.genomics.v1.Variant")
CallVariantsOutput = _cls("learning.genomics.deepvariant.CallVariantsOutput")
AltAlleleIndices = _cls("learning.genomics.deepvariant.CallVariantsOutput.AltAlleleIndices")

__all__ = [
    "AltAlleleIndices",
    "BytesList",
    "CallVariantsOutput",
    "Example",
    "Feature",
    "Features",
    "FloatList",
    "Int64List",
    "Variant",
    "VariantCall",
]
