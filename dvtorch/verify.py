"""Per-layer parity between the runtimes that can execute a DeepVariant model.

Backends (each maps NHWC float input to ``{layer: array}``; mixedN as NHWC maps):

* ``tensorflow`` – the rebuilt Keras model restored from the original checkpoint/SavedModel
  (the ground truth, when TF is installed and the source still exists);
* ``savedmodel-signature`` – for SavedModel sources, the SavedModel's own ``serving_default``
  graph (softmax only), an independent check that the rebuild matches what DeepVariant runs;
* ``onnxruntime`` – the bundle's ONNX, with mixed0..10 exposed as extra graph outputs;
* ``torch`` – the CPU engine (:mod:`dvtorch.engine`: BN folded, oneDNN-fused kernels, worker
  threads), i.e. the rows ``dvprobe extract`` computes, activations read by its captures;
  ``torch-unfused`` – the plain :class:`dvtorch.inception.DeepVariantInceptionV3` exactly as
  ``dvtorch.load`` returns it (the weights as stored), read through
  :func:`dvtorch.hooks.capture`: the model hook experiments run;
* ``onnx2torch`` – the same ONNX turned into torch by onnx2torch, an independent witness for
  the native port.

Every candidate is compared with the reference (TF if present, else onnxruntime) at the
softmax and at every mixedN pooled over H, W by max and by mean. Error metrics: max-abs
difference and relative error = max-abs / max |reference| (per layer and pooling); argmax
agreement at the softmax. fp32 tolerance: relative ≤ 1e-4 for every row.

Argmax-only checks hide real bugs (pitfalls: padding in the branch average pool), which is
why intermediate layers are compared numerically.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dvtorch.errors import BundleError, ParityError

TOLERANCE_REL = 1e-4
MIXED_LAYERS: tuple[str, ...] = tuple(f"mixed{i}" for i in range(11))
SOFTMAX = "classification"
POOLS: tuple[str, ...] = ("max", "mean")

Outputs = dict[str, np.ndarray]
Backend = Callable[[np.ndarray], Outputs]


@dataclass
class ParityRow:
    """One (candidate, layer, pooling) comparison against the reference."""

    candidate: str
    layer: str
    pool: str  # "max" | "mean" for mixedN, "-" for the softmax
    max_abs: float
    ref_max_abs: float
    rel: float
    argmax_agree: float | None = None  # fraction of examples, softmax rows only
    passed: bool = True


@dataclass
class ParityReport:
    """Parity of several runtimes against a reference; printable as a table or JSON."""

    reference: str
    candidates: list[str]
    rows: list[ParityRow]
    tolerance_rel: float
    batch: int
    inputs: str
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r.passed for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        d["worst"] = {c: self.worst(c) for c in self.candidates}
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ParityReport:
        """Inverse of :meth:`to_dict` (e.g. the report stored in ``bundle.json``)."""
        fields = {
            k: data[k] for k in ("reference", "candidates", "tolerance_rel", "batch", "inputs")
        }
        rows = [ParityRow(**row) for row in data["rows"]]
        return cls(rows=rows, skipped=dict(data.get("skipped") or {}), **fields)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def worst(self, candidate: str) -> dict[str, Any]:
        rows = [r for r in self.rows if r.candidate == candidate]
        w = max(rows, key=lambda r: r.rel)
        return {"layer": w.layer, "pool": w.pool, "max_abs": w.max_abs, "rel": w.rel}

    def summary_line(self) -> str:
        parts = [
            f"{c} vs {self.reference}: worst rel {self.worst(c)['rel']:.2e} "
            f"({self.worst(c)['layer']}/{self.worst(c)['pool']})"
            for c in self.candidates
        ]
        return "; ".join(parts)

    def failure_summary(self) -> str:
        bad = [r for r in self.rows if not r.passed]
        if not bad:
            return "all layers within tolerance"
        shown = ", ".join(
            f"{r.candidate} {r.layer}/{r.pool} rel {r.rel:.2e}"
            + (f" argmax {r.argmax_agree:.0%}" if r.argmax_agree is not None else "")
            for r in bad[:4]
        )
        return (
            f"{len(bad)} of {len(self.rows)} comparisons exceed relative {self.tolerance_rel:g} "
            f"vs {self.reference} ({shown}{', …' if len(bad) > 4 else ''})"
        )

    def table(self) -> str:
        """Rows = (layer, pool); per candidate: max-abs and relative error vs the reference."""
        head = (
            ["layer", "pool"]
            + [f"{c} max-abs" for c in self.candidates]
            + [f"{c} rel" for c in self.candidates]
        )
        index = {(r.candidate, r.layer, r.pool): r for r in self.rows}
        order = {name: i for i, name in enumerate([*MIXED_LAYERS, SOFTMAX])}
        keys = sorted(
            {(r.layer, r.pool) for r in self.rows},
            key=lambda k: (order.get(k[0], len(order)), k[1]),
        )
        lines = [head]
        for layer, pool in keys:
            cells = [layer, pool]
            rows = [index.get((c, layer, pool)) for c in self.candidates]
            cells += [f"{r.max_abs:.3e}" if r else "-" for r in rows]
            cells += [(f"{r.rel:.3e}" + ("" if r.passed else " FAIL")) if r else "-" for r in rows]
            lines.append(cells)
        widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
        text = [
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in lines
        ]
        argmax = ", ".join(
            f"{r.candidate} {r.argmax_agree:.0%}" for r in self.rows if r.argmax_agree is not None
        )
        text.append(f"reference: {self.reference}; inputs: {self.inputs}; batch {self.batch}")
        text.append(f"softmax argmax agreement: {argmax}")
        for name, why in self.skipped.items():
            text.append(f"skipped {name}: {why}")
        text.append(
            f"{'PASS' if self.passed else 'FAIL'}: tolerance relative {self.tolerance_rel:g} per layer"
        )
        return "\n".join(text)


# --------------------------------------------------------------------------- comparison


def compare(
    outputs: dict[str, Outputs],
    reference: str,
    *,
    batch: int,
    inputs: str,
    tolerance_rel: float = TOLERANCE_REL,
    skipped: dict[str, str] | None = None,
) -> ParityReport:
    """Compare every backend's outputs with ``outputs[reference]`` (see module docstring)."""
    ref = outputs[reference]
    rows: list[ParityRow] = []
    candidates = [name for name in outputs if name != reference]
    for cand in candidates:
        got = outputs[cand]
        for layer in [*MIXED_LAYERS, SOFTMAX]:
            if layer not in got:
                continue
            if layer not in ref:
                continue
            a = np.asarray(ref[layer], dtype=np.float64)
            b = np.asarray(got[layer], dtype=np.float64)
            if a.shape != b.shape:
                raise ParityError(
                    f"{cand} {layer} has shape {list(b.shape)}, {reference} has {list(a.shape)}"
                )
            if layer == SOFTMAX:
                pooled = {"-": (a, b)}
            else:
                pooled = {
                    "max": (a.max(axis=(1, 2)), b.max(axis=(1, 2))),
                    "mean": (a.mean(axis=(1, 2)), b.mean(axis=(1, 2))),
                }
            for pool, (ra, rb) in pooled.items():
                max_abs = float(np.abs(ra - rb).max())
                scale = float(np.abs(ra).max())
                rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
                agree = (
                    float(np.mean(ra.argmax(axis=1) == rb.argmax(axis=1)))
                    if layer == SOFTMAX
                    else None
                )
                ok = bool(np.isfinite(rel) and rel <= tolerance_rel and (agree in (None, 1.0)))
                rows.append(ParityRow(cand, layer, pool, max_abs, scale, rel, agree, ok))
    return ParityReport(reference, candidates, rows, tolerance_rel, batch, inputs, skipped or {})


