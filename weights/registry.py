"""Registry of DeepVariant's released models (1.6.0 – 1.10.0, and the DeepSomatic / DeepTrio
models whose layout is documented), read from ``releases.json``.

The facts live in data, not code, because they come from a reference sheet with per-fact
confidence tags and will be corrected as URLs get confirmed; each :class:`ModelEntry` carries
those tags (``confidence`` for the URL, ``shape_confidence`` for shape/channels) so a user can
tell an established download from a guessed one *before* spending time on it.

Names are timm-like and stable: ``<tool>-<version>-<type>-<format>``, e.g.
``deepvariant-1.6.1-wgs-savedmodel`` or ``deepvariant-1.7.0-wgs-checkpoint``. A *release*
name drops the format (``deepvariant-1.10.0-wgs``): it names the BUNDLE that either format
converts to, which is what ``dvtorch.load(name)`` and ``dvprobe extract name`` look up in
:func:`bundles_root`.
"""

from __future__ import annotations

import difflib
import json
import os
import shlex
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

from dvtorch.errors import DvprobeError

#: Where DeepVariant's public bucket is served over HTTPS (``gs://deepvariant``). A mirror
#: replaces this prefix and keeps the rest of the path (``models/DeepVariant/<ver>/…``), so
#: ``gsutil cp -r gs://deepvariant/models …`` produces a valid mirror.
DEFAULT_BUCKET = "https://storage.googleapis.com/deepvariant/"
MIRROR_ENV = "DVPROBE_WEIGHTS_MIRROR"
CACHE_ENV = "DVPROBE_CACHE"
HOME_ENV = "DVPROBE_HOME"

#: The tools whose models the registry lists, with their directory in the bucket.
TOOLS = {"deepvariant": "DeepVariant", "deepsomatic": "DeepSomatic", "deeptrio": "DeepTrio"}

CONFIDENCE_LEVELS = ("verified", "doc", "derived", "3rd-party", "unknown")
FORMATS = ("savedmodel", "checkpoint")

#: Alternative spellings accepted by ``list_models(kind=…)``: DeepVariant's --model_type
#: values and the /opt/models directory names use longer names than the bucket files.
TYPE_ALIASES = {
    "hybrid_pacbio_illumina": "hybrid",
    "ont_r104": "ont",
}


class WeightsError(DvprobeError):
    """Base class of registry / download errors a user can cause or fix."""


class UnknownModelError(WeightsError, KeyError):
    """A model name that is not in the registry (message carries did-you-mean suggestions)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class ModelEntry:
    """One downloadable DeepVariant model: where its files are and how much to trust that.

    ``files`` are paths relative to ``base_url`` (and to the download directory, so a fetched
    SavedModel directory is exactly what ``dvprobe convert`` expects). ``sha256`` maps a file
    to its known digest, or ``None`` when the registry does not know it yet (trust on first
    use: the digest seen at the first download is recorded locally and enforced afterwards).
    """

    name: str
    version: str
    type: str
    model_type: str
    format: str
    base_url: str
    files: tuple[str, ...]
    sha256: dict[str, str | None] = field(hash=False, compare=False)
    confidence: str
    confidence_source: str = ""
    shape: tuple[int, int, int] | None = None
    channels: tuple[int, ...] | None = None
    shape_confidence: str = "unknown"
    shape_note: str | None = None
    checkpoint_prefix: str | None = None
    docker_dir: str | None = None
    tool: str = "deepvariant"

    @property
    def release(self) -> str:
        """The name without the format (``deepvariant-1.10.0-wgs``): the BUNDLE's name, the
        same whichever format it was converted from."""
        return self.name.removesuffix(f"-{self.format}")

    @property
    def bucket_path(self) -> str:
        """``base_url`` relative to DeepVariant's bucket root (what a mirror must reproduce)."""
        if not self.base_url.startswith(DEFAULT_BUCKET):
            return self.base_url
        return self.base_url[len(DEFAULT_BUCKET) :]

    @property
    def urls(self) -> tuple[str, ...]:
        """The upstream URL of every file, in ``files`` order."""
        return tuple(self.url(f) for f in self.files)

    def url(self, file: str, mirror: str | None = None) -> str:
        """URL of ``file``; with ``mirror`` the bucket root is swapped for the mirror's."""
        if file not in self.files:
            raise WeightsError(f"{self.name}: no file {file!r} (files: {', '.join(self.files)})")
        base = self.base_url if mirror is None else mirror.rstrip("/") + "/" + self.bucket_path
        return base + file

    def convert_source(self, dest: str | Path) -> Path:
        """What to pass to ``dvprobe convert`` once the files are in ``dest``.

        A SavedModel is the directory itself; a checkpoint is the prefix (``…/x.ckpt``) whose
        ``.index`` / ``.data-*`` and the ``example_info.json`` sit beside it.
        """
        dest = Path(dest)
        if self.format == "checkpoint":
            assert self.checkpoint_prefix is not None
            return dest / self.checkpoint_prefix
        return dest

    def to_dict(self) -> dict:
        """JSON-ready summary (used by ``dvprobe weights list --json``)."""
        return {
            "name": self.name,
            "release": self.release,
            "tool": self.tool,
            "version": self.version,
            "type": self.type,
            "model_type": self.model_type,
            "format": self.format,
            "files": list(self.files),
            "urls": list(self.urls),
            "sha256": dict(self.sha256),
            "shape": list(self.shape) if self.shape else None,
            "channels": list(self.channels) if self.channels else None,
            "confidence": self.confidence,
            "confidence_source": self.confidence_source,
            "shape_confidence": self.shape_confidence,
            "shape_note": self.shape_note,
        }


