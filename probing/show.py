"""Render an example's pileup channels as labelled images (like DeepVariant's show_examples).

A cluster means little until one *looks* at its pileups, so ``dvprobe show`` renders one
example (by locus from an examples file, or by key from a STORE, re-reading the source
record) and the report embeds small per-channel thumbnails of plotted points.

No plotting library is required: channel images are written as grayscale PNGs by
:func:`png_bytes` (numpy + zlib, the PNG spec's filter-0 scanlines), and the labelled
figure is composed with Vega-Lite image marks rendered by vl-convert, which is already a
dependency (for the report) and brings its own fonts.
"""

from __future__ import annotations

import base64
import os
import re
import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dvtorch.errors import DvprobeError
from probing.channels import channel_name
from probing.examples import DVExample, parse_example, read_example_info, read_examples
from probing.store import Store, as_store, open_store
from probing.tfrecord import expand_spec, iter_records


class ShowError(DvprobeError):
    """The example asked for cannot be found or its source file is unavailable."""


# --------------------------------------------------------------------------------------
# PNG
# --------------------------------------------------------------------------------------


def _chunk(tag: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + tag + data
            + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))


def png_bytes(img: np.ndarray, level: int = 6) -> bytes:
    """Encode uint8 ``[H, W]`` (gray) or ``[H, W, 3]`` (RGB) as PNG."""
    a = np.ascontiguousarray(img, dtype=np.uint8)
    if a.ndim == 2:
        color, h, w = 0, *a.shape
    elif a.ndim == 3 and a.shape[2] == 3:
        color, h, w = 2, a.shape[0], a.shape[1]
    else:
        raise ValueError(f"png_bytes: expected [H, W] or [H, W, 3], got {a.shape}")
    rows = a.reshape(h, -1)
    raw = np.hstack([np.zeros((h, 1), np.uint8), rows]).tobytes()  # filter type 0 per row
    ihdr = struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
            + _chunk(b"IDAT", zlib.compress(raw, level)) + _chunk(b"IEND", b""))


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def channel_images(image: np.ndarray, channels: Sequence[int] | None,
                   downsample: int = 1) -> list[tuple[str, np.ndarray]]:
    """``[(label, gray [H, W])]`` per channel; labels like ``"1 read_base"``.

    ``channels`` is the enum list of the model or examples the pileup belongs to (a BUNDLE's
    or STORE's ``channels``, an example_info.json's). Without one, channels are labelled by
    position (``"channel 3"``): guessing the WGS names from the channel count would put
    ``insert_size`` on another model's seventh channel.
    """
    img = np.asarray(image)
    if img.ndim != 3:
        raise ShowError(f"expected an [H, W, C] pileup, got shape {img.shape}")
    chans = list(channels) if channels is not None else None
    if chans is not None and len(chans) != img.shape[2]:
        raise ShowError(f"pileup has {img.shape[2]} channels but the channel list names "
                        f"{len(chans)}: {chans}")
    out = []
    for i in range(img.shape[2]):
        label = f"{chans[i]} {channel_name(chans[i])}" if chans else f"channel {i}"
        out.append((label, img[::downsample, ::downsample, i]))
    return out


def channel_pngs(image: np.ndarray, channels: Sequence[int] | None,
                 downsample: int = 1) -> list[tuple[str, bytes]]:
    return [(lbl, png_bytes(a)) for lbl, a in channel_images(image, channels, downsample)]


# --------------------------------------------------------------------------------------
# Labelled figure
# --------------------------------------------------------------------------------------

_LABELS = {0: "hom-ref (0)", 1: "het (1)", 2: "hom-alt (2)"}


def describe(ex: DVExample) -> str:
    alts = [ex.alts[i] for i in ex.alt_allele_indices] if ex.alt_allele_indices else []
    label = "no label" if ex.label is None else f"label {_LABELS.get(ex.label, ex.label)}"
    return f"{ex.locus}  {ex.ref}>{','.join(alts) or '-'}  {label}"


