"""Pileup attributes decoded from hand-built DeepVariant images with known read content."""

from __future__ import annotations

import math

import numpy as np
import pytest

from probing.channels import (
    BASE_COLOR,
    DIFFERS_FROM_REF,
    MATCHES_REF,
    NEGATIVE_STRAND,
    NOT_SUPPORTING,
    POSITIVE_STRAND,
    REF_ROWS,
    SUPPORTS_ALT,
    WGS_CHANNELS,
)
from probing.pileup import ATTRIBUTES, decode_quality, missing_attribute_reasons, pileup_attributes

H, W = 30, 21
CENTER = W // 2
CH = list(
    WGS_CHANNELS
)  # read_base, base_quality, mapping_quality, strand, rsv, differs, insert_size


def _px(q: int, cap: int) -> int:
    """Encode a quality as make_examples does."""
    return int(254 * min(q, cap) / cap)


def _draw_read(img, row, *, mapq, baseq, forward, alt, cols=range(W), site_baseq=None):
    """Draw one read on ``row`` over ``cols`` with the DeepVariant encoding."""
    r = REF_ROWS + row
    for c in cols:
        site = c == CENTER
        img[r, c, 0] = BASE_COLOR["G" if (alt and site) else "A"]
        bq = site_baseq if (site and site_baseq is not None) else baseq
        img[r, c, 1] = _px(bq, 40)
        img[r, c, 2] = _px(mapq, 60)
        img[r, c, 3] = POSITIVE_STRAND if forward else NEGATIVE_STRAND
        img[r, c, 4] = SUPPORTS_ALT if alt else NOT_SUPPORTING
        img[r, c, 5] = DIFFERS_FROM_REF if (alt and site) else MATCHES_REF
        img[r, c, 6] = _px(350, 1000)


def _ref_band(img):
    img[:REF_ROWS, :, 0] = BASE_COLOR["A"]
    img[:REF_ROWS, :, 1] = 254
    img[:REF_ROWS, :, 2] = 254
    img[:REF_ROWS, :, 3] = POSITIVE_STRAND
    img[:REF_ROWS, :, 4] = NOT_SUPPORTING
    img[:REF_ROWS, :, 5] = MATCHES_REF
    img[:REF_ROWS, :, 6] = 254


def _example_batch() -> np.ndarray:
    imgs = np.zeros((3, H, W, len(CH)), dtype=np.uint8)
    # Image 0: 10 reads, MAPQ 60 x6 / 10 x2 / 5 x2 (5 survives only with lowered filters),
    # 3 alt reads (2 forward, 1 reverse), base quality 30 everywhere except one read at 20.
    _ref_band(imgs[0])
    mapqs = [60, 60, 60, 60, 60, 60, 10, 10, 5, 5]
    for i, mq in enumerate(mapqs):
        _draw_read(
            imgs[0],
            i,
            mapq=mq,
            baseq=30,
            forward=i % 2 == 0,
            alt=i in (0, 2, 3),
            site_baseq=20 if i == 9 else None,
        )
    # Image 1: 4 reads, none covers the site column (all end before it), no alt reads.
    _ref_band(imgs[1])
    for i in range(4):
        _draw_read(imgs[1], i, mapq=44, baseq=37, forward=True, alt=False, cols=range(0, CENTER))
    # Image 2: reference band only (no reads at all).
    _ref_band(imgs[2])
    return imgs


