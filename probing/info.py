"""``dvprobe info STORE``: what a STORE holds and how it was made, from its metadata alone.

Why metadata only: a whole-genome STORE holds tens of GB of activations and millions of obs
rows, and "what is in here, from which model and examples, and what has been run on it"
should answer at once. So this reads ``store.json``, the parquet schemas, each run's
``run.json`` and each probe file, and never a layer row or an obs row.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from dvtorch.files import BUNDLE_META_FILE, bundle_fingerprint
from probing.pileup import ATTRIBUTES
from probing.probe import PROBES_DIR, PROBES_FORMAT
from probing.schema import META_COLUMNS, MODEL_COLUMNS
from probing.store import PartState, Store, claim_path, finish_command
from probing.tasks import claim_state, describe_claim


def store_info(path: str | os.PathLike) -> dict[str, Any]:
    """Everything :func:`format_info` prints, as plain JSON-able data."""
    store = Store(path, partial_parts=True)
    m = store.meta
    inputs = m.get("inputs") or {}
    info: dict[str, Any] = {
        "path": str(store.path),
        "complete": store.complete,
        "n": store.n,
        "cursor": None if store.complete or store.parts else m.get("cursor"),
        "parts": [_part(store, p) for p in store.parts],
        "model": _model(m),
        "examples": {
            "spec": m.get("examples_spec"),
            "files": m.get("shards"),
            "shards": len(inputs.get("examples") or []),
            "bytes": sum(int(e.get("size", 0)) for e in inputs.get("examples") or []),
            "input_shape": m.get("input_shape"),
            "channels": m.get("channels"),
            "limit": inputs.get("limit"),
            "sample": inputs.get("sample"),
            "small_model": m.get("small_model"),
            "regions": (dict(inputs["regions"], given=m.get("regions_given"))
                        if inputs.get("regions") else None),
            # the committed cursor counts every record read (chosen or not, corrupt too)
            "records_read": sum(int((u.meta.get("cursor") or {}).get("position", 0))
                                for u in _units(store)),
        },
        "extraction": {**(m.get("extraction") or {}),
                       "dtype": inputs.get("dtype"),
                       "skipped": (m.get("skipped") or {}).get("count", 0)},
        "layers": [_layer(store, name, spec) for name, spec in _in_order(
            m.get("layers") or {}, inputs.get("layers") or [])],
        "obs": _obs_columns(store),
        "runs": [_run(store.path / "runs" / name) for name in store.runs],
        "probes": _probes(store.path / PROBES_DIR),
        "set_aside": sorted(p.name for p in store.path.glob("stale-*") if p.is_dir()),
    }
    info["damage"] = _damage(store, info)
    return info


class _Unit:
    """Where rows are written: a STORE, or one started part of a parted STORE."""

    def __init__(self, path: Path, prefix: str, n: int, complete: bool, meta: dict):
        self.path, self.prefix, self.n, self.complete, self.meta = path, prefix, n, complete, meta


def _units(store: Store) -> list[_Unit]:
    if not store.parts:
        return [_Unit(store.path, "", store.n, store.complete, store.meta)]
    return [_Unit(p.path, f"parts/{p.name}/", p.n, p.complete, p.meta)
            for p in store.parts if p.meta is not None]


def _part(store: Store, p: PartState) -> dict[str, Any]:
    """One part of a parted STORE: its state, who writes it, how to finish it."""
    return {"index": p.index, "name": p.name, "state": p.state, "n": p.n,
            "cursor": None if p.complete or p.meta is None else p.meta.get("cursor"),
            "writer": describe_claim(p.writer) if p.writer is not None else None,
            # another machine's claim: nobody here can tell whether its process still runs
            "claim": (str(claim_path(p.path)) if p.writer is not None
                      and claim_state(p.writer) != "live" else None),
            "command": None if p.complete else finish_command(store.root_meta, p.index,
                                                                 store.path)}


def _damage(store: Store, info: dict[str, Any]) -> list[str]:
    """What is missing or cut short, as far as metadata and file sizes tell: every other
    command refuses such a STORE, so info must not call it complete and say nothing."""
    out = [f"parts/{p.name}/store.json is unreadable" for p in store.parts
           if p.state == "damaged"]
    for u in _units(store):
        for la in info["layers"]:
            name = la["name"]
            f = u.path / "layers" / f"{name}.bin"
            want = u.n * int(la["dim"] or 0) * np.dtype(la["dtype"] or "float32").itemsize
            if not f.is_file():
                out.append(f"{u.prefix}layers/{name}.bin is missing")
            elif f.stat().st_size < want or (u.complete and f.stat().st_size != want):
                out.append(f"{u.prefix}layers/{name}.bin holds {f.stat().st_size:,} bytes, "
                           f"{want:,} expected for {u.n:,} rows")
        if u.complete and not (u.path / "obs.parquet").is_file():
            out.append(f"{u.prefix}obs.parquet is missing")
    out += info["obs"].pop("unreadable")
    return out


def _in_order(specs: dict[str, Any], asked: list[str]) -> list[tuple[str, Any]]:
    """Layers in the order extraction was asked for (store.json keeps them sorted)."""
    order = [n for n in asked if n in specs] + sorted(n for n in specs if n not in asked)
    return [(n, specs[n]) for n in order]


def _model(meta: dict) -> dict[str, Any]:
    bundle = meta.get("bundle")
    out: dict[str, Any] = {"bundle": bundle,
                           "bundle_sha256": (meta.get("inputs") or {}).get("bundle_sha256")}
    try:
        recorded = json.loads((Path(bundle) / BUNDLE_META_FILE).read_text(encoding="utf-8"))
    except (OSError, TypeError, ValueError):
        out["found"] = False  # moved or deleted since: the fingerprint still identifies it
        return out
    out["found"] = True
    out["changed"] = bool(out["bundle_sha256"]) and bundle_fingerprint(bundle) != out[
        "bundle_sha256"]
    out["untrained"] = bool(recorded.get("untrained", False))
    source = recorded.get("source") if isinstance(recorded.get("source"), dict) else {}
    download = source.get("download") or {}
    out["source"] = (download.get("name") or
                     (f"{source['kind']} {source['path']}" if source.get("path") else None))
    out["deepvariant_version"] = recorded.get("deepvariant_version")
    return out


def _layer(store: Store, name: str, spec: dict) -> dict[str, Any]:
    files = [u.path / "layers" / f"{name}.bin" for u in _units(store)]
    found = [f.stat().st_size for f in files if f.is_file()]
    return {"name": name, "dim": spec.get("dim"), "pool": spec.get("pool"),
            "dtype": spec.get("dtype"), "map_shape": spec.get("map_shape"),
            "bytes": sum(found) if found or store.parts else None}


def _parquet_columns(path: Path, unreadable: list[str]) -> list[str]:
    if not path.is_file():
        return []
    try:
        return list(pq.read_schema(path).names)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        unreadable.append(f"{path.name} is unreadable ({exc})")
        return []


def _obs_columns(store: Store) -> dict[str, Any]:
    """obs columns by where they come from (schemas only, no rows read)."""
    unreadable: list[str] = []
    base = []
    for u in _units(store):
        parts = u.meta.get("obs_parts") or []
        if (u.path / "obs.parquet").is_file() and u.n:
            base = _parquet_columns(u.path / "obs.parquet", unreadable)
        elif parts:
            base = _parquet_columns(u.path / "obs" / parts[0], unreadable)
        if base:
            break
    base = [c for c in base if not c.startswith("__index")]
    annotations = [c for c in _parquet_columns(store.path / "annotations.parquet", unreadable)
                   if c not in base and not c.startswith("__index")]
    return {
        "unreadable": unreadable,
        "sites": [c for c in base if c in META_COLUMNS],
        "model": [c for c in base if c in MODEL_COLUMNS],
        "pileup": [c for c in base if c in ATTRIBUTES],
        "other": [c for c in base if c not in (*META_COLUMNS, *MODEL_COLUMNS, *ATTRIBUTES)],
        "annotations": annotations,
    }


def _run(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / "run.json").read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError(f"a JSON {type(meta).__name__}, not an object")
    except (OSError, ValueError) as exc:
        return {"name": path.name, "error": f"unreadable run.json ({exc})"}
    cluster = meta.get("cluster") or {}
    features = meta.get("features") or {}
    applied = meta.get("applied_from") or {}
    return {
        "name": path.name,
        "kind": meta.get("kind"),
        "layers": features.get("layers") or [],
        "clusters": len(cluster.get("sizes") or {}) or None,
        "level1": cluster.get("k") if cluster.get("nodes") else None,  # hierarchical
        "nodes": len(cluster.get("nodes") or []) or None,
        "umap": bool(meta.get("umap")),
        "n_fit": None if applied else meta.get("n_fit"),
        "backend": meta.get("backend"),
        "applied_from": (f"{applied.get('run')} of {applied.get('store')}" if applied
                         else None),
        "created": meta.get("created"),
    }


def _probes(directory: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(directory.glob("*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(doc, dict) or doc.get("format") != PROBES_FORMAT:
                continue
            table = doc.get("table") or []
            out.append({
                "name": path.stem,
                "concepts": sorted({r["concept"] for r in table}),
                "layers": list(dict.fromkeys(r["layer"] for r in table)),
                "baseline": bool((doc.get("params") or {}).get("baseline")),
                "created": doc.get("created"),
            })
        except (OSError, ValueError, KeyError, TypeError) as exc:
            out.append({"name": path.stem, "error": f"unreadable ({exc})"})
    return out


def _size(n_bytes: int | None) -> str:
    if n_bytes is None:
        return "missing"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n_bytes < 1000 or unit == "TB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1000
    raise AssertionError("unreachable")


def _list(items: list[str], most: int = 12) -> str:
    if not items:
        return "-"
    shown = ", ".join(items[:most])
    return shown + (f" (+{len(items) - most} more)" if len(items) > most else "")


def format_info(info: dict[str, Any]) -> str:
    """The human-readable summary ``dvprobe info`` prints."""
    lines = _state_lines(info)
    lines.append(_model_line(info["model"]))
    lines.append(_examples_line(info))
    lines.append(_extraction_line(info["extraction"]))
    lines += _layer_lines(info["layers"])
    lines += _obs_lines(info["obs"])
    lines += _run_lines(info["runs"])
    lines += _probe_lines(info["probes"])
    if info["set_aside"]:
        lines.append(f"set aside:  {_list(info['set_aside'])} (analyses of an earlier, "
                     "partial extraction)")
    return "\n".join(lines)


def _state_lines(info: dict[str, Any]) -> list[str]:
    """Complete or partial (and where it resumes), and any damage, said first."""
    if info["parts"]:
        lines = _parts_lines(info)
    elif info["complete"]:
        lines = [f"{info['path']}: complete STORE, {info['n']:,} examples"]
    else:
        c = info["cursor"] or {}
        shards = info["examples"]["files"] or []
        shard = int(c.get("shard", 0))
        where = (f"record {c.get('record', 0)} (0-based) of {Path(shards[shard]).name}"
                 if shard < len(shards) else "the end of the input")
        lines = [f"{info['path']}: PARTIAL STORE, {info['n']:,} examples committed; "
                 f"extraction resumes at {where} (rerun the same extract command, unless "
                 "one is still running)"]
    if info["damage"]:  # every other command refuses such a STORE: say so first
        lines[0] += "; DAMAGED:"
        lines[1:1] = [f"  {d}" for d in info["damage"]]
    return lines


#: a parted STORE's parts listed one per line up to this many; beyond, the unfinished ones
MAX_PART_LINES = 16


def _parts_lines(info: dict[str, Any]) -> list[str]:
    """A parted STORE: how many parts are done, each part's state, how to finish the rest."""
    parts = info["parts"]
    done = sum(p["state"] == "complete" for p in parts)
    if done == len(parts):
        head = (f"{info['path']}: complete STORE, {info['n']:,} examples in {len(parts)} "
                "parts (extract --task)")
    else:
        head = (f"{info['path']}: PARTIAL STORE in {len(parts)} parts (extract --task): "
                f"{done} complete, {info['n']:,} examples committed; it opens when every "
                "part is complete")
    shown = parts if len(parts) <= MAX_PART_LINES else [
        p for p in parts if p["state"] != "complete"][:MAX_PART_LINES]
    lines = [head, "parts:"]
    for p in shown:
        cursor = p["cursor"] or {}
        where = (f", resumes at shard {cursor.get('shard', 0)} record "
                 f"{cursor.get('record', 0)}" if p["state"] == "partial" and cursor else "")
        who = (f"; claimed by {p['writer']}; if that process is gone, delete {p['claim']}"
               if p.get("claim") else f"; {p['writer']} is writing it" if p["writer"] else "")
        lines.append(f"  {p['name']}  {p['state']:<8} {p['n']:>10,} examples{where}{who}")
    if len(shown) < len(parts):
        lines.append(f"  ... and {len(parts) - len(shown)} more ({done} complete in all)")
    todo = [p for p in parts if p["state"] != "complete" and (p.get("claim")
                                                              or not p["writer"])]
    if todo:
        others = ", ".join(str(p["index"]) for p in todo[1:8]) + (
            ", ..." if len(todo) > 8 else "")
        lines.append(f"  finish with: {todo[0]['command']}"
                     + (f" (and likewise --task {others})" if others else ""))
    return lines


