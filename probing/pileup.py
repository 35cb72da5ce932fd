"""Read-level summaries decoded from DeepVariant pileup images (no BAM needed).

Why: probing asks "which concept does this activation cluster track?" Depth, mapping
quality, base quality at the site, alt-allele fraction (the handle on mosaic / low-VAF
variants) and strand balance of alt reads are the first candidates, and they can be read
straight off the image because the pixel encoding is known (``probing.channels``, formats
sheet §4). All functions are vectorised over a batch ``[N, H, W, C]``.

Decoding rules used here:

* Rows ``0..REF_ROWS-1`` are the reference band; every later row is one read or empty.
  A read row is non-empty when any channel is non-zero anywhere in the row.
* Per-read channels (mapping_quality, strand, read_supports_variant) are constant over the
  columns a read covers and 0 elsewhere, so the row maximum over columns is the read's value.
* MAPQ and base quality are inverted *exactly*: make_examples writes
  ``floor(254 * min(q, cap) / cap)`` and since 254/cap > 1 that map is injective, so
  ``q = ceil(pixel * cap / 254)`` recovers the integer quality (a naive ``pixel*cap/254``
  decodes MAPQ 10 as 9.92 and would count it as "below 10").
* Qualities above the cap (MAPQ > 60, BQ > 40) are not recoverable: they decode as the cap.
* Images made with ``alt_aligned_pileup=rows`` stack three pileups vertically; their extra
  rows are counted as reads by this module (documented limitation).

Attributes whose channel the model does not have are NaN; :func:`missing_attribute_reasons`
says why for each.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from probing.channels import (
    BASE_QUALITY_CAP,
    MAPPING_QUALITY_CAP,
    POSITIVE_STRAND,
    REF_ROWS,
    SUPPORTS_ALT,
    channel_index,
    channel_name,
    decode_quality,
)

CH_BASE_QUALITY = 2
CH_MAPPING_QUALITY = 3
CH_STRAND = 4
CH_READ_SUPPORTS_VARIANT = 5

ATTRIBUTES: tuple[str, ...] = (
    "depth",
    "mean_mapq",
    "frac_low_mapq",
    "mean_baseq",
    "alt_fraction",
    "alt_strand_balance",
)

# Which DeepVariant channels each attribute needs (depth needs none: any channel will do).
REQUIRED_CHANNELS: dict[str, tuple[int, ...]] = {
    "depth": (),
    "mean_mapq": (CH_MAPPING_QUALITY,),
    "frac_low_mapq": (CH_MAPPING_QUALITY,),
    "mean_baseq": (CH_BASE_QUALITY,),
    "alt_fraction": (CH_READ_SUPPORTS_VARIANT,),
    "alt_strand_balance": (CH_READ_SUPPORTS_VARIANT, CH_STRAND),
}

DESCRIPTIONS: dict[str, str] = {
    "depth": "non-empty read rows (reads drawn; capped at H - 5, e.g. 95)",
    "mean_mapq": "mean decoded MAPQ over reads (capped at 60)",
    "frac_low_mapq": "fraction of reads with MAPQ < low_mapq (default 30: make_examples already "
    "drops MAPQ < 10, so a lower threshold would be 0 for short reads)",
    "mean_baseq": "mean decoded base quality over reads covering the variant column W//2",
    "alt_fraction": "reads supporting this example's alt set / depth (VAF estimate)",
    "alt_strand_balance": "fraction of alt-supporting reads on the forward strand (NaN: no alt reads)",
}


def missing_attribute_reasons(channels: Sequence[int]) -> dict[str, str]:
    """Attribute -> why it is NaN for every attribute this channel list cannot support."""
    have = {int(c) for c in channels}
    out: dict[str, str] = {}
    for attr, need in REQUIRED_CHANNELS.items():
        lacking = [c for c in need if c not in have]
        if lacking:
            names = ", ".join(f"{channel_name(c)} ({c})" for c in lacking)
            out[attr] = f"model has no {names} channel"
    return out


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num/den as float32 with NaN where den == 0 (no reads -> undefined, not 0)."""
    num = num.astype(np.float32)
    den = den.astype(np.float32)
    out = np.full(num.shape, np.nan, dtype=np.float32)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _max_over_width(reads: np.ndarray) -> np.ndarray:
    """``reads.max(axis=2)`` for uint8 ``[N, R, W, C]``, faster (docs/performance.md).

    numpy reduces a middle axis with an inner loop over the 7 channels only; maxima of
    the two halves of the width, halved again until one column is left, run as long
    vectorised loops instead (log2(W) passes over shrinking data). Otherwise this is most
    of the loader's per-example CPU time, which on a small CPU box is taken from the model.
    """
    r = reads
    while r.shape[2] > 1:
        half = r.shape[2] // 2
        m = np.maximum(r[:, :, :half], r[:, :, half:2 * half])
        if r.shape[2] % 2:
            np.maximum(m[:, :, 0], r[:, :, 2 * half], out=m[:, :, 0])
        r = m
    return r[:, :, 0]