def figure_spec(ex: DVExample, channels: Sequence[int] | None, columns: int = 4,
                scale: float = 1.0, title: str | None = None) -> dict:
    """Vega-Lite spec: one titled image per channel in a grid, the example in the title."""
    h, w, _ = ex.image.shape
    panels = []
    for label, png in channel_pngs(ex.image, channels):
        panels.append({
            "title": {"text": label, "fontSize": 12},
            "width": int(w * scale), "height": int(h * scale),
            "data": {"values": [{"u": data_uri(png)}]},
            "mark": {"type": "image", "width": int(w * scale), "height": int(h * scale),
                     "aspect": False, "align": "left", "baseline": "top"},
            "encoding": {"url": {"field": "u", "type": "nominal"},
                         "x": {"value": 0}, "y": {"value": 0}},
        })
    rows = [{"hconcat": panels[i:i + columns]} for i in range(0, len(panels), columns)]
    return {
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
        "title": {"text": title or describe(ex), "fontSize": 14, "anchor": "start"},
        "vconcat": rows,
        "config": {"view": {"stroke": "#999"}, "background": "white"},
    }


def render_example(ex: DVExample, channels: Sequence[int] | None, out: str | os.PathLike,
                   scale: float = 2.0) -> Path:
    """Write the labelled channel figure as ``.png`` or ``.svg`` (by suffix)."""
    import vl_convert as vlc

    out = Path(out)
    spec = figure_spec(ex, channels, scale=1.0)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".svg":
        out.write_text(vlc.vegalite_to_svg(spec))
    elif out.suffix.lower() == ".png":
        out.write_bytes(vlc.vegalite_to_png(spec, scale=scale))
    else:
        raise ShowError(f"{out}: output must end in .png or .svg")
    return out


# --------------------------------------------------------------------------------------
# Finding examples
# --------------------------------------------------------------------------------------

_LOCUS = re.compile(r"^(?P<chrom>[^:]+):(?P<start>[\d,]+)(?:-(?P<end>[\d,]+))?$")


def parse_locus(locus: str) -> tuple[str, int, int | None]:
    """``chr20:10001234`` (1-based position of the variant's first base, as IGV and the
    ``locus`` feature write it) or ``chr20:10001234-10001235`` -> (chrom, start0, end)."""
    m = _LOCUS.match(locus.strip())
    if not m:
        raise ShowError(f"locus {locus!r}: expected CHROM:POS or CHROM:START-END (1-based)")
    start = int(m["start"].replace(",", ""))
    if start < 1:
        raise ShowError(f"locus {locus!r}: positions are 1-based")
    end = int(m["end"].replace(",", "")) if m["end"] else None
    if end is not None and end < start:
        raise ShowError(f"locus {locus!r}: END before START")
    return m["chrom"], start - 1, end


def _alt_chrom(c: str) -> str:
    return c[3:] if c.startswith("chr") else f"chr{c}"


def find_examples(spec: str | os.PathLike, locus: str, limit: int = 16) -> list[DVExample]:
    """Examples whose variant starts at ``locus`` (all alt subsets of a multi-allelic site).

    Files are scanned in order (examples files are not indexed); ``chr20``/``20`` are both
    tried. Images are copied so the returned examples outlive the read buffer.
    """
    chrom, start0, end = parse_locus(locus)
    names = {chrom, _alt_chrom(chrom)}
    found: list[DVExample] = []
    # with an END that is not the exact span of an example's locus: the examples that start
    # inside it (collected in the same pass; files can be large)
    inside: list[DVExample] = []
    nearest: tuple[int, str] | None = None  # (distance, "locus (key)") on the same contig
    for ex in read_examples(spec):
        if ex.chrom not in names:
            continue
        if ex.start == start0 and (end is None or ex.end == end):
            ex.image = np.array(ex.image)
            found.append(ex)
            if len(found) >= limit:
                break
            continue
        if end is not None and start0 <= ex.start < end and len(inside) < limit:
            ex.image = np.array(ex.image)
            inside.append(ex)
        if nearest is None or abs(ex.start - start0) < nearest[0]:
            nearest = (abs(ex.start - start0), f"{ex.chrom}:{ex.start + 1} (key {ex.key})")
    found = found or inside
    if not found:
        # A STORE's keys and obs 'pos' are 0-based (Variant.start); --locus is 1-based.
        hint = f"; nearest: {nearest[1]}" if nearest else ""
        raise ShowError(f"{spec}: no example at {locus} (position = 1-based variant start, "
                        f"i.e. obs 'pos' + 1){hint}")
    return found


def _shard_paths(store: Store, examples: str | os.PathLike | None) -> list[Path]:
    """The STORE's input shards in extraction order, optionally relocated to ``examples``."""
    shards = [Path(p) for p in store.meta.get("shards", [])]
    if examples is None:
        return shards
    given = {p.name: p for p in expand_spec(examples)}
    missing = [p.name for p in shards if p.name not in given]
    if missing:
        raise ShowError(f"examples {examples}: lacks shard(s) {missing[:3]} the STORE was "
                        "extracted from")
    return [given[p.name] for p in shards]