def _model_line(mo: dict[str, Any]) -> str:
    sha = (mo.get("bundle_sha256") or "")[:12] or "?"
    if not mo.get("bundle"):
        return "model:      not recorded (a STORE not written by dvprobe extract)"
    if mo.get("found") and mo.get("changed"):
        return (f"model:      {mo['bundle']} has changed since: its bundle.json is not the "
                f"one that made this STORE ({sha}); the model there now is another one")
    if mo.get("found"):
        what = "untrained reference model" if mo.get("untrained") else (
            mo.get("source") or "converted model")
        version = f", DeepVariant {mo['deepvariant_version']}" if mo.get(
            "deepvariant_version") else ""
        return f"model:      {mo['bundle']} ({what}{version}; bundle.json {sha})"
    return f"model:      {mo.get('bundle')} (not found there now; bundle.json {sha})"


def _examples_line(info: dict[str, Any]) -> str:
    ex = info["examples"]
    if not ex["spec"]:
        return "examples:   not recorded"
    shape = "x".join(str(v) for v in ex["input_shape"] or []) or "?"
    picked = []
    if ex["limit"] is not None:
        picked.append(f"first {ex['limit']:,} records")
    if ex.get("regions"):
        given = " ".join(ex["regions"].get("given") or []) or "?"
        picked.append(f"overlapping {given} ({ex['regions']['intervals']} interval(s))")
    if ex["sample"]:
        picked.append(f"a {ex['sample']['fraction']:g} sample (seed {ex['sample']['seed']})")
    if (ex["sample"] or ex.get("regions")) and ex["records_read"]:
        picked.append(f"{info['n']:,} kept of {ex['records_read']:,} records read")
    line = (f"examples:   {ex['spec']} ({ex['shards']} file(s), {_size(ex['bytes'])}; "
            f"{shape}, channels {_list([str(c) for c in ex['channels'] or []])}"
            + (f"; {'; '.join(picked)}" if picked else "") + ")")
    return line + _small_model_line(ex.get("small_model"))


