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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
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


# --------------------------------------------------------------------- the small model
#
# DeepVariant 1.7+ can genotype confident candidates inside make_examples with a small MLP
# (``--call_small_model_examples``, run_deepvariant's default for some model types since
# 1.8): those sites get a CallVariantsOutput record in
# ``<examples name>_call_variant_outputs.tfrecord@N.gz`` (run_deepvariant:
# ``make_examples_call_variant_outputs.tfrecord@N.gz`` in the intermediate directory, beside
# ``make_examples.tfrecord@N.gz``) and NO pileup example. What the files a user has can
# tell (docs/guide.md, "The small model"):
#
# * the examples' own ``example_info.json`` cannot: make_examples writes only ``version``,
#   ``shape`` and ``channels`` there, and the run's flags are not stored with the examples;
# * those ``*call_variant_outputs*`` files beside the examples can: holding records, they
#   are sites the small model called, missing from the examples;
# * a model's ``example_info.json`` may list the flags run_deepvariant passes for it under
#   ``flags_for_calling`` (seen in third-party code reading the 1.9/1.10 Docker images'
#   model.example_info.json, not in Google's docs): a ``trained_small_model_path`` there
#   means a default run with that model uses the small model.

#: The names make_examples gives its small-model call files (sharded or not).
SMALL_MODEL_GLOB = "*call_variant_outputs*.tfrecord*"


@dataclass(frozen=True)
class SmallModelCalls:
    """make_examples' small-model call files found beside a set of examples."""

    files: tuple[Path, ...]
    first_record_in: Path | None  # the first file holding a record; None: all are empty

    @property
    def called_sites(self) -> bool:
        """Whether the small model genotyped any site (so the examples lack those sites)."""
        return self.first_record_in is not None

    def summary(self) -> str:
        where = self.files[0].parent
        if self.called_sites:
            return (f"small model: ON: {len(self.files)} make_examples call_variant_outputs "
                    f"file(s) in {where} hold sites it genotyped without writing an example; "
                    "the examples miss those (mostly easy) sites. Rerun make_examples with "
                    "--disable_small_model to get every candidate")
        return (f"small model: on, but its {len(self.files)} call_variant_outputs file(s) in "
                f"{where} are empty: no site is missing from the examples")


def small_model_calls(examples: str | os.PathLike | Sequence[str | os.PathLike]
                      ) -> SmallModelCalls | None:
    """The small-model call files beside ``examples`` (a spec, glob, list or file), or None
    when there are none (the small model was off, or its files were not kept there).

    Reads at most one record per file: enough to tell "called sites" from "empty", cheap on
    whole-genome runs (counting every record would read gigabytes).
    """
    dirs = dict.fromkeys(Path(f).resolve().parent for f in expand_spec(examples))
    files = tuple(sorted(f for d in dirs for f in d.glob(SMALL_MODEL_GLOB)
                         if f.is_file() and not f.name.endswith(".json")))
    if not files:
        return None
    first = next((f for f in files if next(iter_records(f), None) is not None), None)
    return SmallModelCalls(files, first)


#: ``flags_for_calling`` keys that say a model is run with the small model.
SMALL_MODEL_FLAGS = ("trained_small_model_path", "call_small_model_examples")


def small_model_flags(example_info: Mapping[str, Any]) -> dict[str, Any]:
    """The small-model flags a model's ``example_info.json`` (or a BUNDLE's meta) lists
    under ``flags_for_calling``: ``{}`` when it lists none (most do not say either way)."""
    flags = example_info.get("flags_for_calling") or {}
    if not isinstance(flags, Mapping):
        return {}
    return {k: v for k, v in flags.items() if k.startswith("small_model") or k in SMALL_MODEL_FLAGS}


__all__ = ["CVO_COLUMNS", "SMALL_MODEL_GLOB", "SmallModelCalls", "iter_cvo", "parse_cvo",
           "read_cvo", "small_model_calls", "small_model_flags", "write_table"]
