"""BUNDLE: a converted (or reference) model on disk, and loading it as a native module.

Layout (see docs/architecture.md)::

    BUNDLE/
      bundle.json            metadata; "files" records the sha256 of every file below
      weights.safetensors    native state dict, BN unfused (maps 1:1 to Keras variables)
      model.onnx             optional: the ONNX graph the weights were imported from

A bundle is written into a temporary sibling directory and renamed into place, so a crash
or an exception leaves either nothing or a complete bundle; what a writer killed outright
leaves behind is swept by the next save into the same directory. :func:`load` re-hashes the
weights before using them: a truncated or edited file is refused with a clear message
instead of producing subtly wrong activations.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dvtorch.errors import BundleError
from dvtorch.files import BUNDLE_META_FILE as META_FILE
from dvtorch.files import (
    give_default_mode,
    set_aside_copies,
    sha256_bytes,
    sha256_file,
    swap_in_dir,
    sweep_dead_writers,
    writer_dir,
)
from dvtorch.inception import (
    ConvBN,
    DeepVariantInceptionV3,
    ScaleFreeBatchNorm,
    scale_pixels,
)
from weights.registry import (
    bundle_commands,
    default_bundle,
    looks_like_release,
    release_entries,
)

FORMAT = "dvprobe-bundle"
FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
ONNX_FILE = "model.onnx"

#: DeepVariant WGS channels (pileup image channel enum values), the default 7-channel input.
WGS_CHANNELS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 19)


def check_replaceable(out: str | os.PathLike, keep: Iterable[str | os.PathLike] = ()) -> None:
    """Refuse to replace ``out`` unless it is a dvprobe BUNDLE that holds none of ``keep``.

    Why: replacing renames the old directory away and deletes it. Pointed by mistake at a
    home directory, a weights download or the very checkpoint being converted, that is data
    loss, so only a directory whose ``bundle.json`` dvprobe wrote may go.
    """
    out = Path(out)
    if not out.exists():
        return
    root = out.resolve()
    for path in keep:
        p = Path(path).resolve()
        if p == root or root in p.parents:
            raise BundleError(f"{out}: holds the source {path}; writing the bundle there would "
                              "delete it; choose another --out")
    if not out.is_dir():
        raise BundleError(f"{out}: is a file, not a BUNDLE; only a BUNDLE is ever replaced: "
                          "remove it yourself or choose another --out")
    try:
        meta = json.loads((out / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BundleError(f"{out}: not a dvprobe BUNDLE (no {META_FILE} of ours), so it is not "
                          "replaced; choose another --out or remove it yourself")


def save_bundle(out_dir: str | os.PathLike, state_dict: Mapping[str, torch.Tensor],
                meta: Mapping[str, Any], onnx_bytes: bytes | None = None,
                overwrite: bool = False) -> Path:
    """Write a BUNDLE atomically and return its path.

    ``meta`` must hold ``input_shape`` [H, W, C] and ``channels``; everything else
    (source, deepvariant_version, opset, converters, parity, untrained) is recorded as given.
    ``format``, ``format_version``, ``files`` (sha256 per file) and ``created`` are set here.
    The state dict is validated against the native model first, so a bundle that could not
    be loaded is never written.
    """
    out = Path(out_dir)
    for key in ("input_shape", "channels"):
        if key not in meta:
            raise BundleError(f"{out}: bundle metadata lacks {key!r}")
    input_shape = tuple(int(v) for v in meta["input_shape"])
    if len(input_shape) != 3 or len(meta["channels"]) != input_shape[2]:
        raise BundleError(f"{out}: input_shape {list(input_shape)} and channels "
                          f"{list(meta['channels'])} disagree (need [H, W, C] with C channels)")
    _check_state_dict(state_dict, input_shape, out)
    if out.exists() and not overwrite:
        raise BundleError(f"{out}: already exists (pass overwrite=True to replace it)")
    check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_dead_writers(out.parent)  # what a killed save left behind
    tmp = writer_dir(out.parent, out.name)
    try:
        give_default_mode(tmp, directory=True)
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous()
                   for k, v in state_dict.items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        files = {WEIGHTS_FILE: sha256_file(tmp / WEIGHTS_FILE)}
        if onnx_bytes is not None:
            (tmp / ONNX_FILE).write_bytes(onnx_bytes)
            files[ONNX_FILE] = sha256_bytes(onnx_bytes)
        full = dict(meta)
        full.update({
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "input_shape": list(input_shape),
            "channels": [int(c) for c in meta["channels"]],
            "files": files,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        })
        full.setdefault("untrained", False)
        (tmp / META_FILE).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
        for f in tmp.iterdir():
            give_default_mode(f)  # safetensors writes its file 0600
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if out.exists():  # overwrite=True
            check_replaceable(out)  # it may have appeared meanwhile
        swap_in_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_state_dict(sd: Mapping[str, torch.Tensor], input_shape: tuple[int, int, int],
                      where: Path) -> None:
    with torch.device("meta"):
        ref = DeepVariantInceptionV3(input_shape).state_dict()
    missing = sorted(set(ref) - set(sd))
    extra = sorted(set(sd) - set(ref))
    if missing or extra:
        raise BundleError(f"{where}: state dict does not match DeepVariantInceptionV3"
                          f"{input_shape}: missing {missing[:4]}, unexpected {extra[:4]}")
    for k, v in ref.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise BundleError(f"{where}: {k} has shape {tuple(sd[k].shape)}, expected "
                              f"{tuple(v.shape)}")


def read_meta(bundle: str | os.PathLike) -> dict:
    """``bundle.json`` of a BUNDLE, checked for format (no weights are read)."""
    path = Path(bundle)
    meta_path = path / META_FILE
    if not path.is_dir():
        copies = set_aside_copies(path) if not path.exists() else []
        raise BundleError(f"{path}: not a bundle directory (does not exist or is a file)"
                          + (f"; a save interrupted while replacing it left the previous "
                             f"bundle at {copies[0]} (mv {copies[0]} {path})" if copies else ""))
    if not meta_path.is_file():
        raise BundleError(f"{path}: not a dvprobe bundle (no {META_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{meta_path}: not valid JSON ({e})") from e
    if meta.get("format") != FORMAT:
        raise BundleError(f"{meta_path}: format is {meta.get('format')!r}, not {FORMAT!r}")
    for key in ("input_shape", "channels", "files"):
        if key not in meta:
            raise BundleError(f"{meta_path}: missing {key!r}")
    if WEIGHTS_FILE not in meta["files"]:
        raise BundleError(f"{meta_path}: 'files' does not record {WEIGHTS_FILE}")
    return meta


def check_recorded_sha256(path: Path, expected: str, actual: str) -> None:
    """Refuse a bundle file whose sha256 is not the one ``bundle.json`` recorded for it."""
    if actual != expected:
        raise BundleError(f"{path}: sha256 {actual[:12]}... does not match bundle.json "
                          f"({expected[:12]}...); the file is corrupt or was modified")


def resolve_bundle(bundle: str | os.PathLike) -> Path:
    """The BUNDLE directory ``bundle`` names: a path as given, or a release name
    (``deepvariant-1.10.0-wgs``, like timm's model names) looked up in the cache.

    A path that exists always wins, so a local directory that happens to be called like a
    release still loads. A release name resolves to ``<cache>/bundles/<release>`` (see
    :func:`weights.registry.cache_home`); when that is not there yet the
    :class:`BundleError` gives the commands that make it, one per line. A name spelled like
    a release but not in the registry gets did-you-mean suggestions
    (:class:`weights.UnknownModelError`).
    """
    path = Path(bundle)
    if path.exists() or not looks_like_release(str(bundle)):
        return path
    entry = release_entries(str(bundle))[0]
    cached = default_bundle(entry)
    if cached.is_dir():
        return cached
    fetch, convert = bundle_commands(entry)
    raise BundleError(
        f"{bundle}: not converted yet (no BUNDLE at {cached}); make it with\n"
        f"  {fetch} --convert\n"
        f"or step by step (convert where the `convert` extra is installed):\n"
        f"  {fetch}\n  {convert}")


#: ``dtype`` spellings :func:`load` accepts besides torch dtypes (the CLI's ``--dtype``).
DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
               "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def load(bundle: str | os.PathLike, device: str | torch.device = "cpu",
         dtype: torch.dtype | str | None = None) -> DeepVariantInceptionV3:
    """Load a BUNDLE as a plain model in eval mode, with ``.bundle_meta`` attached.

    ``bundle`` is a directory or a release name such as ``"deepvariant-1.10.0-wgs"``
    (:func:`resolve_bundle`: converted once with ``dvprobe weights fetch NAME --convert``).

    The weights are DeepVariant's Keras variables as they are (BatchNorm not folded), so a
    weight edit, hook or gradient means what it would in the Keras model. Parameters do not
    require grad (a probed model is not trained); gradients with respect to the input
    flow as usual, and ``model.requires_grad_(True)`` turns weight gradients on. For bulk
    inference wrap it in an engine (:func:`dvtorch.engine.make_engine`).

    * ``dtype``: ``None`` / ``torch.float32``, ``torch.bfloat16`` or ``torch.float16``
      (or ``"fp32"``, ``"bf16"``, ``"fp16"``). Inputs stay float32 or uint8: the model
      casts on entry; the softmax is computed in float32.

    The weights file's sha256 must match ``bundle.json``; any mismatch raises
    :class:`BundleError`.
    """
    if isinstance(dtype, str):
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype {dtype!r}: use one of {', '.join(DTYPE_NAMES)} or a "
                             "torch dtype")
        dtype = DTYPE_NAMES[dtype]
    dev = torch.device(device)  # before hashing the weights: a bad device fails at once
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BundleError(f"device {device!r}: torch sees no CUDA GPU here (torch "
                          f"{torch.__version__}); use device='cpu'")
    path = resolve_bundle(bundle)
    meta = read_meta(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise BundleError(f"{weights}: missing (the bundle is incomplete)")
    check_recorded_sha256(weights, meta["files"][WEIGHTS_FILE], sha256_file(weights))
    try:
        sd = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise BundleError(f"{weights}: cannot be read as safetensors ({e})") from e
    input_shape = tuple(int(v) for v in meta["input_shape"])
    num_classes = int(sd["dense.bias"].shape[0]) if "dense.bias" in sd else 3
    _check_state_dict(sd, input_shape, weights)
    with torch.device("meta"):  # no random init of weights that are replaced right away
        model = DeepVariantInceptionV3(input_shape, num_classes)
    model.load_state_dict(sd, strict=True, assign=True)
    model.to(device=device, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    model.bundle_meta = meta
    return model


def preprocess(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """DeepVariant's input scaling ``(x - 128) / 128`` as float32, NHWC kept.

    call_variants does this *outside* the SavedModel; feeding raw 0..255 pixels gives
    confident, wrong genotypes. Accepts uint8 (numpy or torch, any device) ``[N, H, W, C]``
    or a single ``[H, W, C]`` image (a batch axis is added).
    """
    t = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) \
        else images
    if t.dtype != torch.uint8:
        raise ValueError(f"preprocess expects uint8 pixel values, got {t.dtype} "
                         "(already preprocessed?)")
    if t.dim() == 3:
        t = t.unsqueeze(0)
    if t.dim() != 4:
        raise ValueError(f"preprocess expects [N, H, W, C] or [H, W, C], got {list(t.shape)}")
    return scale_pixels(t)


@torch.no_grad()
def random_state_dict(seed: int = 0, input_shape: tuple[int, int, int] = (100, 221, 7),
                      num_classes: int = 3) -> dict[str, torch.Tensor]:
    """A seeded, untrained but *well-conditioned* DeepVariant state dict (no TF needed).

    Every tensor is randomised, BN statistics included. Purely random BN statistics make
    activations drift geometrically through 94 layers until the output no longer depends
    on the input (useless for demos and tests). So running mean/var are calibrated: each
    block's statistics are those of its conv output on a seeded random batch, jittered
    (mean +- 0.1 sd, var x [0.8, 1.25]) so they are not an exact whitening. Computed in
    float64 for reproducibility across thread counts.
    """
    gen = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng(devices=[]):  # default init must not disturb the global RNG
        model = DeepVariantInceptionV3(input_shape, num_classes).double().eval()
    for block in _blocks_in_order(model):
        w = block.conv.weight
        fan_in = w.shape[1] * w.shape[2] * w.shape[3]
        w.copy_(torch.randn(w.shape, generator=gen, dtype=w.dtype) * (2.0 / fan_in) ** 0.5)
        block.bn.beta.copy_(_BETA_MEAN + torch.randn(block.bn.beta.shape, generator=gen,
                                                     dtype=w.dtype) * 0.1)
    model.dense.weight.copy_(torch.randn(model.dense.weight.shape, generator=gen,
                                         dtype=torch.float64) * (1.0 / 2048) ** 0.5 * 4)
    model.dense.bias.copy_(torch.randn(num_classes, generator=gen, dtype=torch.float64) * 0.1)
    x = (torch.randint(0, 256, (4, *input_shape), generator=gen).double() - 128) / 128
    _calibrate_bn(model, x, gen)
    return {k: v.float().contiguous() for k, v in model.state_dict().items()}


#: Mean of the random BN betas, in units of the calibrated standard deviation. Centred
#: betas (0) make a random BN+ReLU stack chaotic: float32 rounding grows ~500x by mixed5
#: and bf16 mixed5 embeddings only reach cosine 0.997 vs float32. Measured with seed 0:
#: 0.25 -> cosine 0.9988, 0.5 -> 0.9994, 1.0 -> 0.9998 (float32 error vs float64 at mixed5
#: 2.4e-6), softmax outputs still clearly input-dependent. A shift keeps most units in
#: ReLU's linear range, closer to how a trained network behaves.
_BETA_MEAN = 1.0


def _blocks_in_order(model: DeepVariantInceptionV3) -> list[ConvBN]:
    return [b for _, b in model.conv_blocks()]


def _calibrate_bn(model: DeepVariantInceptionV3, x: torch.Tensor, gen: torch.Generator) -> None:
    """Set each BN's running stats from its conv's output, in forward order (one pass).

    Forward pre-hooks on each BN see the conv output before normalisation; since hooks
    fire in execution order, every later layer is calibrated on already-calibrated inputs.
    """
    handles = []

    def hook(bn: ScaleFreeBatchNorm, args):
        y = args[0]
        mean = y.mean(dim=(0, 2, 3))
        var = y.var(dim=(0, 2, 3), unbiased=False).clamp_min(1e-6)
        jit_m = torch.randn(mean.shape, generator=gen, dtype=y.dtype) * 0.1
        jit_v = torch.empty(var.shape, dtype=y.dtype).uniform_(0.8, 1.25, generator=gen)
        bn.running_mean.copy_(mean + jit_m * var.sqrt())
        bn.running_var.copy_(var * jit_v)

    for block in _blocks_in_order(model):
        handles.append(block.bn.register_forward_pre_hook(hook))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()


def reference_bundle(out: str | os.PathLike, seed: int = 0,
                     input_shape: tuple[int, int, int] = (100, 221, 7),
                     channels: Sequence[int] = WGS_CHANNELS, overwrite: bool = False) -> Path:
    """Write an UNTRAINED, seeded reference BUNDLE (``"untrained": true``); no TF needed.

    For tests, demos and benchmarks when no released DeepVariant model is at hand. Its
    activations depend on the input (BN statistics are calibrated, see
    :func:`random_state_dict`), but they encode no genomics.
    """
    if len(channels) != input_shape[2]:
        raise BundleError(f"{out}: {len(channels)} channels for an input with "
                          f"{input_shape[2]} channels")
    sd = random_state_dict(seed, tuple(input_shape))
    meta = {
        "source": {"kind": "reference", "path": None, "files": {}, "seed": int(seed)},
        "deepvariant_version": None,
        "input_shape": list(input_shape),
        "channels": [int(c) for c in channels],
        "opset": None,
        "converters": {"torch": torch.__version__},
        "parity": {},
        "untrained": True,
    }
    return save_bundle(out, sd, meta, overwrite=overwrite)