def store_channels(store: Store) -> list[int] | None:
    ch = store.meta.get("channels")
    if ch:
        return [int(c) for c in ch]
    shards = store.meta.get("shards") or []
    if shards:
        info = read_example_info(shards[0]) if Path(shards[0]).exists() else None
        if info:
            return list(info["channels"])
    return None


def read_store_examples(store: Store | str | os.PathLike, rows: Iterable[int],
                        examples: str | os.PathLike | None = None, *,
                        examples_option: str = "the EXAMPLES argument"
                        ) -> dict[int, DVExample]:
    """Re-read the source records of STORE rows (obs ``shard``/``record``).

    ``examples``: where the STORE's shards are now, when they were moved; a missing shard's
    error says to give it with ``examples_option`` (how the calling command takes it:
    ``dvprobe show``'s EXAMPLES argument, ``dvprobe report --examples``).

    Each needed shard is read once, in order, up to its last needed record; records are
    framed and CRC-checked on the way (gzip cannot seek) but only the wanted ones parsed.
    Every example's key is checked against obs so a modified file cannot show the wrong
    pileup.
    """
    store = as_store(store)
    obs = store.obs
    for c in ("shard", "record", "key"):
        if c not in obs.columns:
            raise ShowError(f"{store.path}: obs has no {c!r} column; cannot locate records")
    paths = _shard_paths(store, examples)
    rows = sorted({int(r) for r in rows})
    want: dict[int, dict[int, int]] = {}
    for r in rows:
        if not 0 <= r < len(obs):
            raise ShowError(f"{store.path}: row {r} out of range (n={len(obs)})")
        want.setdefault(int(obs["shard"].iat[r]), {})[int(obs["record"].iat[r])] = r
    out: dict[int, DVExample] = {}
    for si, recs in sorted(want.items()):
        if si >= len(paths):
            raise ShowError(f"{store.path}: shard index {si} but store.json lists "
                            f"{len(paths)} shards")
        path = paths[si]
        if not path.is_file():
            raise ShowError(f"{path}: source examples file of {store.path} is missing (moved? "
                            f"give its new location with {examples_option})")
        last = max(recs)
        for idx, payload in iter_records(path):
            if idx in recs:
                ex = parse_example(payload, path=path, record=idx)
                row = recs[idx]
                if ex.key != obs["key"].iat[row]:
                    raise ShowError(f"{path}, record {idx}: holds {ex.key}, but the STORE "
                                    f"row {row} is {obs['key'].iat[row]} (file changed?)")
                ex.image = np.array(ex.image)
                out[row] = ex
            if idx >= last:
                break
    return out


@dataclass
class Shown:
    path: Path
    example: DVExample


def show(examples: str | os.PathLike | None = None, *, locus: str | None = None,
         store: str | os.PathLike | None = None, key: str | None = None,
         out: str | os.PathLike = "example.png", scale: float = 2.0) -> list[Shown]:
    """Render by ``locus`` from an examples spec, or by ``key`` from a STORE row.

    Several examples at one locus (multi-allelic alt subsets) are written as
    ``<out stem>.<i><suffix>``.
    """
    out = Path(out)
    if not 0 < scale <= 8:
        raise ShowError(f"--scale must be in (0, 8], got {scale}")
    if out.is_dir():
        raise ShowError(f"--out {out} is a directory; give a file name (.png or .svg)")
    if store is not None:
        if key is None:
            raise ShowError("--store needs --key (an obs key, chrom:pos:ref>alt:indices)")
        st = open_store(store)
        hits = np.flatnonzero(st.obs["key"].astype(str).to_numpy() == key)
        if len(hits) == 0:
            raise ShowError(f"{st.path}: no example with key {key!r}")
        exs = [read_store_examples(st, [int(hits[0])], examples)[int(hits[0])]]
        channels = store_channels(st)
    else:
        if examples is None or locus is None:
            raise ShowError("give EXAMPLES and --locus, or --store and --key")
        exs = find_examples(examples, locus)
        info = read_example_info(examples)
        channels = list(info["channels"]) if info else None
    shown = []
    for i, ex in enumerate(exs):
        p = out if len(exs) == 1 else out.with_name(f"{out.stem}.{i}{out.suffix}")
        shown.append(Shown(render_example(ex, channels, p, scale=scale), ex))
    return shown
