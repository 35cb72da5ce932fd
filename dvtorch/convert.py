"""DeepVariant checkpoint / SavedModel / ONNX → dvprobe BUNDLE, with parity checked before writing.

Pipeline (one direction only, every step checked):

1. locate the source and its ``example_info.json`` (shape and channel list: DeepVariant never
   stores them in the weights, and H×W cannot be recovered from a fully convolutional net);
2. TF sources: rebuild DeepVariant's Keras model in the checkpoint's layout and restore it
   strictly (:mod:`dvtorch.keras_dv`), then export ONNX with ``tf2onnx.convert.from_keras``
   (clean node names such as ``…/mixed5/concat``; opset 17);
3. ONNX → native PyTorch state dict (:func:`dvtorch.onnx_import.state_dict_from_onnx`);
4. parity at the softmax and every ``mixedN`` (max and mean pooled) between TF, onnxruntime,
   the native model and an onnx2torch witness (:mod:`dvtorch.verify`); failure writes nothing;
5. :func:`dvtorch.bundle.save_bundle` with provenance (sha256 of every source file, tool
   versions, the parity report). The final directory appears atomically: a failed convert
   leaves nothing at OUT.
"""

from __future__ import annotations

import glob
import importlib.metadata
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dvtorch.bundle import check_replaceable
from dvtorch.errors import ConversionError, ParityError
from dvtorch.files import sha256_file, swap_in_dir, sweep_dead_writers, writer_dir
from dvtorch.onnx_import import load_onnx, onnx_input_shape
from weights.fetch import LOCK_NAME, read_lock

Progress = Callable[[str], None]

#: The lock file ``dvprobe weights fetch`` writes into a download directory.
DOWNLOAD_LOCK = LOCK_NAME
SourceKind = str  # "checkpoint" | "savedmodel" | "onnx"

EXAMPLE_INFO = "example_info.json"
_CONVERTER_PACKAGES = (
    "tensorflow",
    "tf_keras",
    "tf2onnx",
    "onnx",
    "onnxruntime",
    "onnx2torch",
    "torch",
)


@dataclass
class Source:
    """A located model source and the files that define it (hashed into the bundle)."""

    kind: SourceKind
    path: Path  # checkpoint prefix, SavedModel dir or .onnx file
    files: list[Path]


@dataclass
class ExampleInfo:
    """Shape [H, W, C], channel enum list and DeepVariant version (from JSON or flags).

    ``flags_for_calling``: the make_examples flags a model's example_info.json lists for
    calling with it, when it lists any (released 1.9/1.10 models are reported to: e.g.
    ``trained_small_model_path`` when run_deepvariant uses the small model with it). Kept in
    ``bundle.json`` so ``info`` / ``extract`` can say how a default run made its examples.
    """

    shape: tuple[int, int, int]
    channels: list[int] | None
    version: str | None
    path: Path | None  # None when it came from --shape/--channels
    flags_for_calling: dict[str, Any] | None = None


# --------------------------------------------------------------------------- locating sources


def locate_source(source: str | Path) -> Source:
    """Classify ``source`` and list its files, with an error that says what is missing."""
    path = Path(source)
    if path.suffix == ".index" and not path.is_dir():
        path = path.with_suffix("")  # accept "…ckpt.index" for the prefix
    if path.is_file() and path.suffix == ".onnx":
        return Source("onnx", path, [path])
    if path.is_dir():
        if (path / "saved_model.pb").is_file():
            files = sorted(p for p in path.rglob("*") if p.is_file()
                           and p.name != DOWNLOAD_LOCK and not p.name.endswith(".part"))
            if not (path / "variables" / "variables.index").is_file():
                raise ConversionError(
                    f"{path}: SavedModel has no variables/variables.index; the download is "
                    "incomplete"
                )
            _data_shards(path / "variables" / "variables")
            return Source("savedmodel", path, files)
        raise ConversionError(
            f"{path}: not a model directory (no saved_model.pb); pass a SavedModel directory, "
            "a checkpoint prefix (…/deepvariant.wgs.ckpt) or an .onnx file"
        )
    index = Path(f"{path}.index")
    if index.is_file():
        return Source("checkpoint", path, [index, *_data_shards(path)])
    if list(path.parent.glob(f"{glob.escape(path.name)}.data-*-of-*")):
        raise ConversionError(
            f"{path}: checkpoint index {index} is missing (only the .data file is there); "
            "download it next to the .data"
        )
    if path.is_file():
        raise ConversionError(
            f"{path}: unrecognised model file; expected a checkpoint prefix (with .index and "
            ".data-00000-of-00001 beside it), a SavedModel directory or an .onnx file"
        )
    raise ConversionError(f"{path}: no such checkpoint prefix, SavedModel directory or .onnx file")