def _small_model_line(small: dict[str, Any] | None) -> str:
    """DeepVariant's small model, when the inputs said anything about it at extraction."""
    if not small:
        return ""
    said = [small["summary"]] if small.get("summary") else []
    if small.get("flags"):
        said.append("model flags_for_calling: " + ", ".join(
            f"{k}={v}" for k, v in sorted(small["flags"].items())))
    return "".join(f"\n            {s}" for s in said)


def _extraction_line(e: dict[str, Any]) -> str:
    if not e.get("device"):
        return (f"extraction: not finished ({e.get('dtype') or '?'}"
                + (f"; {e['skipped']} corrupt records skipped so far" if e["skipped"]
                   else "") + ")")
    engine = e.get("engine", "?")
    if e.get("engine_requested") and e["engine_requested"] != engine:
        engine += f" (by {e['engine_requested']})"
    if e.get("engine_fallback"):
        engine += f", fell back to eager: {e['engine_fallback']}"
    return (f"extraction: {e['device']}, {e.get('dtype')}, engine {engine}, batch "
            f"{e.get('batch_size')}, {e.get('examples_per_s')} ex/s over "
            f"{e.get('seconds')} s "
            + (f"(the {e['parts']} parts' last runs, rates summed)" if e.get("parts")
               else "(last run)") + f", torch {e.get('torch')}"
            + (f"; {e['skipped']} corrupt records skipped" if e["skipped"] else ""))


