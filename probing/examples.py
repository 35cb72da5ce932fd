"""DeepVariant ``make_examples`` records without TensorFlow: parse, encode, example_info.json.

A record is a serialized ``tf.Example`` whose features are listed in
``docs/deepvariant-formats.md`` §1. This module turns one into a
:class:`DVExample` (image as a uint8 HWC numpy array plus the candidate variant) and back,
byte-compatible with what ``make_examples`` writes, so the same files feed DeepVariant's
``call_variants`` and this project.

Decoding cost matters (a genome has millions of 150 kB records): the image is exposed as a
read-only ``np.frombuffer`` view on the bytes protobuf hands back, i.e. no copy beyond the
one protobuf makes when it extracts the ``image/encoded`` value. :func:`iter_example_batches`
then copies each image once into a contiguous batch array ready for the model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from dvtorch.errors import ExampleFormatError
from dvtorch.files import atomic_write_bytes
from probing import protos
from probing.channels import channel_name
from probing.tfrecord import ReadStats, expand_spec, iter_records

# Feature keys (docs/deepvariant-formats.md §1).
K_IMAGE = "image/encoded"
K_SHAPE = "image/shape"
K_VARIANT = "variant/encoded"
K_AAI = "alt_allele_indices/encoded"
K_LOCUS = "locus"
K_VARIANT_TYPE = "variant_type"
K_LABEL = "label"
K_SEQ_TYPE = "sequencing_type"

# EncodedVariantType (make_examples_native.h).
VARIANT_TYPE_UNKNOWN = 0
VARIANT_TYPE_SNP = 1
VARIANT_TYPE_INDEL = 2


@dataclass
class DVExample:
    """One decoded pileup example.

    ``image`` is a read-only view on the record's bytes (copy it to modify it). ``start`` /
    ``end`` are the Variant's 0-based half-open coordinates. ``alts`` holds *all* alternate
    alleles of the candidate; ``alt_allele_indices`` selects the subset this example's image
    (channel read_supports_variant) and label refer to. ``label`` is None for calling
    examples; ``sequencing_type`` None when the writer did not set it. ``path``/``record``
    locate the record for error messages and for joining results back to files.
    """

    image: np.ndarray
    locus: str
    chrom: str
    start: int
    end: int
    ref: str
    alts: tuple[str, ...]
    alt_allele_indices: tuple[int, ...]
    variant_type: int
    label: int | None
    sequencing_type: int | None
    path: str
    record: int

    @property
    def key(self) -> str:
        """Unique row key (see :func:`example_key`)."""
        return example_key(self.chrom, self.start, self.ref, self.alts, self.alt_allele_indices)

    @property
    def alt(self) -> str:
        """Alternate alleles comma-joined (the ``alt`` obs column)."""
        return ",".join(self.alts)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.image.shape)  # type: ignore[return-value]


def example_key(
    chrom: str, start: int, ref: str, alts: Sequence[str], alt_allele_indices: Sequence[int]
) -> str:
    """``chrom:pos:ref>alt:aai`` with pos 0-based, alts and indices comma-joined.

    The alt-allele indices are part of the key because a multi-allelic site yields several
    examples (one per alt subset) that share chrom, pos, ref and alts.
    """
    return (
        f"{chrom}:{int(start)}:{ref}>{','.join(alts)}:"
        f"{','.join(str(int(i)) for i in alt_allele_indices)}"
    )


def encoded_variant_type(ref: str, alts: Sequence[str]) -> int:
    """DeepVariant's ``EncodedVariantType`` over *all* alts of the candidate.

    SNP (1) when ref and every alt are one base (and there is at least one alt); INDEL (2)
    when ref or any alt is longer; otherwise UNKNOWN (0). Mirrors make_examples_native.cc.
    """
    if len(ref) == 1 and alts and all(len(a) == 1 for a in alts):
        return VARIANT_TYPE_SNP
    if len(ref) > 1 or any(len(a) > 1 for a in alts):
        return VARIANT_TYPE_INDEL
    return VARIANT_TYPE_UNKNOWN


def alternate_contig_name(c: str) -> str:
    """The same contig in the other naming convention: ``chr20`` <-> ``20``, ``chrM`` <->
    ``MT`` (UCSC vs Ensembl/GRCh), for matching files that name contigs differently."""
    if c.startswith("chr"):
        base = c[3:]
        return "MT" if base == "M" else base
    return "chrM" if c == "MT" else f"chr{c}"


def make_locus(chrom: str, start: int, end: int) -> str:
    """``"<chrom>:<start+1>-<end>"`` exactly as make_examples writes the ``locus`` feature."""
    return f"{chrom}:{int(start) + 1}-{int(end)}"


# --------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------


def _feature(fmap: Any, key: str, kind: str, path: str, record: int, *, required: bool):
    """The ``value`` list of feature ``key`` when it is of list type ``kind``."""
    if key not in fmap:
        if required:
            raise ExampleFormatError(path, record, f"missing required feature '{key}'")
        return None
    feat = fmap[key]
    got = feat.WhichOneof("kind")
    if got != kind:
        raise ExampleFormatError(
            path, record, f"feature '{key}' is a {got or 'empty feature'}, expected {kind}"
        )
    return getattr(feat, kind).value


def _single(values, key: str, path: str, record: int):
    if len(values) != 1:
        raise ExampleFormatError(
            path, record, f"feature '{key}' has {len(values)} values, expected exactly 1"
        )
    return values[0]


def parse_example(
    payload: bytes,
    *,
    path: str | os.PathLike = "<bytes>",
    record: int = 0,
    expected_shape: Sequence[int] | None = None,
) -> DVExample:
    """Decode one serialized ``tf.Example`` written by make_examples.

    Required: ``image/encoded``, ``image/shape``, ``variant/encoded``,
    ``alt_allele_indices/encoded`` (what call_variants needs). ``locus`` and
    ``variant_type`` are derived from the variant when absent (old or third-party writers);
    ``label`` and ``sequencing_type`` are None when absent. Any inconsistency (image size vs
    shape, shape vs ``expected_shape``, alt index out of range) raises
    :class:`ExampleFormatError` naming the feature.
    """
    spath = str(path)
    try:
        ex = protos.Example.FromString(payload)
    except DecodeError as e:
        raise ExampleFormatError(spath, record, f"corrupt record: not a tf.Example ({e})") from e
    fmap = ex.features.feature
    image = _image(fmap, spath, record, expected_shape)
    variant, aai = _variant(fmap, spath, record)
    alts = tuple(variant.alternate_bases)
    chrom, start, end, ref = (
        variant.reference_name,
        int(variant.start),
        int(variant.end),
        variant.reference_bases,
    )
    locus_v = _feature(fmap, K_LOCUS, "bytes_list", spath, record, required=False)
    locus = (
        _single(locus_v, K_LOCUS, spath, record).decode("utf-8", "replace")
        if locus_v is not None
        else make_locus(chrom, start, end)
    )
    vt_v = _feature(fmap, K_VARIANT_TYPE, "int64_list", spath, record, required=False)
    variant_type = (
        int(_single(vt_v, K_VARIANT_TYPE, spath, record))
        if vt_v is not None
        else encoded_variant_type(ref, alts)
    )
    label, seq_type = _label_and_sequencing_type(fmap, spath, record)
    return DVExample(
        image=image,
        locus=locus,
        chrom=chrom,
        start=start,
        end=end,
        ref=ref,
        alts=alts,
        alt_allele_indices=aai,
        variant_type=variant_type,
        label=label,
        sequencing_type=seq_type,
        path=spath,
        record=record,
    )


def _image(fmap: Any, spath: str, record: int, expected_shape: Sequence[int] | None
           ) -> np.ndarray:
    """The pileup as a read-only uint8 ``[H, W, C]`` view on the record's bytes, its shape
    checked against ``image/shape`` and ``expected_shape``."""
    shape_v = _feature(fmap, K_SHAPE, "int64_list", spath, record, required=True)
    shape = tuple(int(s) for s in shape_v)
    if len(shape) != 3 or min(shape) <= 0:
        raise ExampleFormatError(
            spath,
            record,
            f"feature '{K_SHAPE}' must be 3 positive ints [H, W, C], got {list(shape)}",
        )
    if expected_shape is not None and tuple(int(s) for s in expected_shape) != shape:
        raise ExampleFormatError(
            spath,
            record,
            f"'{K_SHAPE}' is {list(shape)} but {list(expected_shape)} was expected "
            "(examples made for a different model or channel set?)",
        )
    img_bytes = _single(
        _feature(fmap, K_IMAGE, "bytes_list", spath, record, required=True), K_IMAGE, spath, record
    )
    n = shape[0] * shape[1] * shape[2]
    if len(img_bytes) != n:
        raise ExampleFormatError(
            spath,
            record,
            f"feature '{K_IMAGE}' has {len(img_bytes)} bytes but '{K_SHAPE}' {list(shape)} "
            f"needs {n} (raw uint8 HWC expected)",
        )
    return np.frombuffer(img_bytes, dtype=np.uint8).reshape(shape)


def _variant(fmap: Any, spath: str, record: int) -> tuple[Any, tuple[int, ...]]:
    """The candidate ``Variant`` and the alt-allele indices of this example (in range)."""
    var_bytes = _single(
        _feature(fmap, K_VARIANT, "bytes_list", spath, record, required=True),
        K_VARIANT,
        spath,
        record,
    )
    try:
        variant = protos.Variant.FromString(var_bytes)
    except DecodeError as e:
        raise ExampleFormatError(
            spath, record, f"feature '{K_VARIANT}' is not a nucleus Variant proto ({e})"
        ) from e
    aai_bytes = _single(
        _feature(fmap, K_AAI, "bytes_list", spath, record, required=True), K_AAI, spath, record
    )
    try:
        aai = tuple(int(i) for i in protos.AltAlleleIndices.FromString(aai_bytes).indices)
    except DecodeError as e:
        raise ExampleFormatError(
            spath, record, f"feature '{K_AAI}' is not an AltAlleleIndices proto ({e})"
        ) from e
    n_alts = len(variant.alternate_bases)
    bad = [i for i in aai if not 0 <= i < n_alts]
    if bad:
        raise ExampleFormatError(
            spath,
            record,
            f"feature '{K_AAI}' has indices {bad} outside the variant's {n_alts} alt alleles",
        )
    return variant, aai


def _label_and_sequencing_type(fmap: Any, spath: str, record: int
                               ) -> tuple[int | None, int | None]:
    """The truth genotype class (0, 1, 2) and the sequencing type, each None when absent."""
    label_v = _feature(fmap, K_LABEL, "int64_list", spath, record, required=False)
    label = int(_single(label_v, K_LABEL, spath, record)) if label_v is not None else None
    if label is not None and label not in (0, 1, 2):
        raise ExampleFormatError(spath, record, f"feature '{K_LABEL}' is {label}, not a "
                                 "genotype class (0 hom-ref, 1 het, 2 hom-alt)")
    seq_v = _feature(fmap, K_SEQ_TYPE, "int64_list", spath, record, required=False)
    seq_type = int(_single(seq_v, K_SEQ_TYPE, spath, record)) if seq_v is not None else None
    return label, seq_type


def read_examples(
    spec: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    skip_corrupt: bool = False,
    limit: int | None = None,
    start: int = 0,
    stats: ReadStats | None = None,
    expected_shape: Sequence[int] | None = None,
) -> Iterator[DVExample]:
    """Iterate examples of a spec: shards in :func:`expand_spec` order, records in file order.

    ``start`` skips that many valid records *across the whole spec* (resume after an
    interruption; corrupt-skipped records do not count), ``limit`` caps how many are
    yielded. Shape consistency is enforced: every example must have ``expected_shape`` or,
    when that is None, the shape of the first example read — a mix means mixed inputs.
    A spec whose files contain no record at all raises (an empty run is a mistake, not a
    result).
    """
    if start < 0 or (limit is not None and limit < 0):
        raise ValueError("start and limit must be >= 0")
    files = expand_spec(spec)
    stats = stats if stats is not None else ReadStats()
    shape = tuple(expected_shape) if expected_shape is not None else None
    to_skip = start
    yielded = 0
    seen_any = False
    if limit == 0:
        return
    for f in files:
        for idx, payload in iter_records(f, skip_corrupt=skip_corrupt, stats=stats):
            seen_any = True
            if to_skip:
                to_skip -= 1
                continue
            ex = parse_example(payload, path=f, record=idx, expected_shape=shape)
            if shape is None:
                shape = ex.shape
            yield ex
            yielded += 1
            if limit is not None and yielded >= limit:
                return
    if not seen_any:
        where = files[0] if len(files) == 1 else f"{files[0]} (+{len(files) - 1} more files)"
        raise ExampleFormatError(where, None, "no records: every examples file is empty")


@dataclass
class ExampleBatch:
    """A batch ready for the model: ``images`` is a fresh, writable, C-contiguous uint8
    ``[B, H, W, C]`` array and each example's ``image`` is a view into it."""

    images: np.ndarray
    examples: list[DVExample]