def _data_shards(prefix: Path) -> list[Path]:
    """The ``<prefix>.data-0000N-of-0000M`` files of a checkpoint, all of them or an error."""
    data = sorted(prefix.parent.glob(f"{glob.escape(prefix.name)}.data-*-of-*"))
    if not data:
        raise ConversionError(
            f"{prefix}: checkpoint data file {prefix}.data-00000-of-00001 is missing (only "
            f"{prefix.name}.index found); download it next to the .index"
        )
    total = int(data[0].name.rsplit("-of-", 1)[1])
    expected = [Path(f"{prefix}.data-{i:05d}-of-{total:05d}") for i in range(total)]
    absent = [p for p in expected if not p.is_file()]
    if absent:
        raise ConversionError(f"{prefix}: checkpoint data file {absent[0]} is missing")
    return expected


def _parse_ints(text: str | Sequence[int] | None, what: str) -> list[int] | None:
    if text is None:
        return None
    if isinstance(text, str):
        try:
            return [int(v) for v in text.replace(" ", "").split(",") if v]
        except ValueError:
            raise ConversionError(
                f"--{what} must be comma-separated integers, got {text!r}"
            ) from None
    return [int(v) for v in text]


def read_example_info(path: Path) -> ExampleInfo:
    """Parse DeepVariant's ``example_info.json`` (formats reference §3)."""
    try:
        data = json.loads(path.read_text())
        shape = tuple(int(v) for v in data["shape"])
        channels = [int(v) for v in data["channels"]]
    except FileNotFoundError:
        raise ConversionError(f"{path}: example_info.json not found") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ConversionError(
            f"{path}: not a DeepVariant example_info.json (needs 'shape' [H,W,C] and "
            f"'channels'; {type(exc).__name__}: {exc})"
        ) from None
    if len(shape) != 3:
        raise ConversionError(f"{path}: 'shape' must be [H, W, C], got {list(shape)}")
    if len(channels) != shape[2]:
        raise ConversionError(f"{path}: lists {len(channels)} channels but shape has C={shape[2]}")
    flags = data.get("flags_for_calling")
    return ExampleInfo(shape, channels, data.get("version"), path,  # type: ignore[arg-type]
                       flags if isinstance(flags, dict) and flags else None)


