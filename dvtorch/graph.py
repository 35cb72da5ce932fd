"""A CPU engine that runs the model and its pooled captures as one oneDNN Graph program.

Why: in the eager CPU forward each of the 94 convolutions pays 0.2-0.3 ms beyond its
kernel (Python, ATen's wrapper, oneDNN primitive-descriptor creation on every call), and
bf16 activations are converted between layouts around every conv. Traced and frozen, the
same forward is handed to oneDNN Graph (``torch.jit.enable_onednn_fusion``), which compiles
fused conv partitions once and keeps activations in its own layout between them: measured
~1.3x the eager bf16 extraction and a few per cent more in fp32 (README, Performance).

Why it is opt-in and checks itself: it runs through TorchScript (deprecated in current
PyTorch) and a fusing executor that re-specialises the program on the first calls of each
new input shape. That executor has been seen to return *wrong* results (the same traced
graph fed raw uint8 pixels: softmax off by 0.98 from its second call on;
``bench/bench_onednn_graph_cpu.py`` reproduces it). So the pixels are scaled outside the
program, and the first ``check_calls`` calls of every batch-slice shape are compared with
the eager forward on the same batch; a mismatch switches this engine to the eager forward
for good, with a warning saying how large the difference was. Results are therefore the
eager path's to within ``tolerance`` (relative L2 error per example and output).

Captured layers are traced outputs, not live hooks: one engine serves one (layers, pool)
choice, which is what an extraction run needs.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from dvtorch import parallel
from dvtorch.hooks import capture
from dvtorch.inception import DeepVariantInceptionV3, scale_pixels

_LOG = logging.getLogger(__name__)

# Relative L2 error per example and captured map or embedding (``avg_pool`` and each
# requested layer) accepted against the eager forward in the same dtype. fp32: measured
# <= 4e-5 (the same arithmetic in another order). bf16: the fused program rounds at other
# places than the eager bf16 path: measured <= 1.6e-2 on the seeded model (the deepest
# layers), where eager bf16 itself is 6.5e-2 from float32. A miscompiled program is off by O(1).
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2}
# The logits are 3 dot products of 2048 terms that nearly cancel in an untrained model
# (eager bf16 vs float32: 30-50 % relative), so each is held to ``tolerance`` times its
# condition, sum(|w| |x|) + |b|; the softmax to softmax(logits) of the same call.
SOFTMAX_TOLERANCE = 1e-5
CHECK_CALLS = 3  # the executor profiles, then fuses: call 3 of a shape runs the fused code


def available() -> bool:
    """Whether this torch can run oneDNN Graph (TorchScript with LLGA, oneDNN on the CPU)."""
    return torch.backends.mkldnn.is_available() \
        and callable(getattr(torch.jit, "enable_onednn_fusion", None)) \
        and callable(getattr(torch._C, "_jit_llga_enabled", None))


@contextlib.contextmanager
def _onednn_fusion() -> Iterator[None]:
    """oneDNN Graph fusion on for the calls inside, the caller's setting restored after
    (the flag is process-wide; the executor reads it when it optimises a graph)."""
    before = bool(torch._C._jit_llga_enabled())
    torch.jit.enable_onednn_fusion(True)
    try:
        yield
    finally:
        torch.jit.enable_onednn_fusion(before)


class _Tapped(nn.Module):
    """Softmax and pooled captures (``taps``) as one ``[N, 3 + sum(widths)]`` float32
    output: ``capture`` runs inside the traced forward, so its pooling is recorded into the
    graph (hooks do not survive tracing); one tensor out keeps batch slices concatenable.
    """

    def __init__(self, model: DeepVariantInceptionV3, taps: Sequence[str], pool: str | None):
        super().__init__()
        self.model = model
        self.taps = list(taps)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with capture(self.model, self.taps, pool=self.pool) as acts:
            probs = self.model(x)
            parts = [probs.float()] + [acts[n].reshape(x.shape[0], -1).float()
                                       for n in self.taps]
        return torch.cat(parts, 1)


def _relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest per-row ``||got - ref|| / ||ref||`` (0 for an all-zero reference row pair)."""
    diff = torch.linalg.vector_norm((got - ref).double(), dim=1)
    norm = torch.linalg.vector_norm(ref.double(), dim=1)
    rel = torch.where(norm > 0, diff / norm.clamp_min(1e-30), diff)
    return float(rel.max()) if rel.numel() else 0.0


