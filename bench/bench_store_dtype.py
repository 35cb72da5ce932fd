"""What storing pooled layers as float16 or bfloat16 loses against float32, on a real STORE.

    .venv/bin/python bench/bench_store_dtype.py --store dvprobe-demo/store
    .venv/bin/python bench/bench_store_dtype.py --store S --codecs lz4-bitshuffle zstd1

Why: ``--store-dtype`` halves a STORE (the blog's six layers are ~27 kB an example in
float32, ~160 GB a genome). Whether that is safe depends on what the analyses see, so for
every layer of the STORE (``dvprobe demo``'s six by default) this prints:

* ``max rel``: the largest ``|a - b| / |a|`` over the elements with ``|a| >= floor``, where
  ``a`` is the float32 value, ``b`` its float16 / bfloat16 copy read back as float32 and
  ``floor = 1e-4 * max|a|`` of the layer (smaller elements are left out of this maximum:
  any format's relative error grows without bound near zero, and float16 goes subnormal
  below 6.1e-5); round-to-nearest bounds it by 2^-11 = 4.9e-4 (float16) and 2^-8 = 3.9e-3
  (bfloat16). Every element, the small ones included, is in the next two figures;
* ``rel frob``: ``||a - b||_F / ||a||_F`` over the whole layer;
* ``min cos``: the smallest cosine between an example's float32 row and its copy;
* ``overflow``: elements beyond float16's range (65,504), which become inf;
* ``moved``: examples whose cluster changes when the float32 k-means (its PCA and centres,
  not refitted: ``probing.analysis.apply``) assigns the cast rows: the loss itself, free
  of k-means finding another optimum (the float32 rows through their own model move none:
  checked and printed);
* ``ARI``: the adjusted Rand index between dvprobe's own k-means
  (``probing.analysis.kmeans``: k = 10 on PCA-50, seed 0, the demo's settings) on the
  float32 STORE and on a copy whose layer holds the cast values; beside it the ARI of
  float32 k-means with seed 0 against seed 1, the agreement k-means itself reaches when
  nothing but its start changes.

Then the disk for one million examples of the blog's six pooled layers (mixed1, 3, 5, 7, 9,
10: 6,688 values an example) in each dtype, raw and with each of ``--codecs`` (Zarr chunks
of 4,096 rows; the ratio measured on the STORE's own rows, cast to the dtype).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_store_format import machine, stored_bytes  # noqa: E402

from probing.demo import DEMO_LAYERS  # noqa: E402
from probing.store import open_store  # noqa: E402

DTYPES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
BLOG_DIMS = {"mixed1": 288, "mixed3": 768, "mixed5": 768, "mixed7": 768, "mixed9": 2048,
             "mixed10": 2048}
FLOOR = 1e-4


def cast_back(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``a`` stored as ``dtype`` and read back as float32 (what analyses would see)."""
    return a.astype(dtype).astype(np.float32)


def errors(a: np.ndarray, b: np.ndarray) -> dict:
    """The loss figures of one layer (see the module docstring for their definitions)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    finite = np.isfinite(b64)
    big = np.abs(a64) >= FLOOR * np.abs(a64).max()
    rel = np.abs(a64 - b64)[big & finite] / np.abs(a64)[big & finite]
    diff = np.where(finite, a64 - b64, 0.0)
    na, nb = np.linalg.norm(a64, axis=1), np.linalg.norm(np.where(finite, b64, 0.0), axis=1)
    ok = (na > 0) & (nb > 0)
    cos = (a64 * np.where(finite, b64, 0.0)).sum(axis=1)[ok] / (na[ok] * nb[ok])
    return {"max_rel": float(rel.max()) if rel.size else 0.0,
            "rel_frob": float(np.linalg.norm(diff) / np.linalg.norm(a64)),
            "min_cos": float(cos.min()) if cos.size else 1.0,
            "below_floor": float(1 - big.mean()),
            "overflow": int((~finite).sum()),
            "max_abs": float(np.abs(a64).max())}


def copy_with(store_path: Path, out: Path, layers: dict[str, np.ndarray]) -> Path:
    """A STORE at ``out`` with ``store_path``'s rows and these layer values (float32)."""
    store = open_store(store_path)
    (out / "layers").mkdir(parents=True)
    meta = dict(store.meta)
    meta["layers"] = {name: store.meta["layers"][name] for name in layers}
    (out / "store.json").write_text(json.dumps(meta))
    shutil.copy(store_path / "obs.parquet", out / "obs.parquet")
    for name, a in layers.items():
        np.ascontiguousarray(a, dtype=np.float32).tofile(out / "layers" / f"{name}.bin")
    return out


def run_name(layer: str, seed: int) -> str:
    return f"bench-km-{layer}-{seed}"