def resolve_example_info(
    src: Source,
    example_info: str | Path | None,
    shape: str | Sequence[int] | None,
    channels: str | Sequence[int] | None,
    graph_shape: tuple[int | None, int | None, int | None] | None = None,
) -> ExampleInfo:
    """Pick shape/channels from flags, an explicit JSON, the JSON beside the source, or the graph.

    Flags win over files so a user can override a wrong json; a channel list whose length
    disagrees with C is always an error.
    """
    info: ExampleInfo | None = None
    if example_info is not None:
        info = read_example_info(Path(example_info))
    else:
        beside = (
            src.path / EXAMPLE_INFO if src.kind == "savedmodel" else src.path.parent / EXAMPLE_INFO
        )
        if beside.is_file():
            info = read_example_info(beside)
    flag_shape = _parse_ints(shape, "shape")
    flag_channels = _parse_ints(channels, "channels")
    if flag_shape is not None and len(flag_shape) != 3:
        raise ConversionError(f"--shape must be H,W,C (three integers), got {shape!r}")

    final_shape = tuple(flag_shape) if flag_shape else (info.shape if info else None)
    if final_shape is None and graph_shape is not None and all(graph_shape):
        final_shape = graph_shape
    final_channels = (
        flag_channels if flag_channels is not None else (info.channels if info else None)
    )
    if final_shape is None or final_channels is None:
        looked = (
            f"{src.path / EXAMPLE_INFO}"
            if src.kind == "savedmodel"
            else f"{src.path.parent / EXAMPLE_INFO}"
        )
        need = ("--channels c1,c2,… (the graph gives the shape; e.g. --channels "
                "1,2,3,4,5,6,19)" if final_shape is not None and final_channels is None else
                "both --shape H,W,C and --channels c1,c2,… (e.g. --shape 100,221,7 "
                "--channels 1,2,3,4,5,6,19)")
        raise ConversionError(
            f"{src.path}: missing example_info.json (looked for {looked}); pass "
            f"--example-info FILE, or {need}"
        )
    if min(final_shape[:2]) < 75 or final_shape[2] < 1:
        raise ConversionError(
            f"{src.path}: input shape {list(final_shape)}: H and W must be at least 75 "
            "(Inception-v3's smallest input) and C at least 1; DeepVariant WGS is 100,221,7"
        )
    if len(final_channels) != final_shape[2]:
        raise ConversionError(
            f"{src.path}: channel list has {len(final_channels)} entries but the shape says "
            f"C={final_shape[2]}; make --channels and --shape agree"
        )
    version = info.version if info else None
    used_path = info.path if info and (flag_shape is None or flag_channels is None) else None
    return ExampleInfo(tuple(int(v) for v in final_shape), list(final_channels),  # type: ignore[arg-type]
                       version, used_path, info.flags_for_calling if info else None)


def converter_versions() -> dict[str, str | None]:
    """Versions of every tool in the chain, recorded for provenance (None = not installed)."""
    dists = {
        "tensorflow": ("tensorflow-cpu", "tensorflow"),
        "tf_keras": ("tf-keras", "tf_keras"),
    }
    out: dict[str, str | None] = {}
    for pkg in _CONVERTER_PACKAGES:
        out[pkg] = None
        for dist in dists.get(pkg, (pkg,)):
            try:
                out[pkg] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return out


# --------------------------------------------------------------------------- ONNX handling


def keras_to_onnx(model: Any, input_shape: tuple[int, int, int], opset: int) -> Any:
    """Export the rebuilt Keras model with tf2onnx (batch dimension left dynamic)."""
    from dvtorch.keras_dv import import_tf

    tf = import_tf()
    import tf2onnx

    spec = (tf.TensorSpec((None, *input_shape), tf.float32, name="image"),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset)
    return proto


# --------------------------------------------------------------------------- main entry point


def _say(progress: Progress | None, msg: str) -> None:
    if progress is not None:
        progress(msg)


