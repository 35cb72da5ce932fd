"""Would oneDNN Graph (TorchScript's LLGA fuser) remove PyTorch's per-conv call cost on CPU?

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_onednn_graph_cpu.py --iters 9

Why: ``bench/profile_ops_cpu.py`` shows that oneDNN's conv kernels run as fast as
onnxruntime's and that the fp32 gap is the 0.2-0.3 ms each eager conv call costs around its
kernel. ``torch.jit.enable_onednn_fusion(True)`` hands a frozen TorchScript graph to oneDNN
Graph, which compiles fused partitions once and then runs them without that per-call
bookkeeping. This script measures what that would give before dvprobe builds on it:

* ``ort_fp32``      onnxruntime, ``--threads`` intra-op threads (the reference)
* ``native_fp32`` / ``native_bf16``   dvprobe's eager path (``optimize_for_inference``)
* ``graph_fp32`` / ``graph_bf16``     the same model traced with a max-pooled ``mixed5``
  output, frozen, run by the LLGA fuser, as one single-threaded call per batch slice in
  ``dvtorch.parallel`` worker threads like the eager path

all timed interleaved on the same batch; then the correctness checks that would gate such
an engine: softmax and max-pooled ``mixed5`` of each graph run against the eager fp32 path,
and the same graph fed raw uint8 pixels (scaled inside the graph) -- which oneDNN Graph
computed wrongly here from its second call on, so pixels are scaled outside the graph.
The engine built on these findings is ``dvtorch.graph`` (``dvprobe extract --engine
graph``, and what ``--engine auto`` runs for long CPU runs); ``bench/bench_extract_cpu.py``
times it end to end. This script stays the raw model-call measurement.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model_cpu import SHAPE, _time_all, export_onnx, native, ort_session  # noqa: E402

from dvtorch import parallel  # noqa: E402
from dvtorch.allocator import reuse_freed_memory  # noqa: E402
from dvtorch.bundle import random_state_dict  # noqa: E402
from dvtorch.cpu import describe  # noqa: E402
from dvtorch.hooks import capture  # noqa: E402
from dvtorch.inception import DeepVariantInceptionV3, fuse_batchnorm, scale_pixels  # noqa: E402


class _WithMixed5(nn.Module):
    """Softmax and max-pooled ``mixed5`` as graph outputs: ``capture`` runs inside the
    traced forward, so its pooling is recorded into the graph (hooks do not survive it)."""

    def __init__(self, model: DeepVariantInceptionV3):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with capture(self.model, "mixed5", pool="max") as acts:
            probs = self.model(x)
            return probs, acts["mixed5"].float()


def _folded_model(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> DeepVariantInceptionV3:
    """The BN-folded, channels-last model in ``dtype`` (plain convs: what gets traced)."""
    model = DeepVariantInceptionV3(SHAPE)
    model.load_state_dict(sd)
    fuse_batchnorm(model.eval())
    return model.to(dtype).to(memory_format=torch.channels_last)


def _frozen_trace(module: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace's deprecation notice
        return torch.jit.freeze(torch.jit.trace(module.eval(), example, check_trace=False))


def _scaled(graph, dtype: torch.dtype
            ) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """uint8 pixels -> graph outputs, scaling outside the graph (see the module doc)."""
    return lambda pixels: graph(scale_pixels(pixels, dtype))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=9, help="timed rounds (after warm-up)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reuse_freed_memory()
    torch.jit.enable_onednn_fusion(True)

    sd = random_state_dict(args.seed, SHAPE)
    gen = torch.Generator().manual_seed(args.seed)
    pixels = torch.randint(0, 256, (args.batch_size, *SHAPE), dtype=torch.uint8, generator=gen)
    ways = max(1, parallel.split_ways(args.batch_size))
    slice_pixels = pixels[: parallel.slice_sizes(args.batch_size, ways)[0]]

    eager = {name: native(sd, f"native_{name}", args.batch_size) for name in ("fp32", "bf16")}
    graphs = {name: _scaled(_frozen_trace(_WithMixed5(_folded_model(sd, dtype)),
                                          scale_pixels(slice_pixels, dtype)), dtype)
              for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}

    def graph_run(name: str) -> torch.Tensor:
        # one single-threaded graph call per slice; only the softmax is kept for timing
        return parallel.run_split(lambda p: graphs[name](p)[0], pixels, ways)

    sess = ort_session(export_onnx(sd), args.threads)
    in_name = sess.get_inputs()[0].name
    x_ort = scale_pixels(pixels).numpy()

    runs: dict[str, Callable[[], object]] = {
        "ort_fp32": lambda: sess.run(None, {in_name: x_ort}),
        # onnxruntime's threads spin for a while after a run and would slow whatever is
        # timed next: let them park first (not reported)
        "park": lambda: time.sleep(0.05),
        "native_fp32": lambda: eager["fp32"](pixels),
        "graph_fp32": lambda: graph_run("fp32"),
        "native_bf16": lambda: eager["bf16"](pixels),
        "graph_bf16": lambda: graph_run("bf16"),
    }
    t0 = time.perf_counter()
    with torch.inference_mode():
        for _ in range(3):  # the profiling executor specialises and fuses on early calls
            graph_run("fp32")
            graph_run("bf16")
    warm = time.perf_counter() - t0
    times: dict[str, list[float]] = {k: [] for k in runs}
    _time_all(runs, times, args.iters)

    with torch.inference_mode():
        with capture(eager["fp32"], "mixed5", pool="max") as ref:
            p_ref = eager["fp32"](pixels)
        checks = {}
        for name in ("fp32", "bf16"):
            parts = [graphs[name](p) for p in torch.tensor_split(pixels, ways)]
            probs = torch.cat([p for p, _ in parts])
            emb = torch.cat([e for _, e in parts])
            cos = torch.nn.functional.cosine_similarity(emb, ref["mixed5"], dim=1)
            checks[name] = (float((probs - p_ref).abs().max()), float(cos.min()))
        raw = _frozen_trace(_folded_model(sd, torch.float32), slice_pixels)
        raw_err = [float((raw(slice_pixels) - p_ref[: len(slice_pixels)]).abs().max())
                   for _ in range(3)]

    print(describe())
    print(f"batch {args.batch_size} in {ways} slice(s), threads {args.threads}, {args.iters} "
          f"rounds, torch {torch.__version__}, onnxruntime {ort.__version__}; graph warm-up "
          f"(trace specialisation + fusion) {warm:.1f} s")
    base = args.batch_size / statistics.median(times["ort_fp32"])
    for k, ts in times.items():
        if k == "park":
            continue
        rate = args.batch_size / statistics.median(ts)
        print(f"{k:12s} {rate:8.1f} ex/s  x{rate / base:4.2f} vs ort_fp32")
    for name, (dp, cmin) in checks.items():
        print(f"graph_{name} vs native fp32: softmax max |diff| {dp:.2e}, max-pooled mixed5 "
              f"cosine min {cmin:.5f}")
    print("graph fed raw uint8 pixels, softmax max |diff| vs native fp32 on calls 1-3: "
          + ", ".join(f"{e:.2e}" for e in raw_err))


if __name__ == "__main__":
    main()
