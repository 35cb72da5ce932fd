"""dvtorch.engine.cpu_features: whether bf16 runs natively, from torch's own CPU probes."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dvtorch.engine.cpu_features import describe, native_bf16


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


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file() or platform.machine() != "x86_64",
                    reason="reads the CPU flags Linux reports on x86")
def test_native_bf16_agrees_with_the_flags_linux_reports():
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    answer = native_bf16()
    if answer is not None:  # None: this torch has no probes to ask
        assert answer == bool({"avx512_bf16", "amx_bf16"} & flags)


def test_describe_names_the_cpu_and_its_bf16_support(monkeypatch):
    line = describe()
    assert line.startswith("cpu: ") and "\n" not in line
    _probes(monkeypatch, avx512_bf16=False, amx=True)
    assert "avx512_bf16 no, amx yes" in describe()
    for name in ("_is_avx512_supported", "_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.delattr(torch.cpu, name, raising=False)
    assert describe().endswith("(features unknown)")


def _run_with_onednn_capped_at_avx2(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=Path(__file__).parents[1], timeout=300)


needs_x86 = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                               reason="ONEDNN_MAX_CPU_ISA=AVX2 only means something on x86")


@needs_x86
def test_onednn_without_avx512_has_no_bf16_convolution():
    proc = _run_with_onednn_capped_at_avx2(
        "from dvtorch.engine.cpu_features import mkldnn_bf16; print(mkldnn_bf16())")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


@needs_x86
def test_a_bf16_model_still_runs_where_onednn_has_no_bf16_convolution():
    # Below AVX-512 oneDNN's fused conv op raises for bf16; the model must take ATen's path.
    proc = _run_with_onednn_capped_at_avx2(
        "import torch\n"
        "from dvtorch.bundle import random_state_dict\n"
        "from dvtorch.engine import make_engine\n"
        "from dvtorch.inception import DeepVariantInceptionV3\n"
        "shape = (75, 80, 7)\n"
        "sd = random_state_dict(1, shape)\n"
        "x = torch.randint(0, 256, (4, *shape), dtype=torch.uint8)\n"
        "pooled = []\n"
        "m = DeepVariantInceptionV3(shape)\n"
        "m.load_state_dict(sd)\n"
        "for dtype in ('fp32', 'bf16'):\n"
        "    engine = make_engine(m.eval(), ['mixed5'], 'max', dtype=dtype, batch_size=4)\n"
        "    pooled.append(engine(x)[1]['mixed5'])\n"
        "fused = engine.describe()['fused_conv']\n"
        "cos = torch.nn.functional.cosine_similarity(*pooled).min()\n"
        "print(fused, float(cos))\n"
    )
    assert proc.returncode == 0, proc.stderr
    fused, cosine = proc.stdout.split()
    assert fused == "False" and float(cosine) > 0.999
