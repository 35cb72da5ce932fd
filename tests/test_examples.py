"""DeepVariant tf.Example decoding/encoding, interop with TensorFlow, example_info.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dvtorch.errors import ExampleFormatError
from probing import protos
from probing.examples import (
    check_example_info,
    encode_example,
    encoded_variant_type,
    example_info_path,
    example_key,
    iter_example_batches,
    parse_example,
    read_example_info,
    read_examples,
    write_example_info,
)
from probing.tfrecord import ReadStats, shard_name, write_records

SHAPE = (10, 21, 7)
CHANNELS = [1, 2, 3, 4, 5, 6, 19]


def _image(seed: int, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, size=shape, dtype=np.uint8)


# Sites: (chrom, start, ref, alts, alt_allele_indices, label)
SITES = [
    ("chr20", 100, "A", ("C",), (0,), 1),
    ("chr20", 250, "AT", ("A",), (0,), 2),
    ("chr20", 400, "G", ("T", "GAA"), (0,), 0),
    ("chr20", 400, "G", ("T", "GAA"), (1,), 1),
    ("chr20", 400, "G", ("T", "GAA"), (0, 1), 2),
    ("chrX", 7, "C", ("G",), (0,), 1),
]


def _tf_example_bytes(tf, image, chrom, start, ref, alts, aai, label):
    """A tf.train.Example built with TensorFlow's own classes, as make_examples does."""
    variant = protos.Variant(
        reference_name=chrom,
        start=start,
        end=start + len(ref),
        reference_bases=ref,
        alternate_bases=list(alts),
    )
    feats = {
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image.tobytes()])),
        "image/shape": tf.train.Feature(int64_list=tf.train.Int64List(value=list(image.shape))),
        "variant/encoded": tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[variant.SerializeToString()])
        ),
        "alt_allele_indices/encoded": tf.train.Feature(
            bytes_list=tf.train.BytesList(
                value=[protos.AltAlleleIndices(indices=list(aai)).SerializeToString()]
            )
        ),
        "locus": tf.train.Feature(
            bytes_list=tf.train.BytesList(
                value=[f"{chrom}:{start + 1}-{start + len(ref)}".encode()]
            )
        ),
        "variant_type": tf.train.Feature(
            int64_list=tf.train.Int64List(value=[encoded_variant_type(ref, alts)])
        ),
        "sequencing_type": tf.train.Feature(int64_list=tf.train.Int64List(value=[1])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


# ---- TensorFlow interop --------------------------------------------------------------------


@pytest.mark.tf
def test_reads_gzip_shards_written_by_tensorflow(tmp_path: Path):
    tf = pytest.importorskip("tensorflow")
    images = [_image(i) for i in range(len(SITES))]
    per_shard = [SITES[:4], SITES[4:]]
    k = 0
    for s, sites in enumerate(per_shard):
        name = tmp_path / shard_name("make_examples.tfrecord", s, 2, ".gz")
        with tf.io.TFRecordWriter(str(name), options="GZIP") as w:
            for chrom, start, ref, alts, aai, label in sites:
                w.write(_tf_example_bytes(tf, images[k], chrom, start, ref, alts, aai, label))
                k += 1
    got = list(read_examples(f"{tmp_path}/make_examples.tfrecord@2.gz"))
    assert len(got) == len(SITES)
    for ex, site, img in zip(got, SITES, images, strict=True):
        chrom, start, ref, alts, aai, label = site
        assert (ex.chrom, ex.start, ex.end, ex.ref, ex.alts) == (
            chrom,
            start,
            start + len(ref),
            ref,
            alts,
        )
        assert ex.alt_allele_indices == aai and ex.label == label
        assert ex.locus == f"{chrom}:{start + 1}-{start + len(ref)}"
        assert ex.sequencing_type == 1
        assert ex.image.shape == SHAPE and ex.image.tobytes() == img.tobytes()
    assert [ex.record for ex in got] == [0, 1, 2, 3, 0, 1]
    assert got[3].path.endswith("-00000-of-00002.gz")
    assert got[4].path.endswith("-00001-of-00002.gz")
    # Keys are unique even across the three examples of the multi-allelic site.
    assert len({ex.key for ex in got}) == len(got)


@pytest.mark.tf
def test_tensorflow_reads_our_writer(tmp_path: Path):
    tf = pytest.importorskip("tensorflow")
    f = tmp_path / "ours.tfrecord.gz"
    images = [_image(10 + i) for i in range(len(SITES))]
    write_records(
        f,
        [
            encode_example(
                img,
                chrom=c,
                start=s,
                end=s + len(r),
                ref=r,
                alts=a,
                alt_allele_indices=aai,
                label=lab,
            )
            for img, (c, s, r, a, aai, lab) in zip(images, SITES, strict=True)
        ],
    )
    records = [r.numpy() for r in tf.data.TFRecordDataset(str(f), compression_type="GZIP")]
    assert len(records) == len(SITES)
    for rec, img, (c, s, r, a, aai, lab) in zip(records, images, SITES, strict=True):
        ex = tf.train.Example.FromString(rec)
        feat = ex.features.feature
        assert feat["image/encoded"].bytes_list.value[0] == img.tobytes()
        assert list(feat["image/shape"].int64_list.value) == list(SHAPE)
        assert feat["locus"].bytes_list.value[0] == f"{c}:{s + 1}-{s + len(r)}".encode()
        assert feat["label"].int64_list.value[0] == lab
        assert feat["variant_type"].int64_list.value[0] == encoded_variant_type(r, a)
        v = protos.Variant.FromString(feat["variant/encoded"].bytes_list.value[0])
        assert (v.reference_name, v.start, v.reference_bases, tuple(v.alternate_bases)) == (
            c,
            s,
            r,
            a,
        )
        idx = protos.AltAlleleIndices.FromString(
            feat["alt_allele_indices/encoded"].bytes_list.value[0]
        )
        assert tuple(idx.indices) == aai
        # TF's own parser (the one call_variants uses) agrees on image bytes and shape.
        parsed = tf.io.parse_single_example(
            rec,
            {
                "image/encoded": tf.io.FixedLenFeature([], tf.string),
                "image/shape": tf.io.FixedLenFeature([3], tf.int64),
            },
        )
        decoded = tf.reshape(
            tf.io.decode_raw(parsed["image/encoded"], tf.uint8), parsed["image/shape"]
        )
        np.testing.assert_array_equal(decoded.numpy(), img)


@pytest.mark.tf
def test_private_protos_coexist_with_tensorflow():
    tf = pytest.importorskip("tensorflow")
    from tensorflow.core.example import example_pb2

    ours = protos.Example()
    ours.features.feature["x"].int64_list.value.append(7)
    theirs = example_pb2.Example.FromString(ours.SerializeToString())
    assert theirs.features.feature["x"].int64_list.value[0] == 7
    back = protos.Example.FromString(tf.train.Example(features=theirs.features).SerializeToString())
    assert back == ours


# ---- parse / encode --------------------------------------------------------------------


def _encoded(image: np.ndarray | None = None, **kw) -> bytes:
    """A calling example at chr1:999 A>G unless overridden."""
    args = dict(chrom="chr1", start=999, end=1000, ref="A", alts=("G",), alt_allele_indices=(0,))
    args.update(kw)
    return encode_example(_image(0) if image is None else image, **args)


def test_encode_parse_roundtrip_and_defaults():
    img = _image(1)
    ex = parse_example(_encoded(image=img), path="p.gz", record=4)
    assert ex.locus == "chr1:1000-1000"
    assert ex.variant_type == 1 and ex.sequencing_type == 1 and ex.label is None
    assert ex.key == "chr1:999:A>G:0" and ex.alt == "G"
    assert (ex.path, ex.record) == ("p.gz", 4)
    np.testing.assert_array_equal(ex.image, img)
    assert not ex.image.flags.writeable  # zero-copy view on the record bytes


def test_variant_type_rules():
    assert encoded_variant_type("A", ["C", "T"]) == 1
    assert encoded_variant_type("AT", ["A"]) == 2
    assert encoded_variant_type("A", ["C", "AT"]) == 2
    assert encoded_variant_type("A", []) == 0


def test_example_key_format():
    assert example_key("chr2", 5, "G", ["T", "GAA"], [0, 1]) == "chr2:5:G>T,GAA:0,1"


def _drop_feature(payload: bytes, key: str) -> bytes:
    ex = protos.Example.FromString(payload)
    del ex.features.feature[key]
    return ex.SerializeToString()


@pytest.mark.parametrize(
    "key", ["image/encoded", "image/shape", "variant/encoded", "alt_allele_indices/encoded"]
)
def test_missing_required_feature_is_named(key):
    with pytest.raises(ExampleFormatError, match=f"missing required feature '{key}'") as ei:
        parse_example(_drop_feature(_encoded(), key), path="f.gz", record=3)
    assert ei.value.record == 3 and ei.value.path == "f.gz"


def test_optional_features_are_derived_when_absent():
    p = _drop_feature(
        _drop_feature(_encoded(ref="AC", alts=("A",), end=1001), "locus"), "variant_type"
    )
    ex = parse_example(p)
    assert ex.locus == "chr1:1000-1001" and ex.variant_type == 2


def test_wrong_image_size_and_shape():
    ex = protos.Example.FromString(_encoded())
    ex.features.feature["image/encoded"].bytes_list.value[0] = b"\x00" * 100
    with pytest.raises(ExampleFormatError, match=r"'image/encoded' has 100 bytes.*needs 1470"):
        parse_example(ex.SerializeToString())
    with pytest.raises(ExampleFormatError, match=r"\[10, 21, 7\] but \[100, 221, 7\] was expected"):
        parse_example(_encoded(), expected_shape=(100, 221, 7))


@pytest.mark.parametrize("label", [3, 7, -1, 2**62])
def test_a_label_that_is_not_a_genotype_class_is_refused(label):
    """DeepVariant's labels are 0/1/2; anything else is a damaged or foreign record, not an
    example without a label."""
    ex = protos.Example.FromString(_encoded(label=1))
    ex.features.feature["label"].int64_list.value[0] = label
    with pytest.raises(ExampleFormatError, match=f"'label' is {label}, not a genotype class"):
        parse_example(ex.SerializeToString(), path="x.gz", record=11)


def test_a_utf8_locus_is_kept_as_written():
    ex = protos.Example.FromString(_encoded())
    ex.features.feature["locus"].bytes_list.value[0] = "chrÉ:1-2".encode()
    assert parse_example(ex.SerializeToString()).locus == "chrÉ:1-2"


def test_wrong_feature_type_and_garbage():
    ex = protos.Example.FromString(_encoded())
    ex.features.feature["image/shape"].bytes_list.value.append(b"10,21,7")
    with pytest.raises(
        ExampleFormatError, match="'image/shape' is a bytes_list, expected int64_list"
    ):
        parse_example(ex.SerializeToString())
    with pytest.raises(ExampleFormatError, match="not a tf.Example"):
        parse_example(b"\xff\xff\xff garbage")


def test_alt_index_out_of_range():
    ex = protos.Example.FromString(_encoded())
    ex.features.feature["alt_allele_indices/encoded"].bytes_list.value[0] = protos.AltAlleleIndices(
        indices=[0, 3]
    ).SerializeToString()
    with pytest.raises(ExampleFormatError, match=r"indices \[3\] outside"):
        parse_example(ex.SerializeToString())


def test_encode_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        encode_example(
            np.zeros((2, 3), np.uint8),
            chrom="c",
            start=0,
            end=1,
            ref="A",
            alts=["C"],
            alt_allele_indices=[0],
        )
    with pytest.raises(ValueError, match="out of range"):
        _encoded(alt_allele_indices=(1,))
    with pytest.raises(ValueError, match="label"):
        _encoded(label=3)


# ---- read_examples / batches -------------------------------------------------------------


def _write_spec(d: Path, n_shards=2, per_shard=5) -> str:
    k = 0
    for s in range(n_shards):
        payloads = []
        for _ in range(per_shard):
            payloads.append(_encoded(image=_image(100 + k), start=k, end=k + 1, label=k % 3))
            k += 1
        write_records(d / shard_name("ex.tfrecord", s, n_shards, ".gz"), payloads)
    return f"{d}/ex.tfrecord@{n_shards}.gz"


def test_read_examples_order_start_limit(tmp_path: Path):
    spec = _write_spec(tmp_path)
    assert [e.start for e in read_examples(spec)] == list(range(10))
    assert [e.start for e in read_examples(spec, start=3, limit=4)] == [3, 4, 5, 6]
    assert [e.start for e in read_examples(spec, start=9)] == [9]
    assert list(read_examples(spec, limit=0)) == []


def test_read_examples_skip_corrupt(tmp_path: Path):
    spec = _write_spec(tmp_path, n_shards=1, per_shard=3)
    f = tmp_path / shard_name("ex.tfrecord", 0, 1, ".gz")
    # Rewrite plain (gzip would hide the flip behind its own CRC) and corrupt record 1.
    payloads = [_encoded(image=_image(i), start=i, end=i + 1) for i in range(3)]
    write_records(f, payloads, compress=False)
    raw = bytearray(f.read_bytes())
    raw[16 + len(payloads[0]) + 12 + 50] ^= 0x10
    f.write_bytes(bytes(raw))
    with pytest.raises(ExampleFormatError, match="CRC"):
        list(read_examples(spec))
    stats = ReadStats()
    got = list(read_examples(spec, skip_corrupt=True, stats=stats))
    assert [(e.record, e.start) for e in got] == [(0, 0), (2, 2)]
    assert stats.corrupt_skipped == 1 and stats.skipped[0][1] == 1


def test_mixed_shapes_rejected(tmp_path: Path):
    a, b = tmp_path / "a.gz", tmp_path / "b.gz"
    write_records(a, [_encoded()])
    write_records(b, [_encoded(image=_image(0, (10, 21, 6)))])
    with pytest.raises(ExampleFormatError, match=r"\[10, 21, 6\] but \[10, 21, 7\]"):
        list(read_examples(f"{a},{b}"))


def test_all_empty_spec_is_an_error(tmp_path: Path):
    f = tmp_path / "e.tfrecord.gz"
    write_records(f, [])
    with pytest.raises(ExampleFormatError, match="no records"):
        list(read_examples(f))


def test_batches(tmp_path: Path):
    spec = _write_spec(tmp_path)
    batches = list(iter_example_batches(spec, 4))
    assert [len(b.examples) for b in batches] == [4, 4, 2]
    assert [b.images.shape for b in batches][-1] == (2, *SHAPE)
    last = batches[-1]
    assert last.images.flags.c_contiguous and last.images.flags.writeable
    for i, ex in enumerate(last.examples):
        np.testing.assert_array_equal(last.images[i], _image(100 + ex.start))
        assert np.shares_memory(ex.image, last.images)


# ---- example_info.json ---------------------------------------------------------------------


def test_example_info_roundtrip_and_lookup(tmp_path: Path):
    spec = _write_spec(tmp_path)
    assert read_example_info(spec) is None
    shard0 = tmp_path / shard_name("ex.tfrecord", 0, 2, ".gz")
    p = write_example_info(shard0, SHAPE, CHANNELS, "1.6.0")
    assert p == example_info_path(shard0) and p.name.endswith(".gz.example_info.json")
    assert json.loads(p.read_text()) == {
        "version": "1.6.0",
        "shape": list(SHAPE),
        "channels": CHANNELS,
    }
    info = read_example_info(spec)
    assert info["shape"] == list(SHAPE) and info["path"] == str(p)
    # A disagreeing json for shard 1 is an error.
    write_example_info(
        tmp_path / shard_name("ex.tfrecord", 1, 2, ".gz"), (10, 21, 6), CHANNELS[:6], "1.6.0"
    )
    with pytest.raises(ExampleFormatError, match="disagrees"):
        read_example_info(spec)


def test_plain_example_info_json_in_dir(tmp_path: Path):
    spec = _write_spec(tmp_path)
    write_example_info(tmp_path / "example_info.json", SHAPE, CHANNELS, "1.8.0")
    assert read_example_info(spec)["version"] == "1.8.0"


def test_bad_example_info(tmp_path: Path):
    spec = _write_spec(tmp_path)
    p = tmp_path / "example_info.json"
    p.write_text('{"shape": [10, 21], "channels": [1]}')
    with pytest.raises(ExampleFormatError, match="'shape' must be 3"):
        read_example_info(spec)
    p.write_text('{"shape": [10, 21, 7], "channels": [1, 2]}')
    with pytest.raises(ExampleFormatError, match="inconsistent"):
        read_example_info(spec)
    p.write_text("{not json")
    with pytest.raises(ExampleFormatError, match="corrupt"):
        read_example_info(spec)
    p.write_bytes(b'{"version": "\xff\xfe", "shape": [10, 21, 7]}')
    with pytest.raises(ExampleFormatError, match="corrupt example_info.json: 'utf-8' codec"):
        read_example_info(spec)


def test_check_example_info_messages():
    info = {"shape": [100, 221, 7], "channels": CHANNELS, "path": "x.json"}
    check_example_info(info, shape=(100, 221, 7), channels=CHANNELS)  # no error
    with pytest.raises(ExampleFormatError) as ei:
        check_example_info(info, shape=(100, 199, 9), channels=[1, 2, 3, 4, 5, 6, 7, 9, 10])
    msg = str(ei.value)
    assert msg.startswith("x.json: ")
    assert "shape [100, 221, 7] but the model expects [100, 199, 9]" in msg
    assert "width 221 vs 199" in msg and "channels 7 vs 9" in msg
    assert "missing in examples: [7 haplotype, 9 diff_channels_alternate_allele_1" in msg
    assert "not used by the model: [19 insert_size]" in msg
    check_example_info(info, shape=(100, 221, 7), channels=None)  # channels unknown: shape only
    with pytest.raises(ExampleFormatError, match="width 221 vs 199"):
        check_example_info(info, shape=(100, 199, 7), channels=None)
    swapped = [2, 1, 3, 4, 5, 6, 19]
    with pytest.raises(ExampleFormatError, match="same channels, different order"):
        check_example_info(info, shape=(100, 221, 7), channels=swapped, what="bundle")


def test_encoding_the_same_example_gives_the_same_bytes_in_every_process():
    """Shards written twice from the same input are byte-identical (checksums, caching):
    the tf.Example feature map is serialised in a fixed order, whatever the process."""
    import os
    import subprocess
    import sys

    script = (
        "import hashlib, numpy as np\n"
        "from probing.examples import encode_example\n"
        "img = np.arange(100 * 221 * 7, dtype=np.uint32).astype(np.uint8).reshape(100, 221, 7)\n"
        "b = encode_example(img, chrom='chr20', start=999, end=1000, ref='A', alts=['G'],\n"
        "                   alt_allele_indices=[0], label=1)\n"
        "print(hashlib.sha256(b).hexdigest())\n")
    digests = {subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                              text=True, env={**os.environ, "PYTHONHASHSEED": str(seed)}
                              ).stdout for seed in (1, 2, 3)}
    assert len(digests) == 1