def pileup_attributes(
    images: np.ndarray,
    channels: Sequence[int],
    *,
    low_mapq: int = 30,
) -> dict[str, np.ndarray]:
    """Per-example read summaries, each a float32 array ``[N]`` (see :data:`DESCRIPTIONS`).

    ``images`` is uint8 ``[N, H, W, C]`` (a single ``[H, W, C]`` image is accepted and
    treated as N=1); ``channels`` lists the DeepVariant channel enums in channel-axis order
    (from example_info.json). Means over zero reads are NaN.
    """
    imgs = np.asarray(images)
    if imgs.ndim == 3:
        imgs = imgs[None]
    if imgs.ndim != 4 or imgs.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, H, W, C], got {imgs.dtype} {list(imgs.shape)}")
    n, h, w, c = imgs.shape
    if len(channels) != c:
        raise ValueError(f"{len(channels)} channels listed but images have {c}")
    if h <= REF_ROWS:
        raise ValueError(
            f"image height {h} leaves no read rows below the {REF_ROWS} reference rows"
        )

    reads = imgs[:, REF_ROWS:]  # [N, R, W, C] view
    # One pass over the pixels: per-row, per-channel maximum over columns -> [N, R, C].
    row_max = _max_over_width(reads)  # [N, R, C]
    nonempty = row_max.any(axis=2)  # [N, R]
    depth = nonempty.sum(axis=1)
    nan = np.full(n, np.nan, dtype=np.float32)
    out: dict[str, np.ndarray] = {"depth": depth.astype(np.float32)}

    iq = channel_index(list(channels), CH_MAPPING_QUALITY)
    if iq is not None:
        mq = decode_quality(row_max[..., iq], MAPPING_QUALITY_CAP)
        out["mean_mapq"] = _safe_div(np.where(nonempty, mq, 0).sum(axis=1), depth)
        out["frac_low_mapq"] = _safe_div((nonempty & (mq < low_mapq)).sum(axis=1), depth)
    else:
        out["mean_mapq"] = nan.copy()
        out["frac_low_mapq"] = nan.copy()

    ib = channel_index(list(channels), CH_BASE_QUALITY)
    if ib is not None:
        col = reads[:, :, w // 2, :]  # [N, R, C]
        covers = col.any(axis=2)  # read has a base (or indel anchor) drawn at the site
        bq = decode_quality(col[..., ib], BASE_QUALITY_CAP)
        out["mean_baseq"] = _safe_div(np.where(covers, bq, 0).sum(axis=1), covers.sum(axis=1))
    else:
        out["mean_baseq"] = nan.copy()

    iv = channel_index(list(channels), CH_READ_SUPPORTS_VARIANT)
    if iv is not None:
        alt = nonempty & (row_max[..., iv] == SUPPORTS_ALT)
        n_alt = alt.sum(axis=1)
        out["alt_fraction"] = _safe_div(n_alt, depth)
        i_s = channel_index(list(channels), CH_STRAND)
        if i_s is not None:
            fwd = alt & (row_max[..., i_s] == POSITIVE_STRAND)
            out["alt_strand_balance"] = _safe_div(fwd.sum(axis=1), n_alt)
        else:
            out["alt_strand_balance"] = nan.copy()
    else:
        out["alt_fraction"] = nan.copy()
        out["alt_strand_balance"] = nan.copy()
    return {k: out[k] for k in ATTRIBUTES}


__all__ = [
    "ATTRIBUTES",
    "DESCRIPTIONS",
    "REQUIRED_CHANNELS",
    "decode_quality",
    "missing_attribute_reasons",
    "pileup_attributes",
]