def convert(
    source: str | Path,
    out: str | Path,
    *,
    example_info: str | Path | None = None,
    shape: str | Sequence[int] | None = None,
    channels: str | Sequence[int] | None = None,
    opset: int = 17,
    check_parity: bool = True,
    parity_batch: int = 8,
    overwrite: bool = False,
    seed: int = 0,
    progress: Progress | None = None,
) -> Path:
    """Convert a DeepVariant model to a dvprobe BUNDLE at ``out`` and return its path.

    ``source`` is a checkpoint prefix, a SavedModel directory or an ``.onnx`` file. With
    ``check_parity`` (default) the bundle is written only if TF (when the source is TF),
    onnxruntime, the native model and onnx2torch agree to relative 1e-4 at the softmax and at
    every mixedN under max and mean pooling; the report is stored in ``bundle.json``.
    """
    from dvtorch.bundle import save_bundle
    from dvtorch.onnx_import import state_dict_from_onnx

    out = Path(out)
    if out.exists() and not overwrite:
        raise ConversionError(f"{out}: already exists; pass --overwrite to replace it")
    _check_parent(out)
    src = locate_source(source)
    check_replaceable(out, keep=src.files)
    t0 = time.time()
    _say(progress, f"hashing {len(src.files)} source files")
    hashes = {_rel(f, src): sha256_file(f) for f in src.files}
    download = _check_download(src, hashes)

    proto, info, keras_model = _source_as_onnx(src, example_info, shape, channels, opset,
                                               progress)
    _say(progress, "importing ONNX weights into the native PyTorch model")
    state_dict = state_dict_from_onnx(proto)
    onnx_bytes = proto.SerializeToString()

    if info.path is not None and info.path not in src.files:
        hashes[_rel(info.path, src)] = sha256_file(info.path)

    parity: dict[str, Any] | None = None
    if check_parity:
        parity = _check_parity(src, state_dict, onnx_bytes, info.shape, keras_model,
                               parity_batch, seed, progress)

    meta = {
        "source": {"kind": src.kind, "path": str(src.path.resolve()), "files": hashes,
                   **({"download": download} if download else {})},
        "deepvariant_version": info.version,
        "input_shape": list(info.shape),
        "channels": info.channels,
        "opset": _onnx_opset(proto) if src.kind == "onnx" else opset,
        "converters": converter_versions(),
        "parity": parity,
        "untrained": False,
        **({"flags_for_calling": info.flags_for_calling} if info.flags_for_calling else {}),
    }
    _write_atomically(
        out,
        overwrite,
        lambda target: save_bundle(target, state_dict, meta, onnx_bytes=onnx_bytes),
        keep=src.files,
    )
    _say(progress, f"wrote {out} in {time.time() - t0:.0f}s")
    return out


def _source_as_onnx(
    src: Source,
    example_info: str | Path | None,
    shape: str | Sequence[int] | None,
    channels: str | Sequence[int] | None,
    opset: int,
    progress: Progress | None,
) -> tuple[Any, ExampleInfo, Any | None]:
    """The source's graph as ONNX, the example info it takes, and the restored Keras model
    (None for an ONNX source). A TF source is restored and exported with tf2onnx; an ONNX
    source's input must agree with example_info / ``--shape``."""
    if src.kind == "onnx":
        _say(progress, f"reading ONNX {src.path}")
        proto = load_onnx(src.path)
        graph_shape = onnx_input_shape(proto)
        info = resolve_example_info(src, example_info, shape, channels, graph_shape)
        for have, want, axis in zip(graph_shape, info.shape, "HWC", strict=True):
            if have is not None and have != want:
                raise ConversionError(
                    f"{src.path}: ONNX input has {axis}={have} but example_info/--shape says "
                    f"{axis}={want}" + (" channels" if axis == "C" else "")
                )
        return proto, info, None
    info = resolve_example_info(src, example_info, shape, channels)
    from dvtorch import keras_dv

    keras_dv.import_tf()
    _check_opset(opset)
    import tf_keras

    tf_keras.backend.clear_session()  # deterministic Keras layer names → ONNX node names
    _say(progress, f"restoring {src.kind} {src.path} (TensorFlow)")
    if src.kind == "checkpoint":
        keras_model, layout = keras_dv.load_checkpoint(src.path, info.shape)
    else:
        keras_model, layout = keras_dv.load_savedmodel(src.path, info.shape)
    _say(
        progress,
        f"restored {keras_dv.EXPECTED_NUM_VARIABLES}/{keras_dv.EXPECTED_NUM_VARIABLES} "
        f"variables ({layout.layout} layout); exporting ONNX opset {opset} with tf2onnx",
    )
    return keras_to_onnx(keras_model, info.shape, opset), info, keras_model