def _layer_lines(layers: list[dict[str, Any]]) -> list[str]:
    lines = ["layers:"]
    for la in layers:
        shape = "x".join(str(v) for v in la["map_shape"] or []) or "?"
        how = f"{la['pool']}-pooled from {shape}" if la["pool"] and la["pool"] != "flatten" \
            else (f"flattened {shape}" if la["pool"] == "flatten" else "a vector")
        lines.append(f"  {la['name']:<10} {la['dim']:>6} x {la['dtype']:<8} {how:<32} "
                     f"{_size(la['bytes'])}")
    return lines


def _obs_lines(o: dict[str, Any]) -> list[str]:
    return [f"obs:        sites: {_list(o['sites'], 16)}",
            f"            model: {_list(o['model'])}; pileup: {_list(o['pileup'])}"
            + (f"; other: {_list(o['other'])}" if o["other"] else ""),
            f"            annotations: {_list(o['annotations'])}"]


def _run_lines(runs: list[dict[str, Any]]) -> list[str]:
    lines = [f"runs ({len(runs)}):" if runs else "runs:       none"]
    for r in runs:
        if "error" in r:
            lines.append(f"  {r['name']}: {r['error']}")
            continue
        parts = [r["kind"] or "?"]
        if r["layers"]:
            parts.append("+".join(r["layers"]))
        if r.get("nodes"):
            parts.append(f"{r['level1']} clusters, then {r['nodes']}")
        elif r.get("clusters"):
            parts.append(f"{r['clusters']} clusters")
        if r.get("umap"):
            parts.append("UMAP")
        if r.get("n_fit") is not None:
            parts.append(f"fitted on {r['n_fit']:,}")
        if r.get("applied_from"):
            parts.append(f"applied from {r['applied_from']}")
        made = ", ".join(x for x in (r.get("backend"), r.get("created")) if x)
        lines.append(f"  {r['name']}: {', '.join(parts)}" + (f" ({made})" if made else ""))
    return lines


def _probe_lines(probes: list[dict[str, Any]]) -> list[str]:
    lines = [f"probes ({len(probes)}):" if probes else "probes:     none"]
    for p in probes:
        if "error" in p:
            lines.append(f"  {p['name']}: {p['error']}")
            continue
        lines.append(f"  {p['name']}: {_list(p['concepts'], 8)} over {len(p['layers'])} "
                     f"layer(s)" + (", with a baseline" if p["baseline"] else "")
                     + f" ({p.get('created') or '?'})")
    return lines


__all__ = ["store_info", "format_info"]
