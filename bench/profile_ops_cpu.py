"""Where a CPU forward's time goes, per kind of operator: the CPU engine vs onnxruntime.

    .venv/bin/python bench/profile_ops_cpu.py --batch-size 16 --iters 5

One thread, one batch (no batch split, no thread pool), the same seeded weights on both
sides (``bench_model_cpu``'s ONNX export). The native side is the CPU engine's model
(:func:`dvtorch.engine.cpu.fused_model`: BN folded, channels-last, oneDNN fused
conv+bias+ReLU with pre-packed weights), profiled with ``torch.profiler`` (self CPU time
per ATen / oneDNN op); onnxruntime with its node profiler (kernel time per node). Both are
grouped into convolution (with its fused bias + ReLU), max pool, average pool, concat and
the rest, and given in ms per batch next to the plain wall time of a forward (both timed
interleaved, as in ``bench_model_cpu``). This is the breakdown behind docs/performance.md's
explanation of the remaining fp32 gap and of the bf16 ceiling; ``--dtype bf16`` profiles
the bf16 engine.

A second table times the convolution *kernels* alone, by stage (the conv's input height x
width): oneDNN's own per-primitive timer (its verbose mode, read from the process's stdout)
against onnxruntime's per-node kernel time. The profiler's "conv" row also holds each conv
op's fixed cost (argument parsing, oneDNN primitive-descriptor creation, output
allocation), which this table leaves out, so the two tables together separate kernel speed
from framework overhead.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model_cpu import SHAPE, _time_all, export_onnx, ort_session  # noqa: E402

from dvtorch.bundle import preprocess, random_state_dict  # noqa: E402
from dvtorch.engine.allocator import reuse_freed_memory  # noqa: E402
from dvtorch.engine.cpu import FusedConvBN, fused_model  # noqa: E402
from dvtorch.engine.cpu_features import describe  # noqa: E402
from dvtorch.inception import ConvBN, DeepVariantInceptionV3  # noqa: E402

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


def _ort_node_events(onnx_bytes: bytes, x: np.ndarray, iters: int) -> list[tuple[dict, float]]:
    """onnxruntime's node kernel events of ``iters`` profiled runs: (event, ms per batch)."""
    with tempfile.TemporaryDirectory() as tmp:
        sess = ort_session(onnx_bytes, profile_prefix=str(Path(tmp) / "ort"))
        name = sess.get_inputs()[0].name
        for _ in range(2 + iters):
            sess.run(None, {name: x})
        events = json.loads(Path(sess.end_profiling()).read_text())
    # node events inside the last `iters` runs (the first two are warm-up)
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")[-iters:]
    return [(e, e["dur"] / 1e3 / iters) for e in events
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
            and any(a <= e["ts"] <= b for a, b in runs)]


def ort_profile(onnx_bytes: bytes, x: np.ndarray, iters: int) -> dict[str, float]:
    out = dict.fromkeys(GROUPS, 0.0)
    for e, dur in _ort_node_events(onnx_bytes, x, iters):
        out[_ORT.get(e["args"].get("op_name", ""), "other")] += dur
    return out


def _stage(h: int, w: int) -> str:
    return f"{h}x{w}"


def engine_model(sd: dict[str, torch.Tensor], dtype: str, batch: int) -> torch.nn.Module:
    """The CPU engine's model for ``sd`` in ``dtype``, packed for ``batch``: run here in the
    calling thread, without the engine's worker threads or captures."""
    model = DeepVariantInceptionV3(SHAPE)
    model.load_state_dict(sd)
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    return fused_model(model.eval(), dt, batch)