def _check_parity(src: Source, state_dict: dict[str, Any], onnx_bytes: bytes,
                  input_shape: tuple[int, int, int], keras_model: Any | None, batch: int,
                  seed: int, progress: Progress | None) -> dict[str, Any]:
    """The parity report for bundle.json; raises :class:`ParityError` (nothing written yet)
    when the runtimes disagree beyond the tolerance."""
    from dvtorch import verify as verify_mod

    _say(progress, f"checking parity on {batch} random pileups (softmax + mixed0..10)")
    report = verify_mod.parity_for_conversion(
        state_dict=state_dict,
        onnx_bytes=onnx_bytes,
        input_shape=input_shape,
        keras_model=keras_model,
        savedmodel=src.path if src.kind == "savedmodel" else None,
        batch=batch,
        seed=seed,
    )
    if not report.passed:
        raise ParityError(
            f"{src.path}: conversion rejected, nothing written: {report.failure_summary()}"
        )
    _say(progress, f"parity ok: {report.summary_line()}")
    return report.to_dict()


def _onnx_opset(proto: Any) -> int | None:
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return None


def _rel(path: Path, src: Source) -> str:
    """File name as stored in bundle.json: relative to the SavedModel dir / checkpoint dir."""
    base = src.path if src.kind == "savedmodel" else src.path.parent
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path.resolve())


def _check_download(src: Source, hashes: dict[str, str]) -> dict[str, Any] | None:
    """Check the source against the ``checksums.json`` that ``dvprobe weights fetch`` left
    beside it, and return the download's provenance for ``bundle.json`` (None: no lock).

    Why: a file cut short or altered after the download otherwise surfaces as an unreadable
    checkpoint, or as a parity failure that reads like a bug in the port.
    """
    base = src.path if src.kind == "savedmodel" else src.path.parent
    lock = read_lock(base)
    if not lock:
        return None
    for name, rec in lock["files"].items():
        have = hashes.get(name)
        if have is None or not rec.get("sha256") or have == rec["sha256"]:
            continue
        size = (base / name).stat().st_size
        raise ConversionError(
            f"{base / name}: differs from its download recorded in {base / DOWNLOAD_LOCK} "
            f"({size} bytes now, {rec.get('size')} then; sha256 {have[:12]}…, then "
            f"{rec['sha256'][:12]}…): cut short or changed since; fetch it again "
            f"(dvprobe weights fetch {lock.get('name')})"
        )
    return {
        "name": lock.get("name"),
        "deepvariant_version": lock.get("deepvariant_version"),
        "confidence": lock.get("confidence"),
        "files": {name: {k: rec.get(k) for k in ("url", "fetched", "verified_against")}
                  for name, rec in lock["files"].items()},
    }


def _check_parent(out: Path) -> None:
    """Fail before the conversion's minutes, not after, when OUT cannot be created."""
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConversionError(f"--out {out}: {parent} is a file, not a directory")
            return


def _check_opset(opset: int) -> None:
    """An opset tf2onnx can write, checked before the checkpoint is restored."""
    import tf2onnx

    known = sorted(tf2onnx.constants.OPSET_TO_IR_VERSION)
    if opset not in known:
        raise ConversionError(
            f"--opset {opset}: tf2onnx {tf2onnx.__version__} writes opsets "
            f"{known[0]}..{known[-1]} (default 17)"
        )


def _write_atomically(out: Path, overwrite: bool, write: Callable[[Path], Any],
                      keep: Sequence[Path] = ()) -> None:
    """Write into a staging sibling, then rename; on any failure OUT is left untouched."""
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_dead_writers(out.parent)  # what a killed conversion left (up to ~175 MB each)
    staging = writer_dir(out.parent, out.name)
    target = staging / "bundle"
    try:
        write(target)
        if out.exists():
            if not overwrite:
                raise ConversionError(f"{out}: appeared while converting; pass --overwrite")
            check_replaceable(out, keep)
        swap_in_dir(target, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
