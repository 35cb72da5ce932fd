"""Genomic regions for ``dvprobe extract --regions``: extract only the examples whose variant
overlaps them.

Why at extraction: a whole-genome make_examples run is hours of work to redo, while the
question is often about one chromosome, a benchmark's confident regions or a stratification
(hard-to-map, segmental duplications). Reading past the other examples costs a parse,
far cheaper than a forward pass (docs/performance.md).

A region is ``chrom``, ``chrom:start-end`` (1-based, inclusive, thousands separators
allowed, as samtools / bcftools / IGV write it) or a BED file (0-based, half-open).
Contig names match in either convention (``chr20`` or ``20``), contig by contig, like
``dvprobe annotate``. An example is chosen when its variant's span ``[start, end)``
overlaps a region (a deletion starting just before a region is in it, as with
``bcftools view -r``).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dvtorch.errors import DvprobeError
from probing.examples import alternate_contig_name, parse_example

_REGION = re.compile(r"^(?P<chrom>[^:\s]+)(?::(?P<start>[\d,]+)-(?P<end>[\d,]+))?$")
_WHOLE = np.iinfo(np.int64).max


class RegionError(DvprobeError):
    """A ``--regions`` value that is not a region or a readable BED file."""


@dataclass(frozen=True)
class Regions:
    """Merged, sorted half-open intervals per contig, and the ``--regions`` values they
    came from."""

    given: tuple[str, ...]
    starts: dict[str, np.ndarray]
    ends: dict[str, np.ndarray]

    @property
    def n_intervals(self) -> int:
        return sum(len(v) for v in self.starts.values())

    def digest(self) -> str:
        """sha256 of the merged intervals per contig (``chr20`` and ``20`` as one): two
        specs selecting the same bases are one selection."""
        from probing.annotate import merge_intervals

        canonical: dict[str, list[str]] = {}
        for c in self.starts:
            canonical.setdefault(c if not c.startswith("chr") else alternate_contig_name(c),
                                 []).append(c)
        h = hashlib.sha256()
        for name in sorted(canonical):
            names = canonical[name]
            s, e = merge_intervals(np.concatenate([self.starts[c] for c in names]),
                                   np.concatenate([self.ends[c] for c in names]))
            h.update(name.encode() + b"\0" + s.tobytes() + e.tobytes())
        return h.hexdigest()

    def to_json(self) -> dict[str, Any]:
        """What identifies the selection (a resume must match it): the merged intervals, not
        how they were spelled or where the BED file lies."""
        return {"intervals": self.n_intervals, "sha256": self.digest()}

    def overlaps(self, chrom: str, start: int, end: int) -> bool:
        """Whether ``[start, end)`` on ``chrom`` (either naming) overlaps a region."""
        starts = self.starts.get(chrom)
        if starts is None:
            chrom = alternate_contig_name(chrom)
            starts = self.starts.get(chrom)
            if starts is None:
                return False
        # the last interval starting before `end`; merged intervals are disjoint and sorted
        i = int(np.searchsorted(starts, max(end, start + 1), side="left")) - 1
        return i >= 0 and int(self.ends[chrom][i]) > start

    def chooses(self, record: bytes) -> bool:
        """Whether a serialized example's variant overlaps a region. A record that does not
        parse is chosen, so that extraction reports (or skips) it where it stands."""
        try:
            ex = parse_example(record)
        except DvprobeError:
            return True
        return self.overlaps(ex.chrom, ex.start, ex.end)


def _number(text: str) -> int:
    return int(text.replace(",", ""))


def parse_regions(values: Sequence[str]) -> Regions:
    """``--regions`` values (each a region or a BED file) as merged intervals."""
    from probing.annotate import merge_intervals, read_bed

    if not values:
        raise RegionError("--regions needs a region (chr20, chr20:1,000,001-2,000,000) "
                          "or a BED file")
    chroms: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    for value in values:
        value = value.strip()
        if os.path.isfile(value):
            try:
                bed = read_bed(Path(value))
            except DvprobeError as exc:
                raise RegionError(f"--regions {value}: {exc}") from exc
            if not len(bed):
                raise RegionError(f"--regions {value}: the BED file holds no interval")
            chroms += bed.chrom
            starts += bed.start
            ends += bed.end
            continue
        m = _REGION.match(value)
        if m is None or value.lower().endswith((".bed", ".bed.gz")):
            raise RegionError(f"--regions {value!r}: neither an existing BED file nor a region "
                              "like chr20 or chr20:1,000,001-2,000,000")
        if m["start"] is None:
            chroms.append(m["chrom"])
            starts.append(0)
            ends.append(_WHOLE)
            continue
        start, end = _number(m["start"]), _number(m["end"])
        if start < 1 or end < start:
            raise RegionError(f"--regions {value}: needs 1 <= start <= end (1-based, "
                              "inclusive)")
        chroms.append(m["chrom"])
        starts.append(start - 1)  # 1-based inclusive -> 0-based half-open
        ends.append(end)
    merged_starts: dict[str, np.ndarray] = {}
    merged_ends: dict[str, np.ndarray] = {}
    c = np.asarray(chroms, dtype=object)
    s, e = np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)
    for chrom in sorted(set(chroms)):
        keep = c == chrom
        ms, me = merge_intervals(s[keep], e[keep])
        merged_starts[chrom], merged_ends[chrom] = ms.astype(np.int64), me.astype(np.int64)
    return Regions(tuple(values), merged_starts, merged_ends)