class GraphForward:
    """``engine(pixels) -> (probs, {layer: pooled})`` like an eager forward under
    ``capture``, run as a oneDNN Graph program on the CPU (see the module docstring).

    ``model`` is a CPU model from :func:`dvtorch.load` / ``optimize_for_inference`` (its
    dtype is the program's); ``pixels`` are uint8 NHWC batches. Batches are split across
    ``torch.get_num_threads()`` single-threaded calls like the eager forward's
    (:mod:`dvtorch.parallel`). ``fallback_reason`` is set once the engine has switched to the
    eager forward.
    """

    def __init__(self, model: DeepVariantInceptionV3, layers: Sequence[str],
                 pool: str | None = "max", *, check_calls: int = CHECK_CALLS,
                 tolerance: float | None = None):
        if not available():
            raise RuntimeError("oneDNN Graph is not available in this torch build "
                               "(needs TorchScript and oneDNN on the CPU)")
        if model.dense.weight.device.type != "cpu":
            raise ValueError("the oneDNN Graph engine runs on the CPU only")
        self.model = model.eval()
        self.layers = list(layers)
        # always traced, for the gate: the embedding, the logits (and the softmax) from it
        self._taps = ["avg_pool", "logits"] + [n for n in self.layers
                                               if n not in ("avg_pool", "logits")]
        self.pool = pool
        self.dtype = model.dense.weight.dtype
        if self.dtype not in TOLERANCE:
            raise ValueError(f"the oneDNN Graph engine runs fp32 or bf16 models, not {self.dtype}")
        self.check_calls = check_calls
        self.tolerance = TOLERANCE[self.dtype] if tolerance is None else tolerance
        self.fallback_reason: str | None = None
        self.checks: list[float] = []  # largest relative error of every checked call
        self._program: torch.jit.ScriptModule | None = None
        self._widths: list[int] | None = None
        self._checked: dict[tuple[int, ...], int] = {}

    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if pixels.dtype != torch.uint8 or pixels.dim() != 4:
            raise ValueError(f"expected uint8 NHWC pixels, got {pixels.dtype} "
                             f"{list(pixels.shape)}")
        if self.fallback_reason is not None or pixels.shape[0] == 0:
            return self._eager(pixels)
        ways = parallel.split_ways(pixels.shape[0])
        key = tuple(parallel.slice_sizes(pixels.shape[0], ways))
        if self._program is None:
            self._program = self._trace(pixels[: key[0]])
        program = self._program
        dtype = self.dtype

        def run(p: torch.Tensor) -> torch.Tensor:
            return program(scale_pixels(p, dtype))

        with _onednn_fusion():
            flat = parallel.run_split(run, pixels, ways) if ways > 1 else run(pixels)
        seen = self._checked.get(key, 0)
        if seen < self.check_calls:
            checked = self._check(flat, pixels)
            if checked is not None:
                self.fallback_reason = (
                    f"oneDNN Graph output differed from the eager forward ({checked[0]}; "
                    f"batch slices {list(key)}, call {seen + 1}); using the eager forward "
                    "from here on")
                _LOG.warning(self.fallback_reason)
                return checked[1]
            self._checked[key] = seen + 1
        return self._split(flat)

    def _check(self, flat: torch.Tensor, pixels: torch.Tensor
               ) -> tuple[str, tuple[torch.Tensor, dict[str, torch.Tensor]]] | None:
        """None if the program's output for ``pixels`` passes the gate, else (why, the
        eager forward's result)."""
        probs, embedding, logits, *layers = self._blocks(flat)
        eager = _eager_forward(self.model, self._taps, self.pool, pixels)
        ref = {n: eager[1][n].reshape(pixels.shape[0], -1).float() for n in self._taps}
        err = max(_relative_error(g, ref[n]) for g, n in
                  zip([embedding, *layers], ["avg_pool", *self._taps[2:]], strict=True))
        dense = self.model.dense
        condition = ref["avg_pool"].abs() @ dense.weight.float().abs().T \
            + dense.bias.float().abs()
        logit_err = float(((logits - ref["logits"]).abs() / condition.clamp_min(1e-30)).max())
        err = max(err, logit_err)
        soft = float((probs - torch.softmax(logits, dim=1)).abs().max())
        self.checks.append(err)
        result = (eager[0], {n: eager[1][n] for n in self.layers})
        if not err <= self.tolerance:
            return f"relative error {err:.2e} > {self.tolerance:.0e}", result
        if not soft <= SOFTMAX_TOLERANCE:
            return f"softmax differs from softmax(logits) by {soft:.2e}", result
        return None

    def _trace(self, example: torch.Tensor) -> torch.jit.ScriptModule:
        tapped = _Tapped(self.model, self._taps, self.pool).eval()
        x = scale_pixels(example, self.dtype)
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.trace's deprecation notice
            x = x.clone()  # a normal tensor: inference tensors cannot be traced into a graph
            program = torch.jit.freeze(torch.jit.trace(tapped, x, check_trace=False))
            probs, acts = _eager_forward(self.model, self._taps, self.pool, example)
        self._widths = [probs.shape[1]] + [acts[n][0].numel() for n in self._taps]
        self._shapes = {n: acts[n].shape[1:] for n in self._taps}
        return program

    def _blocks(self, flat: torch.Tensor) -> list[torch.Tensor]:
        assert self._widths is not None
        return list(torch.split(flat, self._widths, dim=1))

    def _split(self, flat: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        probs, *parts = self._blocks(flat)
        taps = dict(zip(self._taps, parts, strict=True))
        return probs, {n: taps[n].reshape(flat.shape[0], *self._shapes[n]) for n in self.layers}

    def _eager(self, pixels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return _eager_forward(self.model, self.layers, self.pool, pixels)


def _eager_forward(model: nn.Module, layers: Sequence[str], pool: str | None,
                   pixels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    with torch.no_grad(), capture(model, layers, pool=pool) as acts:
        probs = model(pixels)
        return probs, {n: acts[n] for n in layers}
