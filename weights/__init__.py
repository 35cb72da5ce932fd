"""DeepVariant's released models: a registry (``releases.json``) and a resumable downloader.

    >>> import weights
    >>> [e.name for e in weights.list_models(version="1.6.1", kind="wgs")]
    ['deepvariant-1.6.1-wgs-savedmodel', 'deepvariant-1.6.1-wgs-checkpoint']
    >>> path = weights.fetch("deepvariant-1.6.1-wgs-savedmodel")  # doctest: +SKIP

Imports are light (no torch; the network only when a download starts), so ``dvprobe --help``
stays fast. The registry sits below the model in the layers (docs/architecture.md): it
imports only the shared basics, ``dvtorch.errors`` and ``dvtorch.files``.
"""

from __future__ import annotations

from weights.fetch import (
    ChecksumError,
    DiskWriteError,
    DownloadError,
    fetch,
    is_fetched,
    read_lock,
)
from weights.registry import (
    ModelEntry,
    UnknownModelError,
    WeightsError,
    bundle_commands,
    bundles_root,
    cache_home,
    cache_root,
    default_bundle,
    default_dest,
    get,
    list_models,
    looks_like_release,
    release_entries,
)

__all__ = [
    "ChecksumError",
    "DiskWriteError",
    "DownloadError",
    "ModelEntry",
    "UnknownModelError",
    "WeightsError",
    "bundle_commands",
    "bundles_root",
    "cache_home",
    "cache_root",
    "default_bundle",
    "default_dest",
    "fetch",
    "get",
    "is_fetched",
    "list_models",
    "looks_like_release",
    "read_lock",
    "release_entries",
]