def kmeans_labels(path: Path, layer: str, seed: int) -> np.ndarray:
    """dvprobe's own k-means of ``layer`` (the demo's settings), labels in STORE order."""
    from probing import analysis as pa

    run = pa.kmeans(open_store(path), layer, k=10, pca=50, seed=seed, backend="sklearn",
                    run=run_name(layer, seed))
    return run.obs["cluster"].to_numpy()


def applied_labels(base: Path, layer: str, target: Path) -> np.ndarray:
    """``target``'s rows through the k-means fitted on ``base`` (its PCA and centres, no
    refit): labels in STORE order."""
    from probing import analysis as pa

    return pa.apply(base, run_name(layer, 0), target, backend="sklearn").run.obs[
        "cluster"].to_numpy()


def ari(x: np.ndarray, y: np.ndarray) -> float:
    from sklearn.metrics import adjusted_rand_score

    return round(float(adjusted_rand_score(x, y)), 4)


def loss_table(store_path: Path, layers: list[str], work: Path) -> list[dict]:
    store = open_store(store_path)
    full = {name: np.array(store.layer(name), dtype=np.float32) for name in layers}
    base = copy_with(store_path, work / "float32", full)
    rows = []
    for name in layers:
        ref = kmeans_labels(base, name, 0)
        row = {"layer": name, "dim": full[name].shape[1],
               "ari_seed0_vs_seed1": ari(ref, kmeans_labels(base, name, 1)),
               "moved_float32_itself": int((applied_labels(base, name, base) != ref).sum())}
        for dname, dtype in DTYPES.items():
            b = cast_back(full[name], dtype)
            row[dname] = errors(full[name], b)
            copy = copy_with(store_path, work / f"{dname}-{name}", {name: b})
            row[dname]["ari"] = ari(ref, kmeans_labels(copy, name, 0))
            row[dname]["moved"] = int((applied_labels(base, name, copy) != ref).sum())
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def disk_table(store_path: Path, codecs: list[str]) -> list[dict]:
    """GB per million examples of the blog's six layers, per dtype and codec."""
    store = open_store(store_path)
    have = [n for n in BLOG_DIMS if n in store.layers]
    full = {n: np.array(store.layer(n), dtype=np.float32) for n in have}
    out = []
    for dname, dtype in {"float32": np.dtype(np.float32), **DTYPES}.items():
        raw_per_example = sum(BLOG_DIMS.values()) * dtype.itemsize
        row = {"dtype": dname, "raw_GB_per_M": round(raw_per_example * 1e6 / 1e9, 2)}
        for codec in codecs:
            cast = {n: a.astype(dtype) for n, a in full.items()}
            ratio = sum(a.nbytes for a in cast.values()) / sum(
                stored_bytes(a, codec) for a in cast.values())
            row[f"{codec}_ratio"] = round(ratio, 3)
            row[f"{codec}_GB_per_M"] = round(raw_per_example * 1e6 / 1e9 / ratio, 2)
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def print_tables(loss: list[dict], disk: list[dict], codecs: list[str]) -> None:
    print("\n| layer | dim | dtype | max rel | rel frob | min cos | overflow | moved "
          "| ARI refit vs fp32 | ARI fp32 seed 0 vs 1 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in loss:
        for d in DTYPES:
            e = r[d]
            print(f"| {r['layer']} | {r['dim']} | {d} | {e['max_rel']:.2e} | "
                  f"{e['rel_frob']:.2e} | {e['min_cos']:.6f} | {e['overflow']} | "
                  f"{e['moved']} | {e['ari']:.4f} | {r['ari_seed0_vs_seed1']:.4f} |")
    print("\n| dtype | raw GB / 1M examples | "
          + " | ".join(f"{c} GB / 1M (ratio)" for c in codecs) + " |")
    print("|---|---|" + "---|" * len(codecs))
    for r in disk:
        print(f"| {r['dtype']} | {r['raw_GB_per_M']} | " + " | ".join(
            f"{r[f'{c}_GB_per_M']} ({r[f'{c}_ratio']})" for c in codecs) + " |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, required=True,
                    help="a float32 STORE (dvprobe demo's: OUT/store)")
    ap.add_argument("--layers", nargs="+", default=list(DEMO_LAYERS))
    ap.add_argument("--codecs", nargs="+", default=["lz4-bitshuffle", "zstd1"])
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)
    info = machine()
    print(json.dumps(info))
    store = open_store(args.store)
    bad = [n for n in args.layers if store.layer_specs.get(n) is None
           or store.layer_specs[n].dtype != "float32"]
    if bad:
        raise SystemExit(f"{args.store}: layer(s) {bad} missing or not float32")
    print(f"STORE {args.store}: {store.n:,} examples; layers {args.layers}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-store-dtype-"))
    try:
        loss = loss_table(args.store, args.layers, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    disk = disk_table(args.store, args.codecs)
    print_tables(loss, disk, args.codecs)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "store": str(args.store),
                                         "loss": loss, "disk": disk}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