def iter_example_batches(
    spec: str | os.PathLike | Sequence[str | os.PathLike],
    batch_size: int,
    *,
    skip_corrupt: bool = False,
    limit: int | None = None,
    start: int = 0,
    stats: ReadStats | None = None,
    expected_shape: Sequence[int] | None = None,
) -> Iterator[ExampleBatch]:
    """:func:`read_examples` grouped into batches (last one may be short).

    Each image is copied exactly once, into the batch array; the per-record payloads can
    then be freed, so memory stays at one batch regardless of record size.
    """
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    buf: np.ndarray | None = None
    exs: list[DVExample] = []
    for ex in read_examples(
        spec,
        skip_corrupt=skip_corrupt,
        limit=limit,
        start=start,
        stats=stats,
        expected_shape=expected_shape,
    ):
        if buf is None:
            buf = np.empty((batch_size, *ex.shape), dtype=np.uint8)
        buf[len(exs)] = ex.image
        ex.image = buf[len(exs)]
        exs.append(ex)
        if len(exs) == batch_size:
            yield ExampleBatch(buf, exs)
            buf, exs = None, []
    if exs and buf is not None:
        yield ExampleBatch(buf[: len(exs)], exs)  # examples already view into buf


# --------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------


def encode_example(
    image: np.ndarray,
    *,
    chrom: str,
    start: int,
    end: int,
    ref: str,
    alts: Sequence[str],
    alt_allele_indices: Sequence[int],
    label: int | None = None,
    variant_type: int | None = None,
    sequencing_type: int | None = 1,
) -> bytes:
    """Serialize a pileup as make_examples does (same feature keys, types and encodings).

    ``variant_type`` defaults to :func:`encoded_variant_type` over all alts; ``label``
    (0/1/2) is written only when given (training examples); ``sequencing_type`` 1 = WGS
    (None leaves the feature out).
    """
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim != 3:
        raise ValueError(f"image must be uint8 [H, W, C], got {img.dtype} {list(img.shape)}")
    alts = tuple(alts)
    aai = tuple(int(i) for i in alt_allele_indices)
    if any(not 0 <= i < len(alts) for i in aai):
        raise ValueError(f"alt_allele_indices {list(aai)} out of range for {len(alts)} alts")
    if label is not None and label not in (0, 1, 2):
        raise ValueError(f"label must be 0, 1 or 2, got {label}")
    variant = protos.Variant(
        reference_name=chrom,
        start=int(start),
        end=int(end),
        reference_bases=ref,
        alternate_bases=list(alts),
    )
    ex = protos.Example()
    f = ex.features.feature
    f[K_IMAGE].bytes_list.value.append(np.ascontiguousarray(img).tobytes())
    f[K_SHAPE].int64_list.value.extend(int(s) for s in img.shape)
    f[K_VARIANT].bytes_list.value.append(variant.SerializeToString())
    f[K_AAI].bytes_list.value.append(protos.AltAlleleIndices(indices=aai).SerializeToString())
    f[K_LOCUS].bytes_list.value.append(make_locus(chrom, start, end).encode("ascii"))
    f[K_VARIANT_TYPE].int64_list.value.append(
        encoded_variant_type(ref, alts) if variant_type is None else int(variant_type)
    )
    if sequencing_type is not None:
        f[K_SEQ_TYPE].int64_list.value.append(int(sequencing_type))
    if label is not None:
        f[K_LABEL].int64_list.value.append(int(label))
    # deterministic: the feature map's order would otherwise differ between processes, and
    # the same input should give the same bytes (reproducible shards, stable checksums).
    return ex.SerializeToString(deterministic=True)