def model_name(version: str, type_: str, fmt: str, tool: str = "deepvariant") -> str:
    """Canonical registry name, e.g. ``deepvariant-1.6.1-wgs-savedmodel``."""
    return f"{tool}-{version}-{type_}-{fmt}"


def _entry_from_json(raw: dict, where: str) -> ModelEntry:
    """Validate one ``models[]`` record; a malformed registry must fail loudly, not half-load."""
    try:
        files = tuple(f["path"] for f in raw["files"])
        sha = {f["path"]: f.get("sha256") for f in raw["files"]}
        conf = raw["confidence"]
        fmt = raw["format"]
        tool = raw.get("tool", "deepvariant")
        entry = ModelEntry(
            name=model_name(raw["version"], raw["type"], fmt, tool),
            version=raw["version"],
            type=raw["type"],
            model_type=raw["model_type"],
            format=fmt,
            base_url=raw["base_url"],
            files=files,
            sha256=sha,
            confidence=conf,
            confidence_source=raw.get("confidence_source", ""),
            shape=tuple(raw["shape"]) if raw.get("shape") else None,
            channels=tuple(raw["channels"]) if raw.get("channels") else None,
            shape_confidence=raw.get("shape_confidence", "unknown"),
            shape_note=raw.get("shape_note"),
            checkpoint_prefix=raw.get("checkpoint_prefix"),
            docker_dir=raw.get("docker_dir"),
            tool=tool,
        )
    except (KeyError, TypeError) as exc:
        raise WeightsError(f"{where}: malformed registry record ({exc!r}): {raw!r}") from None
    problems = []
    if entry.tool not in TOOLS:
        problems.append(f"tool {entry.tool!r} not one of {tuple(TOOLS)}")
    if conf not in CONFIDENCE_LEVELS:
        problems.append(f"confidence {conf!r} not one of {CONFIDENCE_LEVELS}")
    if fmt not in FORMATS:
        problems.append(f"format {fmt!r} not one of {FORMATS}")
    if not entry.base_url.endswith("/"):
        problems.append("base_url must end with '/'")
    if fmt == "checkpoint" and not entry.checkpoint_prefix:
        problems.append("checkpoint entry without checkpoint_prefix")
    for file, digest in sha.items():
        if digest is not None and (len(digest) != 64 or set(digest) - set("0123456789abcdef")):
            problems.append(f"sha256 of {file} is not 64 lowercase hex digits")
    if problems:
        raise WeightsError(f"{where}: {entry.name}: " + "; ".join(problems))
    return entry


@lru_cache(maxsize=1)
def _load() -> tuple[ModelEntry, ...]:
    """Parse the packaged ``releases.json`` once (it ships as package data)."""
    text = resources.files("weights").joinpath("releases.json").read_text(encoding="utf-8")
    doc = json.loads(text)
    entries = tuple(_entry_from_json(r, "weights/releases.json") for r in doc["models"])
    names = [e.name for e in entries]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise WeightsError(f"weights/releases.json: duplicate models {dupes}")
    return entries


def list_models(
    version: str | None = None, kind: str | None = None, fmt: str | None = None,
    tool: str | None = None,
) -> list[ModelEntry]:
    """Registered models, optionally filtered by tool, version, model type and format.

    ``kind`` accepts the bucket name (``hybrid``, ``ont``) or DeepVariant's longer
    ``--model_type`` spelling (``HYBRID_PACBIO_ILLUMINA``, ``ONT_R104``), case-insensitively.
    An unknown filter value raises rather than silently listing nothing.
    """
    entries = list(_load())
    if tool is not None:
        t = tool.lower()
        if t not in TOOLS:
            raise WeightsError(f"unknown tool {tool!r}; known: {', '.join(TOOLS)}")
        entries = [e for e in entries if e.tool == t]
    if version is not None:
        known = sorted({e.version for e in _load()}, key=_version_key)
        if version not in known:
            raise WeightsError(f"unknown version {version!r}; known: {', '.join(known)}")
        entries = [e for e in entries if e.version == version]
    if kind is not None:
        k = kind.lower()
        k = TYPE_ALIASES.get(k, k)
        known = sorted({e.type for e in _load()})
        if k not in known:
            raise WeightsError(
                f"unknown model type {kind!r}; known: {', '.join(known)} "
                f"(aliases: {', '.join(TYPE_ALIASES)})"
            )
        entries = [e for e in entries if e.type == k]
    if fmt is not None:
        if fmt not in FORMATS:
            raise WeightsError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
        entries = [e for e in entries if e.format == fmt]
    return entries


