"""DeepVariant pileup channels: enum numbers, names and the pixel encoding constants.

Facts from DeepVariant's ``deepvariant.proto`` (``DeepVariantChannelEnum``) and
``pileup_channel_lib`` / ``pileup_image.py`` default options (see ``shared/reference``).
Both the encoder (``probing.make_examples``) and the decoder of pileup attributes
(``probing.pileup``) read these constants, so they cannot drift apart.
"""

from __future__ import annotations

import numpy as np

CHANNEL_NAMES: dict[int, str] = {
    1: "read_base",
    2: "base_quality",
    3: "mapping_quality",
    4: "strand",
    5: "read_supports_variant",
    6: "base_differs_from_ref",
    7: "haplotype",
    8: "allele_frequency",
    9: "diff_channels_alternate_allele_1",
    10: "diff_channels_alternate_allele_2",
    11: "read_mapping_percent",
    12: "avg_base_quality",
    13: "identity",
    14: "gap_compressed_identity",
    15: "gc_content",
    16: "is_homopolymer",
    17: "homopolymer_weighted",
    18: "blank",
    19: "insert_size",
    20: "base_channels_alternate_allele_1",
    21: "base_channels_alternate_allele_2",
    22: "mean_coverage",
    23: "base_methylation",
}

# DeepVariant 1.6+ WGS / WES models.
WGS_CHANNELS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 19)
WGS_SHAPE: tuple[int, int, int] = (100, 221, 7)

# Geometry.
REF_ROWS = 5  # reference band at the top of every pileup
MAX_PIXEL = 254  # "pixel as float" maximum; values are int(254 * fraction)

# read_base (1)
BASE_COLOR = {"A": 250, "G": 180, "T": 100, "C": 30}  # anything else (N, '*') -> 0
# base_quality (2) / mapping_quality (3) caps
BASE_QUALITY_CAP = 40
MAPPING_QUALITY_CAP = 60
# strand (4)
POSITIVE_STRAND = 70
NEGATIVE_STRAND = 240
# read_supports_variant (5): alt in this example's alt set -> 254, otherwise int(254*0.6)
SUPPORTS_ALT = 254
NOT_SUPPORTING = int(MAX_PIXEL * 0.6)  # 152
# base_differs_from_ref (6)
MATCHES_REF = int(MAX_PIXEL * 0.2)  # 50
DIFFERS_FROM_REF = 254
# insert_size (19)
INSERT_SIZE_CAP = 1000

# Default read filters of make_examples (short reads).
MIN_MAPPING_QUALITY = 10
MIN_BASE_QUALITY = 10


def channel_name(enum_value: int) -> str:
    """Name of a DeepVariant channel enum value (``ch<N>`` when unknown to this table)."""
    return CHANNEL_NAMES.get(int(enum_value), f"ch{int(enum_value)}")


def channel_index(channels: list[int] | tuple[int, ...], enum_value: int) -> int | None:
    """Position of a channel on the image's channel axis, or None when the model lacks it."""
    try:
        return list(channels).index(enum_value)
    except ValueError:
        return None


def decode_quality(pixel, cap: int) -> np.ndarray:
    """Exact integer quality from a pixel written as ``floor(254*min(q,cap)/cap)``.

    The encoding is injective for integer qualities up to ``cap``, so
    ``ceil(pixel * cap / 254)`` recovers them exactly (integer arithmetic, no float error).
    """
    p = np.asarray(pixel).astype(np.int32)
    return (p * cap + (MAX_PIXEL - 1)) // MAX_PIXEL


def mapq_from_pixel(pixel):
    """Exact MAPQ (capped at 60) from its mapping_quality pixel."""
    return decode_quality(pixel, MAPPING_QUALITY_CAP)


def baseq_from_pixel(pixel):
    """Exact base quality (capped at 40) from its base_quality pixel."""
    return decode_quality(pixel, BASE_QUALITY_CAP)
