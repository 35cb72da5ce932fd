"""Where a CPU forward's time goes, per kind of operator: native model vs onnxruntime.

    .venv/bin/python bench/profile_ops_cpu.py --batch-size 16 --iters 5

One thread, one batch (no batch split, no thread pool), the same seeded weights on both
sides (``bench_model_cpu``'s ONNX export). The native model is profiled with
``torch.profiler`` (self CPU time per ATen / oneDNN op), onnxruntime with its node profiler
(kernel time per node); both are grouped into convolution (with its fused bias + ReLU),
max pool, average pool, concat and the rest, and given in ms per batch next to the plain
wall time of a forward (both timed interleaved, as in ``bench_model_cpu``). This is the
breakdown behind the README's explanation of the remaining fp32 gap and of the bf16
ceiling; ``--dtype bf16`` profiles the bf16 model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model_cpu import SHAPE, _time_all, export_onnx, native  # noqa: E402

from dvtorch.allocator import reuse_freed_memory  # noqa: E402
from dvtorch.bundle import preprocess, random_state_dict  # noqa: E402
from dvtorch.cpu import describe  # noqa: E402

GROUPS = ("conv", "max pool", "avg pool", "concat", "other")

# Operator names -> group. Native: ATen / oneDNN op names; onnxruntime: node op types.
_NATIVE = {"mkldnn::_convolution_pointwise": "conv", "aten::mkldnn_convolution": "conv",
           "aten::maximum": "max pool", "aten::max_pool2d": "max pool",
           "aten::max_pool2d_with_indices": "max pool", "aten::avg_pool2d": "avg pool",
           "aten::cat": "concat"}
_ORT = {"Conv": "conv", "FusedConv": "conv", "MaxPool": "max pool",
        "AveragePool": "avg pool", "Concat": "concat"}


def native_profile(model: torch.nn.Module, x: torch.Tensor, iters: int) -> dict[str, float]:
    """Self CPU ms per batch by group (operators nested in others are not counted twice)."""
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(iters):
                model(x)
    out = dict.fromkeys(GROUPS, 0.0)
    for ev in prof.key_averages():
        out[_NATIVE.get(ev.key, "other")] += ev.self_cpu_time_total / 1e3 / iters
    return out


def ort_session(onnx_bytes: bytes, profile_prefix: str | None = None) -> ort.InferenceSession:
    """One-thread onnxruntime CPU session (profiling to ``profile_prefix`` when given)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])


def ort_profile(onnx_bytes: bytes, x: np.ndarray, iters: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        sess = ort_session(onnx_bytes, str(Path(tmp) / "ort"))
        name = sess.get_inputs()[0].name
        for _ in range(2 + iters):
            sess.run(None, {name: x})
        events = json.loads(Path(sess.end_profiling()).read_text())
    # node events inside the last `iters` runs (the first two are warm-up)
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")[-iters:]
    out = dict.fromkeys(GROUPS, 0.0)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") \
                and any(a <= e["ts"] <= b for a, b in runs):
            out[_ORT.get(e["args"].get("op_name", ""), "other")] += e["dur"] / 1e3 / iters
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(1)
    reuse_freed_memory()
    sd = random_state_dict(args.seed, SHAPE)
    mode = "native_bf16" if args.dtype == "bf16" else "native_fp32"
    model = native(sd, mode, args.batch_size)
    model._batch_split = False  # one thread: profile the plain forward
    rng = np.random.default_rng(args.seed)
    pixels = rng.integers(0, 256, (args.batch_size, *SHAPE), dtype=np.uint8)
    x_native = torch.from_numpy(pixels)
    x_ort = preprocess(pixels).numpy()
    onnx_bytes = export_onnx(sd)

    ours = native_profile(model, x_native, args.iters)
    theirs = ort_profile(onnx_bytes, x_ort, args.iters)
    sess = ort_session(onnx_bytes)
    name = sess.get_inputs()[0].name
    times: dict[str, list[float]] = {"native": [], "ort": []}
    _time_all({"native": lambda: model(x_native), "ort": lambda: sess.run(None, {name: x_ort})},
              times, args.iters)
    wall_native, wall_ort = (1e3 * statistics.median(times[k]) for k in ("native", "ort"))

    # Profilers add their own cost (onnxruntime's node profiler ~10 % here), so each side's
    # profiled shares are applied to its unprofiled wall time.
    sum_n, sum_o = sum(ours.values()), sum(theirs.values())
    print(describe())
    print(f"1 thread, batch {args.batch_size}, {args.iters} profiled forwards, "
          f"torch {torch.__version__}, onnxruntime {ort.__version__}")
    print(f"ms per batch: each side's profiled share x its unprofiled wall time "
          f"(profiled sums {sum_n:.1f} / {sum_o:.1f} ms)")
    print(f"{'':10s} {'native ' + args.dtype:>14s} {'onnxruntime fp32':>17s}")
    for g in GROUPS:
        print(f"{g:10s} {ours[g] / sum_n * wall_native:14.1f} {theirs[g] / sum_o * wall_ort:17.1f}")
    print(f"{'wall':10s} {wall_native:14.1f} {wall_ort:17.1f}   "
          f"(native / onnxruntime speed {wall_ort / wall_native:.2f}x)")


if __name__ == "__main__":
    main()