def _version_key(version: str) -> tuple[int, ...]:
    """``1.10.0`` sorts after ``1.9.0`` (a plain string sort puts it first)."""
    return tuple(int(p) if p.isdigit() else 0 for p in version.split("."))


def _did_you_mean(key: str, names: list[str]) -> str:
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
    if not close:  # prefix typos (missing "-savedmodel") score low with difflib
        close = [n for n in names if n.startswith(key)][:3]
    return f"; did you mean {', '.join(close)}?" if close else ""


def get(name: str) -> ModelEntry:
    """The entry called ``name`` (case-insensitive), or :class:`UnknownModelError` with the
    closest names so a typo such as ``deepvariant-1.6.1-wgs`` points at the real one."""
    by_name = {e.name: e for e in _load()}
    key = name.strip().lower()
    if key in by_name:
        return by_name[key]
    raise UnknownModelError(
        f"unknown model {name!r}{_did_you_mean(key, list(by_name))} (see `dvprobe weights "
        f"list`; names look like {model_name('1.6.1', 'wgs', 'savedmodel')})"
    )


#: Which of a release's formats to download when the user names only the release: the
#: better-established URL first, then the SavedModel (what DeepVariant's own image uses).
_CONFIDENCE_RANK = {c: i for i, c in enumerate(CONFIDENCE_LEVELS)}


def release_entries(name: str) -> list[ModelEntry]:
    """The entries of a release (``deepvariant-1.10.0-wgs``), best download first; a full
    entry name (``…-savedmodel``) gives that entry alone. Raises :class:`UnknownModelError`
    with did-you-mean suggestions (releases and entries) for a name in neither."""
    key = name.strip().lower()
    entries = _load()
    exact = [e for e in entries if e.name == key]
    if exact:
        return exact
    found = [e for e in entries if e.release == key]
    if found:
        return sorted(found, key=lambda e: (_CONFIDENCE_RANK[e.confidence],
                                            e.format != "savedmodel"))
    names = sorted({e.release for e in entries} | {e.name for e in entries})
    raise UnknownModelError(
        f"unknown model {name!r}{_did_you_mean(key, names)} (see `dvprobe weights list`; "
        f"releases look like deepvariant-1.10.0-wgs)"
    )


def looks_like_release(name: str) -> bool:
    """Whether ``name`` is spelled as a registry name (``deepvariant-…``) rather than a path."""
    text = str(name)
    return "/" not in text and os.sep not in text and any(
        text.lower().startswith(f"{tool}-") for tool in TOOLS)


def cache_home() -> Path:
    """dvprobe's cache directory: ``$DVPROBE_HOME`` if set, else ``$XDG_CACHE_HOME/dvprobe``
    (default ``~/.cache/dvprobe``). Downloads go to ``weights/`` and bundles to ``bundles/``
    below it: one rule for both, so a user moves everything with one variable."""
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "dvprobe"


def cache_root() -> Path:
    """Directory holding downloaded models: ``$DVPROBE_CACHE`` if set, else
    ``<cache_home()>/weights`` (default ``~/.cache/dvprobe/weights``).

    Never inside the installed package: site-packages may be read-only and shared, and a
    reinstall would silently delete ~100 MB downloads.
    """
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return cache_home() / "weights"


def bundles_root() -> Path:
    """Directory of BUNDLEs loaded by release name: ``<cache_home()>/bundles``."""
    return cache_home() / "bundles"


def default_dest(entry: ModelEntry) -> Path:
    """Default download directory of ``entry``: ``<cache_root()>/<name>/``."""
    return cache_root() / entry.name


def default_bundle(entry: ModelEntry) -> Path:
    """Where ``dvprobe weights fetch --convert`` writes ``entry``'s BUNDLE and where
    ``dvtorch.load(entry.release)`` finds it: ``<bundles_root()>/<release>/``."""
    return bundles_root() / entry.release


def bundle_commands(entry: ModelEntry) -> list[str]:
    """The commands that make ``entry``'s BUNDLE in the cache, as a user types them: the
    download, then the conversion into :func:`default_bundle` (where loading by name looks)."""
    source = entry.convert_source(default_dest(entry))
    return [f"dvprobe weights fetch {entry.name}",
            f"dvprobe convert {shlex.quote(str(source))} --out "
            f"{shlex.quote(str(default_bundle(entry)))}"]
