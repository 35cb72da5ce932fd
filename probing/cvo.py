"""DeepVariant's ``call_variants`` output as a table, without TensorFlow (torch-free).

Why: ``call_variants`` writes its genotype probabilities as gzip TFRecords of
``CallVariantsOutput`` protos (docs/deepvariant-formats.md, "Output classes and genotype
mapping"), which no DeepVariant tool prints (google/deepvariant issue 887). Reading them as a
table lets a user see DeepVariant's own probabilities per example and join them to a STORE:
the ``key`` column is built by :func:`probing.examples.example_key`, exactly as extraction
builds obs keys, so the same candidate and alt subset gets the same key in both.

One row per record, in file order (shards in :func:`probing.tfrecord.expand_spec` order;
call_variants interleaves its inputs, so this is not the examples' order). ``pos`` is the
variant's **1-based** first base, as in a VCF; the key keeps the Variant's 0-based start,
as STORE keys do.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Sequence
from typing import Any

import pandas as pd
from google.protobuf.message import DecodeError

from dvtorch.errors import ExampleFormatError
from dvtorch.files import atomic_write_bytes
from probing import protos
from probing.examples import example_key
from probing.schema import PROB_COLUMNS
from probing.tfrecord import expand_spec, iter_records

#: The table's columns, in order.
CVO_COLUMNS: tuple[str, ...] = (
    "key", "chrom", "pos", "ref", "alts", "alt_allele_indices", *PROB_COLUMNS,
)


def parse_cvo(payload: bytes, *, path: str, record: int) -> dict[str, Any]:
    """One ``CallVariantsOutput`` record as a table row; a damaged one raises
    :class:`ExampleFormatError` naming ``path``, ``record`` and what is wrong."""
    try:
        cvo = protos.CallVariantsOutput.FromString(payload)
    except DecodeError as e:
        raise ExampleFormatError(path, record, f"not a CallVariantsOutput proto ({e})") from e
    if not cvo.HasField("variant"):
        raise ExampleFormatError(path, record, "CallVariantsOutput has no variant")
    variant = cvo.variant
    alts = tuple(variant.alternate_bases)
    indices = tuple(int(i) for i in cvo.alt_allele_indices.indices)
    bad = [i for i in indices if not 0 <= i < len(alts)]
    if bad:
        raise ExampleFormatError(path, record, f"alt_allele_indices {bad} outside the "
                                 f"variant's {len(alts)} alt alleles")
    probs = list(cvo.genotype_probabilities)
    if len(probs) != len(PROB_COLUMNS):
        raise ExampleFormatError(path, record, f"{len(probs)} genotype probabilities, "
                                 f"expected {len(PROB_COLUMNS)} (hom-ref, het, hom-alt)")
    return {
        "key": example_key(variant.reference_name, variant.start, variant.reference_bases,
                           alts, indices),
        "chrom": variant.reference_name,
        "pos": int(variant.start) + 1,
        "ref": variant.reference_bases,
        "alts": ",".join(alts),
        "alt_allele_indices": ",".join(str(i) for i in indices),
        **dict(zip(PROB_COLUMNS, probs, strict=True)),
    }


def iter_cvo(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> Iterator[dict[str, Any]]:
    """Rows of every record of ``spec`` (a file, ``name@N.tfrecord.gz``, a glob or a list).

    Both CRCs of every record are checked; a damaged record stops the read with an error
    naming its file and index (a table with silent holes would bias any comparison).
    """
    for f in expand_spec(spec):
        for idx, payload in iter_records(f):
            yield parse_cvo(payload, path=str(f), record=idx)


def read_cvo(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> pd.DataFrame:
    """The table of :data:`CVO_COLUMNS`, one row per ``CallVariantsOutput`` record."""
    frame = pd.DataFrame(list(iter_cvo(spec)), columns=list(CVO_COLUMNS))
    return frame.astype({"pos": "int64", **{c: "float64" for c in PROB_COLUMNS}})


def write_table(frame: pd.DataFrame, out: str | os.PathLike) -> None:
    """Write ``frame`` as parquet (``.parquet``) or tab-separated text (``.tsv``), atomically."""
    name = os.fspath(out)
    buf = io.BytesIO()
    if name.endswith(".parquet"):
        frame.to_parquet(buf, index=False)
    elif name.endswith(".tsv"):
        buf.write(frame.to_csv(sep="\t", index=False).encode())
    else:
        raise ValueError(f"{name}: the table must end in .tsv or .parquet")
    atomic_write_bytes(name, buf.getvalue())


__all__ = ["CVO_COLUMNS", "iter_cvo", "parse_cvo", "read_cvo", "write_table"]
