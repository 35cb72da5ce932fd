"""A CPU engine that runs the model and its pooled captures as one oneDNN Graph program.

Why: in the eager CPU forward each of the 94 convolutions pays 0.2-0.3 ms beyond its
kernel (Python, ATen's wrapper, oneDNN primitive-descriptor creation on every call).
Traced and frozen, the
same forward is handed to oneDNN Graph (``torch.jit.enable_onednn_fusion``), which compiles
fused conv partitions once and keeps activations in its own layout between them (figures:
README, Performance).

Why extraction uses it only for long CPU runs (``--engine auto``) and why it checks itself:
it runs through TorchScript (deprecated in current PyTorch), starts 2-3 s slower, and has a
fusing executor that re-specialises the program on the first calls of each
new input shape. That executor has been seen to return *wrong* results (the same traced
graph fed raw uint8 pixels: softmax off by 0.98 from its second call on;
``bench/bench_onednn_graph_cpu.py`` reproduces it). So the pixels are scaled outside the
program; each input size gets a program of its own (at most ``MAX_PROGRAMS``; other
sizes run eagerly), so a program only ever sees one input shape; and the first
``check_calls`` calls of every program are compared with the eager forward on the same
batch (run one at a time: concurrent first calls have failed inside oneDNN Graph). An
output further from float32 than the eager forward's own (see ``ERROR_RATIO``), a softmax
that is not softmax(logits), or an exception switches the engine to the eager forward for
good, with a warning that says why; that batch is redone eagerly, so nothing wrong or
missing reaches the caller.

Two ways to call it: ``engine(pixels)`` splits the batch across the compute threads like
the eager forward (programs per slice size); ``engine.submit(pixels)`` runs the whole batch
on one worker thread and returns at once, so that ``depth`` batches run side by side
(programs per batch size) -- what extraction does (measured faster: README, Performance).

Captured layers are traced outputs, not live hooks: one engine serves one (layers, pool)
choice, which is what an extraction run needs.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from dvtorch import parallel
from dvtorch.hooks import capture, check_pool, resolve_layers
from dvtorch.inception import (
    DeepVariantInceptionV3,
    fuse_batchnorm,
    optimize_for_inference,
    scale_pixels,
)

_LOG = logging.getLogger(__name__)

# The gate (see GraphForward._check) measures every output's error against the eager forward
# in float32: per example, relative L2 for maps and embeddings, and each logit relative to its
# condition sum(|w| |x|) + |b| (an untrained model's 3 logits are dot products of 2048 terms
# that nearly cancel: 30-50 % relative between bf16 roundings alone). The program passes if
# its error is at most ERROR_RATIO times the eager forward's own in the model's dtype, plus
# ERROR_FLOOR. fp32: eager's own error is 0 and the program's measured <= 4e-6 (the same
# arithmetic in another order). bf16: the program's error to float32 measured 1.0-1.1x the
# eager bf16 path's (worst output: 0.24 vs 0.22 on a poorly conditioned small random model,
# 0.021-0.025 vs 0.020-0.024 on the seeded full-size one). A miscompiled program is off by O(1).
ERROR_RATIO = 1.5
ERROR_FLOOR = 1e-3
# and the softmax must equal softmax(logits) of the same call
SOFTMAX_TOLERANCE = 1e-5
CHECK_CALLS = 3  # the executor profiles, then fuses: call 3 of a shape runs the fused code
MAX_PROGRAMS = 4  # slice sizes with a program (full batches, the last one, a few short ones)


def available() -> bool:
    """Whether this torch can run oneDNN Graph (TorchScript with LLGA, oneDNN on the CPU)."""
    return torch.backends.mkldnn.is_available() \
        and callable(getattr(torch.jit, "enable_onednn_fusion", None)) \
        and callable(getattr(torch._C, "_jit_llga_enabled", None))


# The fusion flag is process-wide, and calls on worker threads overlap: it is on while any
# caller is inside _onednn_fusion(), and the setting from before the first is put back
# after the last.
_FUSION_LOCK = threading.Lock()
_FUSION_STATE = {"users": 0, "before": False}


@contextlib.contextmanager
def _onednn_fusion() -> Iterator[None]:
    """oneDNN Graph fusion on for the calls inside (any thread), the caller's setting
    restored after the last one (the executor reads the flag when it optimises a graph)."""
    with _FUSION_LOCK:
        if _FUSION_STATE["users"] == 0:
            _FUSION_STATE["before"] = bool(torch._C._jit_llga_enabled())
            torch.jit.enable_onednn_fusion(True)
        _FUSION_STATE["users"] += 1
    try:
        yield
    finally:
        with _FUSION_LOCK:
            _FUSION_STATE["users"] -= 1
            if _FUSION_STATE["users"] == 0:
                torch.jit.enable_onednn_fusion(_FUSION_STATE["before"])


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

    ``model`` is a CPU model from :func:`dvtorch.load` / ``optimize_for_inference``; its
    dtype, fp32 or bf16, is the program's (a bf16 model gets a float32 twin for the checked
    calls, freed once every program is trusted). ``pixels`` are uint8 NHWC batches, split
    across ``torch.get_num_threads()`` single-threaded calls like the eager forward's
    (:mod:`dvtorch.parallel`). ``fallback_reason`` is set once the engine has switched to
    the eager forward; ``checks`` lists what every checked call measured.
    """

    def __init__(self, model: DeepVariantInceptionV3, layers: Sequence[str],
                 pool: str | None = "max", *, check_calls: int = CHECK_CALLS):
        if not available():
            raise RuntimeError("oneDNN Graph is not available in this torch build "
                               "(needs TorchScript and oneDNN on the CPU)")
        if model.dense.weight.device.type != "cpu":
            raise ValueError("the oneDNN Graph engine runs on the CPU only")
        self.model = model.eval()
        self.layers = list(layers)
        check_pool(pool)
        resolve_layers(model, self.layers)  # an unknown name fails here, not at a batch
        if _hook_count(model):
            # A traced program runs the hooks present when it was traced, once, and never
            # again; later ones not at all. Hook experiments belong on the eager model.
            raise ValueError(f"the model has {_hook_count(model)} forward hook(s); a oneDNN "
                             "Graph program cannot run hooks (it is traced once): remove "
                             "them, or run the eager model for hook experiments")
        # always traced, for the gate: the embedding, the logits (and the softmax) from it
        self._taps = ["avg_pool", "logits"] + [n for n in self.layers
                                               if n not in ("avg_pool", "logits")]
        self.pool = pool
        self.dtype = model.dense.weight.dtype
        if self.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"the oneDNN Graph engine runs fp32 or bf16 models, not {self.dtype}")
        self.check_calls = check_calls
        #: batches :meth:`submit` runs at once, one per compute thread
        self.depth = max(1, torch.get_num_threads())
        self.fallback_reason: str | None = None
        # per checked call: the program's largest error to float32 over all outputs, and the
        # eager forward's in the model's dtype (0 for fp32)
        self.checks: list[tuple[float, float]] = []
        self._reference: DeepVariantInceptionV3 | None = None
        # one traced program per input size (a batch slice for __call__, a whole batch for
        # submit): each then only ever sees one input shape, so the executor has nothing
        # left to re-specialise once its checked calls are done
        self._programs: dict[int, torch.jit.ScriptModule] = {}
        self._checked: dict[int, int] = {}  # input size -> checked calls passed
        # the programs' output layout (the same for every program), set by the first trace:
        # column widths of softmax and each tap, and each tap's per-example shape
        self._widths: list[int] | None = None
        self._shapes: dict[str, torch.Size] = {}

    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self._check_call(pixels)
        if self.fallback_reason is not None or pixels.shape[0] == 0:
            return self._eager(pixels)
        ways = parallel.split_ways(pixels.shape[0])
        sizes = parallel.slice_sizes(pixels.shape[0], ways)
        if len(self._programs.keys() | set(sizes)) > MAX_PROGRAMS:
            return self._eager(pixels)  # one more odd batch size is not worth a program
        for size in sizes:
            if size not in self._programs:
                self._programs[size] = self._trace(pixels[:size])
        seen = min(self._checked.get(size, 0) for size in sizes)
        try:
            with _onednn_fusion():
                if ways > 1 and seen >= self.check_calls:
                    flat = parallel.run_split(self._run, pixels, ways)
                else:
                    # While a program is new the executor profiles, fuses and compiles its
                    # partitions; two threads doing that at once have failed ("partition
                    # compile failed", "Partition inputs are missing"), so the slices of the
                    # checked calls run one after the other, here.
                    flat = torch.cat([self._run(p) for p in torch.tensor_split(pixels, ways)])
        except RuntimeError as err:
            return self._fall_back(_raised(err), sizes, seen, pixels)
        if seen < self.check_calls:
            wrong = self._gate(flat, pixels, sizes, seen)
            if wrong is not None:
                return wrong
        return self._split(flat)

    def _check_call(self, pixels: torch.Tensor) -> None:
        _check_pixels(pixels, tuple(self.model.input_shape))
        if self.fallback_reason is None and _hook_count(self.model):
            self._fall_back("a forward hook was added to the model, which a traced program "
                            "would not run", sorted(self._programs), 0)

    def submit(self, pixels: torch.Tensor) -> PendingForward:
        """Start ``engine(pixels)`` as one whole-batch call on a worker thread and return at
        once; :meth:`PendingForward.result` gives what ``engine(pixels)`` would.

        Why: with ``depth`` batches in flight (one per compute thread, each on one thread)
        no core waits for the slower slice of a split batch, each program runs at the
        larger whole-batch size, and a caller that decodes its next batch meanwhile keeps
        both cores busy; ``dvprobe extract --engine graph`` runs this way (figures: README,
        Performance). A program's first ``check_calls`` calls still run here and now, one
        at a time, and pass the gate before any call of it runs on a worker; a program that
        raises on a worker switches the engine to eager when its result is asked for.
        """
        self._check_call(pixels)
        n = pixels.shape[0]
        if self.fallback_reason is not None or n == 0 or self.depth < 2:
            return PendingForward(self, pixels, value=self(pixels))
        if n not in self._programs:
            if len(self._programs) >= MAX_PROGRAMS:
                return PendingForward(self, pixels, value=self._eager(pixels))
            self._programs[n] = self._trace(pixels)
        seen = self._checked.get(n, 0)
        if seen < self.check_calls:
            try:
                with _onednn_fusion():
                    flat = self._run(pixels)
            except RuntimeError as err:
                return PendingForward(self, pixels, value=self._fall_back(
                    _raised(err), [n], seen, pixels))
            wrong = self._gate(flat, pixels, [n], seen)
            return PendingForward(self, pixels,
                                  value=wrong if wrong is not None else self._split(flat))
        return PendingForward(self, pixels,
                              pending=parallel.submit_whole(self._run_on_worker, pixels,
                                                            self.depth))

    def _run(self, pixels: torch.Tensor) -> torch.Tensor:
        """The program for this input size on the scaled pixels: the flat output."""
        return self._programs[pixels.shape[0]](scale_pixels(pixels, self.dtype))

    def _run_on_worker(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), _onednn_fusion():
            return self._run(pixels)

    def _gate(self, flat: torch.Tensor, pixels: torch.Tensor, sizes: list[int], seen: int
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """Check a call's output (see :meth:`_check`): None and one more passed call for
        its programs, or the eager result after switching to eager for good."""
        checked = self._check(flat, pixels)
        if checked is not None:
            self._fall_back(f"its output differed from the eager forward's: {checked[0]}",
                            sizes, seen)
            return checked[1]
        for size in set(sizes):
            self._checked[size] = self._checked.get(size, 0) + 1
        if all(c >= self.check_calls for c in self._checked.values()):
            self._reference = None  # every program so far is trusted
        return None

    def _fall_back(self, why: str, sizes: list[int], seen: int,
                   pixels: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """Switch to the eager forward for good, saying why; with ``pixels``, run it on them."""
        self.fallback_reason = (f"oneDNN Graph program: {why} (input sizes {sizes}, call "
                                f"{seen + 1}); using the eager forward from here on")
        _LOG.warning(self.fallback_reason)
        return None if pixels is None else self._eager(pixels)

    def _check(self, flat: torch.Tensor, pixels: torch.Tensor
               ) -> tuple[str, tuple[torch.Tensor, dict[str, torch.Tensor]]] | None:
        """None if the program's output for ``pixels`` passes the gate (see ERROR_RATIO),
        else (why, the eager forward's result)."""
        n = pixels.shape[0]
        eager_probs, eager = _eager_forward(self.model, self._taps, self.pool, pixels)
        reference = eager
        if self.dtype != torch.float32:
            if self._reference is None:
                self._reference = _float32_twin(self.model)
            reference = _eager_forward(self._reference, self._taps, self.pool, pixels)[1]
        ref = {k: reference[k].reshape(n, -1).float() for k in self._taps}
        probs, *parts = self._blocks(flat)
        got = dict(zip(self._taps, parts, strict=True))
        condition = _logit_condition(self.model, ref["avg_pool"])
        result = (eager_probs, {k: eager[k] for k in self.layers})
        worst = (0.0, 0.0)
        for k in self._taps:
            own = eager[k].reshape(n, -1).float()
            if k == "logits":
                errs = (float(((got[k] - ref[k]).abs() / condition).max()),
                        float(((own - ref[k]).abs() / condition).max()))
            else:
                errs = (_relative_error(got[k], ref[k]), _relative_error(own, ref[k]))
            if not errs[0] <= ERROR_RATIO * errs[1] + ERROR_FLOOR:
                self.checks.append(errs)
                return (f"{k} is {errs[0]:.2e} from float32 where the eager {_name(self.dtype)} "
                        f"forward is {errs[1]:.2e}"), result
            worst = max(worst, errs)
        self.checks.append(worst)
        soft = float((probs - torch.softmax(got["logits"], dim=1)).abs().max())
        if not soft <= SOFTMAX_TOLERANCE:
            return f"its softmax differs from softmax(its logits) by {soft:.2e}", result
        return None

    def _trace(self, example: torch.Tensor) -> torch.jit.ScriptModule:
        tapped = _Tapped(self.model, self._taps, self.pool).eval()
        x = scale_pixels(example, self.dtype)
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.trace's deprecation notice
            x = x.clone()  # a normal tensor: inference tensors cannot be traced into a graph
            program = torch.jit.freeze(torch.jit.trace(tapped, x, check_trace=False))
            if self._widths is None:
                # one example is enough for the outputs' widths and shapes
                probs, acts = _eager_forward(self.model, self._taps, self.pool, example[:1])
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


class PendingForward:
    """A batch started by :meth:`GraphForward.submit`; ``result()`` waits for it."""

    def __init__(self, engine: GraphForward, pixels: torch.Tensor, *,
                 pending: Callable[[], torch.Tensor] | None = None,
                 value: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None):
        self._engine, self._pixels, self._pending, self._value = engine, pixels, pending, value

    def result(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(probs, {layer: pooled})``; runs the eager forward here if the program raised."""
        if self._value is None:
            assert self._pending is not None
            engine, n = self._engine, self._pixels.shape[0]
            try:
                self._value = engine._split(self._pending())
            except RuntimeError as err:
                if engine.fallback_reason is None:
                    engine._fall_back(_raised(err), [n], engine._checked.get(n, 0))
                self._value = engine._eager(self._pixels)
            self._pending = None
        return self._value


def _check_pixels(pixels: torch.Tensor, shape: tuple[int, int, int]) -> None:
    """Refuse a batch the programs were not made for before it reaches one: a program
    that raises switches the engine to eager for good, which a caller's slip must not."""
    if pixels.dtype != torch.uint8 or pixels.dim() != 4 or tuple(pixels.shape[1:]) != shape:
        raise ValueError(f"expected uint8 NHWC pixels [N, {', '.join(map(str, shape))}], got "
                         f"{pixels.dtype} {list(pixels.shape)}")


def _hook_count(model: nn.Module) -> int:
    """Forward (pre-)hooks on ``model`` and its submodules, global ones included."""
    return len(parallel.global_forward_hooks()) \
        + sum(1 for _ in parallel.forward_hooks(model.modules()))


def _raised(err: BaseException) -> str:
    return f"it raised {type(err).__name__}: {str(err).strip().splitlines()[-1]}"


def _name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


def _logit_condition(model: DeepVariantInceptionV3, embedding: torch.Tensor) -> torch.Tensor:
    """``sum_j |w_ij| |x_j| + |b_i|`` per example and logit: the scale a rounding error of
    the dense layer's dot products is relative to."""
    dense = model.dense
    bias = dense.bias.float().abs() if dense.bias is not None else 0.0
    return (embedding.abs() @ dense.weight.float().abs().T + bias).clamp_min(1e-30)


def _float32_twin(model: DeepVariantInceptionV3) -> DeepVariantInceptionV3:
    """The same (BN-folded) weights in float32, optimised like ``model``: the reference a bf16
    program and the eager bf16 forward are both measured against."""
    twin = DeepVariantInceptionV3(model.input_shape, num_classes=model.dense.out_features)
    fuse_batchnorm(twin.eval())
    twin.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    return optimize_for_inference(twin)


def _eager_forward(model: nn.Module, layers: Sequence[str], pool: str | None,
                   pixels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    with torch.no_grad(), capture(model, layers, pool=pool) as acts:
        probs = model(pixels)
        return probs, {n: acts[n] for n in layers}