# --------------------------------------------------------------------------------------
# example_info.json
# --------------------------------------------------------------------------------------

EXAMPLE_INFO_SUFFIX = ".example_info.json"


def example_info_path(shard: str | os.PathLike) -> Path:
    """``<shard>.example_info.json``: where make_examples puts the json for that shard."""
    return Path(os.fspath(shard) + EXAMPLE_INFO_SUFFIX)


def _validate_info(data: Any, path: Path) -> dict:
    if not isinstance(data, dict):
        raise ExampleFormatError(path, None, "example_info.json must hold a JSON object")
    shape, channels = data.get("shape"), data.get("channels")
    if not (
        isinstance(shape, list)
        and len(shape) == 3
        and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
    ):
        raise ExampleFormatError(path, None, f"'shape' must be 3 positive ints, got {shape!r}")
    if not (
        isinstance(channels, list)
        and all(isinstance(c, int) and not isinstance(c, bool) for c in channels)
    ):
        raise ExampleFormatError(path, None, f"'channels' must be a list of ints, got {channels!r}")
    if len(channels) != shape[2]:
        raise ExampleFormatError(
            path,
            None,
            f"inconsistent: {len(channels)} channels listed but shape {shape} has {shape[2]}",
        )
    out = dict(data)
    out["path"] = str(path)
    return out


