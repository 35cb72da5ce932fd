"""DeepVariant's released models: a registry (``releases.json``) and a resumable downloader.

    >>> import weights
    >>> [e.name for e in weights.list_models(version="1.6.1", kind="wgs")]
    ['deepvariant-1.6.1-wgs-savedmodel', 'deepvariant-1.6.1-wgs-checkpoint']
    >>> path = weights.fetch("deepvariant-1.6.1-wgs-savedmodel")  # doctest: +SKIP

Imports are light (stdlib only until a download starts), so ``dvprobe --help`` stays fast.
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
    cache_root,
    default_dest,
    get,
    list_models,
)

__all__ = [
    "ChecksumError",
    "DiskWriteError",
    "DownloadError",
    "ModelEntry",
    "UnknownModelError",
    "WeightsError",
    "cache_root",
    "default_dest",
    "fetch",
    "get",
    "is_fetched",
    "list_models",
    "read_lock",
]
