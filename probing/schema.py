"""The obs columns extraction writes, grouped by where they come from (torch-free).

Why a module of its own: the loader fills the site columns and extraction adds the model's,
but readers of a STORE (``dvprobe info``, reports) must name them without importing the
loader or extraction, which import torch. The pileup attributes are
:data:`probing.pileup.ATTRIBUTES`. Order = docs/architecture.md, "obs columns".
"""

from __future__ import annotations

#: Columns the loader fills from each record: which example, and where in the genome.
META_COLUMNS: tuple[str, ...] = (
    "key", "shard", "record", "chrom", "pos", "end", "ref", "alt", "alt_allele_indices",
    "locus", "variant_type", "label", "sequencing_type",
)
#: The model's genotype probabilities, in the order of its softmax outputs.
PROB_COLUMNS: tuple[str, ...] = ("p_hom_ref", "p_het", "p_hom_alt")
#: Every column extraction takes from the model: the probabilities and their argmax.
MODEL_COLUMNS: tuple[str, ...] = (*PROB_COLUMNS, "pred_genotype")