def _load_info(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ExampleFormatError(path, None, f"corrupt example_info.json: {e}") from e
    except OSError as e:
        raise ExampleFormatError(path, None, f"cannot read: {e.strerror or e}") from e
    return _validate_info(data, path)


def read_example_info(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> dict | None:
    """The example_info.json describing a spec's examples, or None when there is none.

    Looks for ``<shard>.example_info.json`` beside each shard (make_examples writes one per
    task), then for a plain ``example_info.json`` in the first shard's directory. When
    several per-shard files exist they must agree on shape and channels. The returned dict
    is the JSON object plus ``path`` (which file it came from) for error messages.
    """
    files = expand_spec(spec)
    found = [(f, p) for f in files if (p := example_info_path(f)).is_file()]
    if found:
        first = _load_info(found[0][1])
        for _, p in found[1:]:
            other = _load_info(p)
            if (other["shape"], other["channels"]) != (first["shape"], first["channels"]):
                raise ExampleFormatError(
                    p,
                    None,
                    f"disagrees with {found[0][1]}: shape {other['shape']} vs {first['shape']}, "
                    f"channels {other['channels']} vs {first['channels']} (mixed examples?)",
                )
        return first
    plain = files[0].parent / "example_info.json"
    if plain.is_file():
        return _load_info(plain)
    return None


def write_example_info(
    path: str | os.PathLike,
    shape: Sequence[int],
    channels: Sequence[int],
    version: str,
) -> Path:
    """Write example_info.json atomically; ``path`` is the json itself or a shard file
    (then ``<shard>.example_info.json``). Returns the json path."""
    p = Path(path)
    if not p.name.endswith(".json"):
        p = example_info_path(p)
    data = {
        "version": str(version),
        "shape": [int(s) for s in shape],
        "channels": [int(c) for c in channels],
    }
    _validate_info(data, p)
    atomic_write_bytes(p, (json.dumps(data) + "\n").encode())
    return p


def _fmt_channels(chs: Sequence[int]) -> str:
    return "[" + ", ".join(f"{int(c)} {channel_name(c)}" for c in chs) + "]"


def check_example_info(
    info: dict,
    *,
    shape: Sequence[int],
    channels: Sequence[int] | None,
    what: str = "model",
) -> None:
    """Raise :class:`ExampleFormatError` unless the examples' shape and channel list equal
    the ``what``'s (normally the model's), saying exactly what differs. ``channels=None``
    means the other side does not know its channel list: only the shape is compared.

    Strict on purpose: DeepVariant's call_variants only warns here, but a model fed
    channels in the wrong order gives confident nonsense, which for probing is worse than
    an error.
    """
    src = info.get("path", "example_info.json")
    ex_shape = [int(s) for s in info["shape"]]
    ex_ch = [int(c) for c in info["channels"]]
    want_shape = [int(s) for s in shape]
    want_ch = None if channels is None else [int(c) for c in channels]
    problems: list[str] = []
    if ex_shape != want_shape:
        dims = [
            f"{name} {a} vs {b}"
            for name, a, b in zip(
                ("height", "width", "channels"), ex_shape, want_shape, strict=False
            )
            if a != b
        ]
        problems.append(
            f"examples have shape {ex_shape} but the {what} expects {want_shape} ({'; '.join(dims)})"
        )
    if want_ch is not None and ex_ch != want_ch:
        msg = (
            f"channel list differs: examples {_fmt_channels(ex_ch)} vs "
            f"{what} {_fmt_channels(want_ch)}"
        )
        missing = [c for c in want_ch if c not in ex_ch]
        extra = [c for c in ex_ch if c not in want_ch]
        if missing:
            msg += f"; missing in examples: {_fmt_channels(missing)}"
        if extra:
            msg += f"; not used by the {what}: {_fmt_channels(extra)}"
        if not missing and not extra:
            msg += " (same channels, different order)"
        problems.append(msg)
    if problems:
        raise ExampleFormatError(src, None, "; ".join(problems))


__all__ = [
    "DVExample",
    "ExampleBatch",
    "VARIANT_TYPE_INDEL",
    "VARIANT_TYPE_SNP",
    "VARIANT_TYPE_UNKNOWN",
    "check_example_info",
    "encode_example",
    "encoded_variant_type",
    "example_info_path",
    "example_key",
    "iter_example_batches",
    "make_locus",
    "parse_example",
    "read_example_info",
    "read_examples",
    "write_example_info",
]