# --------------------------------------------------------------------------- backends


def ort_backend(onnx_bytes: bytes) -> Backend:
    """onnxruntime on the ONNX graph with mixed0..10 added as outputs (NCHW → NHWC)."""
    import onnx
    import onnxruntime as ort

    from dvtorch.onnx_import import onnx_layer_outputs

    model, names = _expose_layers(onnx.load_from_string(onnx_bytes), onnx_layer_outputs)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    session = ort.InferenceSession(
        model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    input_name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> Outputs:
        values = session.run(list(names.values()), {input_name: x.astype(np.float32)})
        return _nchw_to_nhwc(dict(zip(names, values, strict=True)))

    return run


def onnx2torch_backend(onnx_bytes: bytes) -> Backend:
    """onnx2torch's FX module of the same augmented graph: an independent torch witness."""
    import onnx
    import torch
    from onnx2torch import convert as o2t

    from dvtorch.onnx_import import onnx_layer_outputs

    model, names = _expose_layers(onnx.load_from_string(onnx_bytes), onnx_layer_outputs)
    module = o2t(model).eval()

    def run(x: np.ndarray) -> Outputs:
        with torch.inference_mode():
            values = module(torch.from_numpy(x.astype(np.float32)))
        values = values if isinstance(values, (list, tuple)) else [values]
        return _nchw_to_nhwc({n: v.numpy() for n, v in zip(names, values, strict=True)})

    return run


def engine_backend(model: Any) -> Backend:
    """The CPU engine built from ``model``; mixedN captured as NHWC maps by the engine."""
    import torch

    from dvtorch.engine import make_engine

    engine = make_engine(model, list(MIXED_LAYERS), pool=None, device="cpu", dtype="fp32")

    def run(x: np.ndarray) -> Outputs:
        probs, acts = engine(torch.from_numpy(x.astype(np.float32)))
        out = {name: acts[name].float().cpu().numpy() for name in MIXED_LAYERS}
        out[SOFTMAX] = probs.float().cpu().numpy()
        return out

    return run


def torch_backend(model: Any) -> Backend:
    """The plain model; mixedN captured as NHWC maps through the public hook API."""
    import torch

    from dvtorch.hooks import capture

    model = model.eval()

    def run(x: np.ndarray) -> Outputs:
        with torch.inference_mode(), capture(model, list(MIXED_LAYERS), pool=None) as acts:
            probs = model(torch.from_numpy(x.astype(np.float32)))
            out = {name: acts[name].float().cpu().numpy() for name in MIXED_LAYERS}
        out[SOFTMAX] = probs.float().cpu().numpy()
        return out

    return run


def tf_backend(keras_model: Any) -> Backend:
    """The rebuilt Keras model (inference mode: Dropout off, BN uses moving statistics)."""
    from dvtorch.keras_dv import layer_model

    lm = layer_model(keras_model)

    def run(x: np.ndarray) -> Outputs:
        out = lm(x.astype(np.float32), training=False)
        return {k: v.numpy() for k, v in out.items()}

    return run


def savedmodel_signature_backend(directory: str | Path) -> Backend:
    """The SavedModel's own serving graph (softmax only)."""
    from dvtorch.keras_dv import savedmodel_predict

    def run(x: np.ndarray) -> Outputs:
        return {SOFTMAX: savedmodel_predict(directory, x)}

    return run


def _expose_layers(
    model: Any, layer_outputs: Callable[[Any], dict[str, str]]
) -> tuple[Any, dict[str, str]]:
    """Add mixedN tensors as graph outputs; returns (model, {layer: tensor}) in output order."""
    import onnx

    mapping = layer_outputs(model)
    names = {layer: mapping[layer] for layer in MIXED_LAYERS}
    existing = [o.name for o in model.graph.output]
    for tensor in names.values():
        if tensor not in existing:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(tensor))
    # Keep output order = [original outputs..., mixed...]; map the softmax to its output.
    order: dict[str, str] = {}
    for o in model.graph.output:
        layer = next((k for k, v in names.items() if v == o.name), None)
        if layer is None and o.name == mapping[SOFTMAX]:
            layer = SOFTMAX
        order[layer or o.name] = o.name
    return model, order


