"""dvtorch.cpu: whether bf16 runs natively, from torch's own CPU probes."""

from __future__ import annotations

import pytest
import torch

from dvtorch.cpu import native_bf16


def _probes(monkeypatch, avx512_bf16, amx):
    for name, value in (("_is_avx512_bf16_supported", avx512_bf16),
                        ("_is_amx_tile_supported", amx)):
        if value is None:
            monkeypatch.delattr(torch.cpu, name, raising=False)
        else:
            monkeypatch.setattr(torch.cpu, name, lambda v=value: v, raising=False)


@pytest.mark.parametrize(("avx512_bf16", "amx", "expected"), [
    (True, False, True),    # AVX-512 BF16 alone (e.g. AMD Zen 4)
    (True, True, True),     # with AMX (Sapphire Rapids and later)
    (False, False, False),  # emulated: slower than float32
    (None, True, None),     # a torch without the probes: unknown, not a guess
])
def test_native_bf16_follows_torchs_cpu_probes(monkeypatch, avx512_bf16, amx, expected):
    _probes(monkeypatch, avx512_bf16, amx)
    assert native_bf16() is expected


def test_native_bf16_answers_on_this_machine():
    assert native_bf16() in (True, False, None)