def test_known_values():
    a = pileup_attributes(_example_batch(), CH, low_mapq=10)
    assert list(a) == list(ATTRIBUTES)
    assert all(v.dtype == np.float32 and v.shape == (3,) for v in a.values())
    np.testing.assert_array_equal(a["depth"], [10, 4, 0])
    assert a["mean_mapq"][0] == pytest.approx((6 * 60 + 2 * 10 + 2 * 5) / 10)
    assert a["mean_mapq"][1] == 44  # exact inversion: 44 -> pixel 186 -> 44
    assert a["frac_low_mapq"][0] == pytest.approx(0.2)  # the two MAPQ-5 reads; 10 is not < 10
    assert a["frac_low_mapq"][1] == 0
    assert a["mean_baseq"][0] == pytest.approx((9 * 30 + 20) / 10)
    assert math.isnan(a["mean_baseq"][1])  # nobody covers the site column
    assert a["alt_fraction"][0] == pytest.approx(0.3)
    assert a["alt_fraction"][1] == 0
    assert a["alt_strand_balance"][0] == pytest.approx(2 / 3)  # reads 0, 2 forward; 3 reverse
    assert math.isnan(a["alt_strand_balance"][1])  # no alt reads
    for k in ATTRIBUTES[1:]:
        assert math.isnan(a[k][2]), k  # no reads: undefined, not zero
    # Lower threshold: nothing is below 5.
    assert pileup_attributes(_example_batch(), CH, low_mapq=5)["frac_low_mapq"][0] == 0


def test_single_image_and_partial_reads_count_once():
    img = np.zeros((H, W, len(CH)), dtype=np.uint8)
    _ref_band(img)
    _draw_read(img, 0, mapq=60, baseq=40, forward=False, alt=True, cols=range(CENTER, W))
    _draw_read(img, 1, mapq=60, baseq=40, forward=False, alt=False, cols=range(0, 3))
    a = pileup_attributes(img, CH)
    assert a["depth"][0] == 2 and a["alt_fraction"][0] == 0.5
    assert a["alt_strand_balance"][0] == 0.0 and a["mean_baseq"][0] == 40


def test_quality_inversion_is_exact():
    q = np.arange(0, 61)
    pix = np.array([_px(v, 60) for v in q], dtype=np.uint8)
    np.testing.assert_array_equal(decode_quality(pix, 60), q)
    q = np.arange(0, 41)
    pix = np.array([_px(v, 40) for v in q], dtype=np.uint8)
    np.testing.assert_array_equal(decode_quality(pix, 40), q)


def test_missing_channels_give_nan_with_reason():
    imgs = _example_batch()
    keep = [0, 1, 5, 6]  # read_base, base_quality, base_differs_from_ref, insert_size
    chans = [CH[i] for i in keep]
    a = pileup_attributes(np.ascontiguousarray(imgs[..., keep]), chans)
    np.testing.assert_array_equal(a["depth"], [10, 4, 0])
    assert a["mean_baseq"][0] == pytest.approx(29)
    for k in ("mean_mapq", "frac_low_mapq", "alt_fraction", "alt_strand_balance"):
        assert np.isnan(a[k]).all(), k
    why = missing_attribute_reasons(chans)
    assert set(why) == {"mean_mapq", "frac_low_mapq", "alt_fraction", "alt_strand_balance"}
    assert "mapping_quality (3)" in why["mean_mapq"]
    assert "read_supports_variant (5)" in why["alt_fraction"]
    assert missing_attribute_reasons(CH) == {}


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        pileup_attributes(np.zeros((1, H, W, 7), np.float32), CH)
    with pytest.raises(ValueError, match="channels listed"):
        pileup_attributes(np.zeros((1, H, W, 7), np.uint8), CH[:6])


def test_quality_decoders_invert_the_encoding_exactly() -> None:
    from probing.channels import baseq_from_pixel, mapq_from_pixel

    mq = np.arange(0, 61)
    assert (mapq_from_pixel((254 * mq) // 60) == mq).all()
    bq = np.arange(0, 41)
    assert (baseq_from_pixel((254 * bq) // 40) == bq).all()
    assert mapq_from_pixel(254) == 60 and baseq_from_pixel(0) == 0


@pytest.mark.parametrize("width", [1, 2, 3, 5, 8, 221])
def test_fast_width_maximum_equals_numpys(width: int) -> None:
    from probing.pileup import _max_over_width

    rng = np.random.default_rng(width)
    reads = rng.integers(0, 256, size=(3, 9, width, 7), dtype=np.uint8)
    reads[0, 2] = 0  # an empty row
    np.testing.assert_array_equal(_max_over_width(reads), reads.max(axis=2))