def _nchw_to_nhwc(values: Outputs) -> Outputs:
    return {k: (np.transpose(v, (0, 2, 3, 1)) if v.ndim == 4 else v) for k, v in values.items()}


# --------------------------------------------------------------------------- inputs


def random_pileups(shape: Sequence[int], batch: int, seed: int) -> np.ndarray:
    """Seeded uint8 pileups [N, H, W, C] covering the full 0..255 range."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(batch, *shape), dtype=np.uint8)


def preprocess_np(images: np.ndarray) -> np.ndarray:
    """DeepVariant's (x - 128) / 128 via dvtorch.preprocess, as float32 NHWC numpy."""
    import torch

    from dvtorch import preprocess

    out = preprocess(torch.from_numpy(images))
    return out.numpy() if isinstance(out, torch.Tensor) else np.asarray(out, dtype=np.float32)


def _check_images(images: np.ndarray, shape: tuple[int, ...]) -> None:
    """Refuse pileups that are not uint8 ``[N, *shape]`` with N >= 1 (ValueError)."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise ValueError(f"images must be a uint8 numpy array of pileups, not "
                         f"{getattr(images, 'dtype', type(images).__name__)}")
    if images.ndim != 4 or tuple(images.shape[1:]) != shape or not len(images):
        raise ValueError(f"images have shape {tuple(images.shape)}; the bundle takes "
                         f"[N >= 1, {', '.join(map(str, shape))}] (N, H, W, C)")


# --------------------------------------------------------------------------- entry points


def tf_available() -> bool:
    """True when the TF side of the conversion (tensorflow + tf_keras) is importable."""
    return all(importlib.util.find_spec(m) is not None for m in ("tensorflow", "tf_keras"))


def _witness(onnx_bytes: bytes, backends: dict[str, Backend], skipped: dict[str, str]) -> None:
    if importlib.util.find_spec("onnx2torch") is None:
        skipped["onnx2torch"] = "not installed (pip install 'dvprobe[convert]')"
        return
    try:
        backends["onnx2torch"] = onnx2torch_backend(onnx_bytes)
    except Exception as exc:  # converter limitation, not a parity failure
        skipped["onnx2torch"] = f"conversion failed: {type(exc).__name__}: {exc}"[:200]


def run_backends(
    backends: dict[str, Backend],
    x: np.ndarray,
    reference: str,
    *,
    inputs: str,
    skipped: dict[str, str],
    progress: Callable[[str], None] | None = None,
) -> ParityReport:
    """Run each backend on ``x`` and compare with ``reference``."""
    outputs: dict[str, Outputs] = {}
    for name, fn in backends.items():
        if progress:
            progress(f"running {name}")
        outputs[name] = fn(x)
    return compare(outputs, reference, batch=len(x), inputs=inputs, skipped=skipped)


def parity_for_conversion(
    *,
    state_dict: dict[str, Any],
    onnx_bytes: bytes,
    input_shape: tuple[int, int, int],
    keras_model: Any | None,
    savedmodel: Path | None,
    batch: int,
    seed: int,
) -> ParityReport:
    """Parity during ``convert`` (before anything is written), from in-memory artefacts."""
    from dvtorch.inception import DeepVariantInceptionV3

    # Two native variants: "torch", the CPU engine that extraction runs; "torch-unfused",
    # the plain model exactly as weights.safetensors stores it.
    unfused = DeepVariantInceptionV3(input_shape)
    unfused.load_state_dict(state_dict, strict=True)
    backends: dict[str, Backend] = {}
    skipped: dict[str, str] = {}
    if keras_model is not None:
        backends["tensorflow"] = tf_backend(keras_model)
        if savedmodel is not None:
            backends["savedmodel-signature"] = savedmodel_signature_backend(savedmodel)
    backends["onnxruntime"] = ort_backend(onnx_bytes)
    backends["torch"] = engine_backend(unfused.eval())
    backends["torch-unfused"] = torch_backend(unfused)
    _witness(onnx_bytes, backends, skipped)
    reference = "tensorflow" if keras_model is not None else "onnxruntime"
    x = preprocess_np(random_pileups(input_shape, batch, seed))
    return run_backends(
        backends, x, reference, inputs=f"random uint8 pileups (seed {seed})", skipped=skipped
    )


def _check_onnx(path: Path, data: bytes, meta: dict, shape: tuple[int, ...]) -> None:
    """The bundle's ONNX is the one converted, and takes the input bundle.json says.

    Why before any parity: a modified model.onnx or an edited input_shape otherwise shows up
    as a parity failure of the PyTorch port, or an onnxruntime traceback.
    """
    from dvtorch.bundle import check_recorded_sha256
    from dvtorch.files import sha256_bytes
    from dvtorch.onnx_import import load_onnx, onnx_input_shape

    recorded = (meta.get("files") or {}).get(path.name)
    if recorded:
        check_recorded_sha256(path, recorded, sha256_bytes(data))
    graph = onnx_input_shape(load_onnx(path, data))
    if any(g is not None and g != s for g, s in zip(graph, shape, strict=True)):
        raise BundleError(
            f"{path.parent / 'bundle.json'}: input_shape {list(shape)} but {path.name} takes "
            f"{['?' if g is None else g for g in graph]} (H, W, C); bundle.json was edited"
        )


def _add_tf_backends(src_meta: dict[str, Any], source: str | Path | None,
                     shape: tuple[int, ...], skip_tf: bool, backends: dict[str, Backend],
                     skipped: dict[str, str], progress: Callable[[str], None] | None) -> None:
    """Add the TensorFlow backends of a TF-converted bundle (restored from ``source``, else
    from the path bundle.json records), or say in ``skipped`` why there are none."""
    kind = src_meta.get("kind")
    src_path = (
        Path(source)
        if source is not None
        else (Path(src_meta["path"]) if src_meta.get("path") else None)
    )
    if kind in ("checkpoint", "savedmodel") and src_path is not None:
        exists = Path(f"{src_path}.index").is_file() if kind == "checkpoint" else src_path.is_dir()
        if source is not None and not exists:
            what = f"{src_path}.index" if kind == "checkpoint" else "a SavedModel directory"
            raise BundleError(
                f"source {src_path}: no {kind} there (looked for {what}); give the moved "
                "source's path, or leave TensorFlow out on purpose (--no-tf, skip_tf=True)"
            )
        if skip_tf:
            skipped["tensorflow"] = "skipped on request"
        elif not tf_available():
            skipped["tensorflow"] = "not installed (pip install 'dvprobe[convert]')"
        elif not exists:
            skipped["tensorflow"] = f"source {src_path} no longer exists"
        else:
            from dvtorch import keras_dv

            if progress:
                progress(f"restoring {kind} {src_path} (TensorFlow)")
            keras_dv.import_tf()
            loader = keras_dv.load_checkpoint if kind == "checkpoint" else keras_dv.load_savedmodel
            keras_model, _ = loader(src_path, shape)  # type: ignore[arg-type]
            backends["tensorflow"] = tf_backend(keras_model)
            if kind == "savedmodel":
                backends["savedmodel-signature"] = savedmodel_signature_backend(src_path)
    elif kind in ("checkpoint", "savedmodel"):
        skipped["tensorflow"] = "skipped on request" if skip_tf else "bundle records no source path"


def verify(
    bundle: str | Path,
    *,
    images: np.ndarray | None = None,
    inputs: str | None = None,
    batch: int = 8,
    seed: int = 0,
    source: str | Path | None = None,
    skip_tf: bool = False,
    check: bool = True,
    progress: Callable[[str], None] | None = None,
) -> ParityReport:
    """Re-check a BUNDLE: TF source (if available) vs onnxruntime vs native vs onnx2torch.

    Compared on ``images`` (uint8 pileups ``[N, H, W, C]`` of the bundle's shape, e.g. from
    :func:`probing.bundle_inputs.read_pileups`; ``inputs`` says what they are in the
    report), else on ``batch`` random pileups drawn with ``seed``. ``source`` overrides the
    source path recorded in ``bundle.json`` (e.g. after moving the checkpoint); one given
    explicitly must exist (a typo would otherwise quietly drop the TensorFlow check and
    still PASS), while a *recorded* source that has gone is reported as skipped.
    ``skip_tf`` leaves TensorFlow out on purpose (onnxruntime becomes the reference). With
    ``check`` (default) a failing report raises :class:`ParityError`; the CLI passes
    ``check=False`` to print the table first.
    """
    import dvtorch
    from dvtorch.bundle import read_meta, resolve_bundle

    bundle = resolve_bundle(bundle)  # a BUNDLE path, or a release name from the cache
    if images is not None:  # an input mistake: said before any model is loaded or restored
        _check_images(images, tuple(int(v) for v in read_meta(bundle)["input_shape"]))
    model = dvtorch.load(bundle, device="cpu")
    meta = dict(getattr(model, "bundle_meta", {}) or {})
    shape = tuple(int(v) for v in meta.get("input_shape") or model.input_shape)
    onnx_path = bundle / "model.onnx"
    skipped: dict[str, str] = {}
    backends: dict[str, Backend] = {}

    onnx_bytes = b""
    if onnx_path.is_file():  # checked before TF's restore, which takes a while
        onnx_bytes = onnx_path.read_bytes()
        _check_onnx(onnx_path, onnx_bytes, meta, shape)
    elif (meta.get("files") or {}).get(onnx_path.name):
        raise BundleError(f"{onnx_path}: missing, though bundle.json records it (the bundle is "
                          "incomplete); copy it back or convert again")

    _add_tf_backends(meta.get("source") or {}, source, shape, skip_tf, backends, skipped,
                     progress)

    if onnx_bytes:
        backends["onnxruntime"] = ort_backend(onnx_bytes)
    else:
        skipped["onnxruntime"] = f"{onnx_path} absent (reference bundle)"
    backends["torch"] = engine_backend(model)
    backends["torch-unfused"] = torch_backend(model)
    if onnx_bytes:
        _witness(onnx_bytes, backends, skipped)

    reference = next((r for r in ("tensorflow", "onnxruntime") if r in backends), None)
    if reference is None:
        raise BundleError(
            f"{bundle}: nothing to verify against (no model.onnx and no TF source); "
            "reference bundles are verified by their seed, not by parity"
        )
    if images is not None:
        desc = inputs or f"{len(images)} given pileups"
    else:
        images = random_pileups(shape, batch, seed)
        desc = inputs or f"random uint8 pileups (seed {seed})"
    report = run_backends(
        backends, preprocess_np(images), reference, inputs=desc, skipped=skipped, progress=progress
    )
    if check and not report.passed:
        raise ParityError(f"{bundle}: {report.failure_summary()}")
    return report
