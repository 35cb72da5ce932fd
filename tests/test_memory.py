"""Memory estimates that decide whether extraction may run whole batches per thread."""

from __future__ import annotations

import pytest

from dvtorch.engine import memory

GB = 1 << 30


def test_per_example_estimate_covers_the_measured_peak():
    # measured peak growth per example (100 x 221 pileups, one thread): 4.3-5.2 MB fp32
    fp32 = memory.activation_bytes_per_example((100, 221, 7), 4)
    assert 5.2e6 <= fp32 <= 7e6
    assert memory.activation_bytes_per_example((100, 221, 7), 2) == fp32 // 2
    # proportional to the pileup's area, not its channels
    assert memory.activation_bytes_per_example((100, 442, 9), 4) == 2 * fp32


@pytest.mark.parametrize(("depth", "batch", "available", "fits"), [
    (2, 64, 24 * GB, True),       # this machine: ~0.7 GB of 24
    (16, 64, 64 * GB, True),      # ~5.8 GB of a 64 GB box
    (8, 64, 10 * GB, False),      # ~2.9 GB > a quarter of a 10 GB laptop's free memory
    (8, 16, 10 * GB, True),       # a smaller batch fits
    (2, 64, None, False),         # unknown: keep one batch's worth
    (1, 64, None, True),
])
def test_whole_batches_fit_in_a_quarter_of_what_is_available(depth, batch, available, fits):
    ok, need = memory.whole_batches_fit(depth, batch, (100, 221, 7), 4, available)
    assert ok is fits
    assert need == depth * batch * memory.activation_bytes_per_example((100, 221, 7), 4)


@pytest.mark.parametrize(("depth", "available"), [(2, 2 * GB), (8, 10 * GB), (16, 64 * GB)])
def test_the_largest_batch_that_fits_is_the_fit_rules_boundary(depth, available):
    shape = (100, 221, 7)
    largest = memory.largest_batch_that_fits(depth, shape, 4, available)
    assert largest >= 1
    assert memory.whole_batches_fit(depth, largest, shape, 4, available)[0]
    assert not memory.whole_batches_fit(depth, largest + 1, shape, 4, available)[0]
    assert memory.largest_batch_that_fits(depth, shape, 4, None) == 0