def onednn_conv_stages(model: torch.nn.Module, x: torch.Tensor,
                       iters: int) -> tuple[dict[str, float], float, int]:
    """oneDNN's own execution time of the conv primitives, ms per batch by input HxW, and
    the wall time of the 94 conv blocks around them (ms per batch) and their count.

    oneDNN's verbose mode prints one line per executed primitive (with its problem
    descriptor and time in ms) to the C library's stdout; file descriptor 1 is pointed at a
    temporary file meanwhile and put back afterwards. Each conv block's wall time is taken
    in separate forwards without verbose mode (its formatting and printing would count)
    by a forward pre-hook / hook pair (a few microseconds of hook overhead each); the nine
    pool-branch blocks include their 3x3 average pool (~1.5 ms per batch in all).
    """
    libc = ctypes.CDLL(None)
    kernels: dict[str, float] = collections.defaultdict(float)
    started: list[float] = []
    walls: list[float] = []
    blocks = [m for m in model.modules() if isinstance(m, (ConvBN, FusedConvBN))]
    handles = [h for b in blocks for h in (
        b.register_forward_pre_hook(lambda *_: started.append(time.perf_counter())),
        b.register_forward_hook(lambda *_: walls.append(time.perf_counter() - started.pop())))]
    try:
        with torch.inference_mode():
            for _ in range(2):
                model(x)
            walls.clear()
            for _ in range(iters):
                model(x)
    finally:
        for h in handles:
            h.remove()
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+") as log:
        os.dup2(log.fileno(), 1)
        try:
            with torch.inference_mode(), \
                    torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                for _ in range(iters):
                    model(x)
        finally:
            libc.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)
        log.seek(0)
        for line in log:
            if ",exec,cpu,convolution," not in line:
                continue
            fields = line.rstrip().split(",")
            hw = re.search(r"ih(\d+).*iw(\d+)", fields[-2])
            if hw:
                kernels[_stage(int(hw[1]), int(hw[2]))] += float(fields[-1]) / iters
    if not kernels:
        raise RuntimeError("oneDNN printed no convolution timings (verbose mode unavailable?)")
    return dict(kernels), 1e3 * sum(walls) / iters, len(blocks)


def ort_conv_stages(onnx_bytes: bytes, x: np.ndarray, iters: int) -> dict[str, float]:
    """onnxruntime's Conv / FusedConv kernel time, ms per batch by input HxW."""
    out: dict[str, float] = collections.defaultdict(float)
    for e, dur in _ort_node_events(onnx_bytes, x, iters):
        if e["args"].get("op_name") in ("Conv", "FusedConv"):
            shape = next(iter(e["args"]["input_type_shape"][0].values()))
            out[_stage(shape[2], shape[3])] += dur
    return dict(out)


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
    model = engine_model(sd, args.dtype, args.batch_size)
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

    # Kernels only: oneDNN's timer vs onnxruntime's, by the conv's input size.
    dnnl, blocks_wall, n_blocks = onednn_conv_stages(model, x_native, args.iters)
    mlas = ort_conv_stages(onnx_bytes, x_ort, args.iters)
    stages = sorted(set(dnnl) | set(mlas), key=lambda s: -int(s.split("x")[0]))
    print("\nconvolution kernels only, ms per batch, by conv input HxW "
          "(oneDNN's own timer vs onnxruntime's node kernel time):")
    print(f"{'input HxW':10s} {'oneDNN ' + args.dtype:>14s} {'onnxruntime fp32':>17s}")
    for s in stages:
        print(f"{s:10s} {dnnl.get(s, 0.0):14.1f} {mlas.get(s, 0.0):17.1f}")
    print(f"{'all':10s} {sum(dnnl.values()):14.1f} {sum(mlas.values()):17.1f}")
    outside = blocks_wall - sum(dnnl.values())
    print(f"the {n_blocks} conv blocks' wall time in the same forwards: {blocks_wall:.1f} ms, "
          f"i.e. {outside:.1f} ms outside oneDNN's kernels "
          f"({1e3 * outside / n_blocks:.0f} us per conv block, pool-branch average pools "
          f"included)")


if __name__ == "__main__":
    main()
