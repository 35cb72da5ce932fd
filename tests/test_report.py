"""The offline report (opened in headless Chromium) and the pileup renderer.

The browser test is the real acceptance check: every Vega view must render (the page sets
``data-rendered`` / ``data-failed`` when each ``vegaEmbed`` promise settles), the console
must stay silent, no request may leave the machine for a host the page mentions or a CDN
(Chromium's net-log is inspected), and the screenshot must not be blank. It skips, with
the reason, where Chromium is not installed (``scripts/test.sh`` installs it in CI).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from probing import enrich as en
from probing import report as rp
from probing import show as sh
from probing.examples import encode_example, write_example_info
from probing.probe import ProbeResult, save_probes
from probing.store import LayerSpec, StoreError, StoreWriter, open_store
from probing.tfrecord import write_records

REPO = Path(__file__).resolve().parents[1]
CHANNELS = [1, 2, 3, 4, 5, 6, 19]


def pileup(i: int, rng) -> np.ndarray:
    """A cheap, compressible, pileup-like image: ref band, read rows, a variant column."""
    img = np.zeros((100, 221, 7), np.uint8)
    depth = 20 + i % 40
    img[:5] = [250, 254, 254, 70, 152, 50, 254]
    bases = rng.choice([250, 180, 100, 30], size=221).astype(np.uint8)
    img[5:5 + depth, :, 0] = bases
    img[5:5 + depth, :, 1] = 200
    img[5:5 + depth, :, 2] = (254 if i % 3 else 120)
    img[5:5 + depth, :, 3] = np.where(np.arange(depth) % 2, 70, 240)[:, None]
    img[5:5 + depth, :, 4] = 152
    img[5:5 + depth, :, 5] = 50
    img[5:5 + depth, :, 6] = 90
    alt_rows = np.arange(5, 5 + depth)[:: 2]
    img[alt_rows, 110, 0], img[alt_rows, 110, 4], img[alt_rows, 110, 5] = 30, 254, 254
    return img


def build_store(root: Path, n: int = 300, k: int = 5):
    """STORE with real source records, annotations, a k-means run and a multi-layer run."""
    rng = np.random.default_rng(7)
    root.mkdir(parents=True, exist_ok=True)
    shard = root / "examples.tfrecord.gz"
    rows, payloads = [], []
    for i in range(n):
        pos = 10_000 + 97 * i
        label = int(i % 3)
        payloads.append(encode_example(pileup(i, rng), chrom="chr20", start=pos, end=pos + 1,
                                       ref="A", alts=["C"], alt_allele_indices=[0],
                                       label=label))
        p = rng.dirichlet([1, 1, 1])
        rows.append({"key": f"chr20:{pos}:A>C:0", "shard": 0, "record": i, "chrom": "chr20",
                     "pos": pos, "end": pos + 1, "ref": "A", "alt": "C",
                     "alt_allele_indices": "0", "locus": f"chr20:{pos + 1}-{pos + 1}",
                     "variant_type": 1, "label": label, "p_hom_ref": p[0], "p_het": p[1],
                     "p_hom_alt": p[2], "pred_genotype": int(p.argmax()),
                     "depth": float(20 + i % 40), "mean_mapq": float(rng.uniform(10, 60)),
                     "alt_fraction": float(rng.uniform())})
    write_records(shard, payloads)
    write_example_info(shard, shape=[100, 221, 7], channels=CHANNELS, version="1.6.1")
    w = StoreWriter.open(root / "store", {"inputs": {}, "shards": [str(shard)],
                                          "channels": CHANNELS, "input_shape": [100, 221, 7]},
                         [LayerSpec("mixed5", 2)])
    obs = pd.DataFrame(rows)
    obs["label"] = pd.array(obs["label"], dtype="Int64")
    w.append(obs, {"mixed5": np.zeros((n, 2), np.float32)})
    s = w.finalize()
    cl = np.arange(n) % k
    centres = np.c_[np.cos(cl * 1.3) * 8, np.sin(cl * 1.3) * 8]
    umap = (centres + rng.normal(size=(n, 2))).astype(np.float32)
    s.add_obs({"rmsk_LINE": (cl == 2) | (rng.uniform(size=n) < 0.08),
               "mosaic": np.isin(np.arange(n), np.arange(3, 3 + 5 * 8, 5))})
    s.save_run("kmeans5-mixed5", meta={"kind": "kmeans", "features": {"layers": ["mixed5"]}},
               obs=pd.DataFrame({"key": obs["key"], "cluster": cl, "level1": cl // 2}),
               arrays={"umap": umap})
    s.save_run("multilayer6-layers", meta={"kind": "multilayer",
                                           "features": {"layers": ["mixed3", "mixed5"]}},
               obs=pd.DataFrame({"key": obs["key"], "cluster": (cl + (np.arange(n) % 2)) % 6}),
               arrays={"umap": umap[:, ::-1].copy()})
    layers = ["mixed1", "mixed5", "mixed10"]
    table = pd.DataFrame([
        {"layer": layer, "concept": c, "metric": m, "mean": v + 0.02 * i, "sd": 0.01,
         "folds": 5, "n": n, "n_with": k}
        for i, layer in enumerate(layers)
        for c, m, v, k in (("rmsk_LINE", "AUROC", 0.8, 70), ("mosaic", "AUROC", 0.6, 8),
                           ("depth", "R2", 0.9, None))])
    table = table.assign(baseline_mean=table["mean"] - 0.1, baseline_sd=0.02, gain=0.1)
    save_probes(s, ProbeResult(table=table, n_rows=n, n_store=n, folds=5, block_bp=1_000_000,
                               pca=50, seed=0, baseline="untrained.store"), "probes")
    return s


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("report"))


def _png_gray(data: bytes) -> np.ndarray:
    """Decode the filter-0 grayscale PNGs :func:`probing.show.png_bytes` writes."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, w, h = 8, b"", 0, 0
    while pos < len(data):
        (ln,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + ln]
        assert zlib.crc32(tag + body) & 0xFFFFFFFF == struct.unpack(
            ">I", data[pos + 8 + ln:pos + 12 + ln])[0]
        if tag == b"IHDR":
            w, h, depth, color = struct.unpack(">IIBB", body[:10])
            assert (depth, color) == (8, 0)
        elif tag == b"IDAT":
            idat += body
        pos += 12 + ln
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, w + 1)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:]


def test_png_roundtrip():
    a = np.random.default_rng(0).integers(0, 256, (37, 53), dtype=np.uint8)
    np.testing.assert_array_equal(_png_gray(sh.png_bytes(a)), a)


def test_report_static(store, tmp_path):
    res = rp.build_report(store, tmp_path / "r.html", max_points=120, thumbnails=12,
                          export_dir=tmp_path / "exp", continuous=["depth"])
    page = (tmp_path / "r.html").read_text()
    assert res.n_points == 120 and res.n_thumbnails == 12
    assert "120 of 300 examples plotted (40.00%" in page
    # every mosaic row survives subsampling
    pts = json.loads(re.search(r"const POINTS = (\[.*?\]);\n", page).group(1))
    mosaic_rows = set(np.flatnonzero(store.obs["mosaic"].to_numpy()).tolist())
    assert mosaic_rows <= {p["row"] for p in pts} and len(pts) == 120
    assert sum(p["pileup"] for p in pts) == 12
    # offline: no external script, only inert URLs (namespaces, the bundle's comments)
    assert not re.search(r"<script[^>]*\bsrc=", page)
    assert "default-src 'none'" in page
    for url in set(re.findall(r"https?://[^\s\"'<>)\\]+", page)):
        assert urlparse(url).netloc in {"www.w3.org", "github.com", "vega.github.io"}, url
    assert "editor: false" in page  # vega-embed's only link out is disabled
    # figures asked for: cluster, level1, attribute UMAPs, share bars, multilayer crosstab
    titles = "\n".join(res.figures)
    for t in ("kmeans5-mixed5: UMAP by cluster", "kmeans5-mixed5: UMAP by level1",
              "kmeans5-mixed5: share of rmsk_LINE per cluster", "kmeans5-mixed5: UMAP, mosaic",
              "multilayer6-layers vs kmeans5-mixed5", "kmeans5-mixed5: depth per cluster",
              "probes: concepts across layers"):
        assert t in titles
    assert "runs:\nkmeans5-mixed5, multilayer6-layers; linear probes." in page
    # how the STORE was made travels with the report (dvprobe info's summary)
    assert re.search(r'<details class="note" id="provenance">.*?complete STORE, 300 examples'
                     r'.*?kmeans5-mixed5: kmeans, mixed5', page, re.S)
    assert "rmsk_LINE: best mixed10 (AUROC 0.840); over the baseline at mixed10: +0.100" in page
    assert page.count("data:image/png;base64,") == 12 * 7
    assert "mosaic: 8/8 in cluster 3" in page  # landing summary (rows 3, 8, ... 38 -> 3)
    pngs = sorted((tmp_path / "exp").glob("*.png"))
    assert len(pngs) == len(res.figures) and len(list((tmp_path / "exp").glob("*.svg"))) == len(
        res.figures)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_report_projection(store, tmp_path):
    """A run made by apply is drawn over the source run's UMAP, with a landing line."""
    rng = np.random.default_rng(1)
    n = 42
    w = StoreWriter.open(tmp_path / "mosaic", {"inputs": {}}, [LayerSpec("mixed5", 2)])
    w.append(pd.DataFrame({"key": [f"chr1:{i}:A>G:0" for i in range(n)], "chrom": "chr1",
                           "pos": np.arange(n), "end": np.arange(n) + 1}),
             {"mixed5": np.zeros((n, 2), np.float32)})
    t = w.finalize()
    cl = np.r_[np.full(41, 3), [1]]
    t.save_run("kmeans5-mixed5-applied", meta={
        "kind": "kmeans", "applied_from": {"store": str(store.path), "run": "kmeans5-mixed5"}},
        obs=pd.DataFrame({"cluster": cl}), arrays={"umap": rng.normal(size=(n, 2))})
    res = rp.build_report(t, tmp_path / "p.html", thumbnails=0)
    page = (tmp_path / "p.html").read_text()
    assert "kmeans5-mixed5-applied: projection" in res.figures
    assert "applied set: 41/42 in cluster 3 (1 in 1)" in page


def test_report_projection_over_a_large_source_umap(tmp_path):
    """The README flow on a real-sized STORE: a source UMAP above altair's 5,000-row limit."""
    n = 6000
    rng = np.random.default_rng(2)
    w = StoreWriter.open(tmp_path / "big", {"inputs": {}}, [LayerSpec("mixed5", 2)])
    w.append(pd.DataFrame({"key": [f"k{i}" for i in range(n)]}),
             {"mixed5": np.zeros((n, 2), np.float32)})
    w.finalize().save_run("src", meta={"kind": "kmeans"},
                          obs=pd.DataFrame({"cluster": np.arange(n) % 4}),
                          arrays={"umap": rng.normal(size=(n, 2))})
    w = StoreWriter.open(tmp_path / "new", {"inputs": {}}, [LayerSpec("mixed5", 2)])
    w.append(pd.DataFrame({"key": ["a", "b"]}), {"mixed5": np.zeros((2, 2), np.float32)})
    t = w.finalize()
    t.save_run("src-applied", meta={"kind": "kmeans", "applied_from": {
        "store": str(tmp_path / "big"), "run": "src"}},
        obs=pd.DataFrame({"cluster": [1, 2]}), arrays={"umap": rng.normal(size=(2, 2))})
    res = rp.build_report(t, tmp_path / "p.html", thumbnails=0)
    assert "src-applied: projection" in res.figures
    assert not [w for w in res.warnings if "projection" in w]


def test_report_without_runs_errors(tmp_path):
    w = StoreWriter.open(tmp_path / "s", {"inputs": {}}, [LayerSpec("mixed5", 2)])
    w.append(pd.DataFrame({"key": ["a"]}), {"mixed5": np.zeros((1, 2), np.float32)})
    s = w.finalize()
    with pytest.raises(rp.ReportError, match="no analysis run .* and no saved probes"):
        rp.build_report(s, tmp_path / "x.html")
    # saved probes alone make a report (probing needs no clustering)
    table = pd.DataFrame([{"layer": "mixed5", "concept": "x", "metric": "AUROC", "mean": 0.7,
                           "sd": 0.01, "folds": 5, "n": 1, "n_with": 1}])
    save_probes(s, ProbeResult(table, 1, 1, 5, 1_000_000, 50, 0), "only")
    res = rp.build_report(s, tmp_path / "x.html")
    assert res.figures == ["only: concepts across layers"]


def test_report_on_a_partial_store_says_so_once(tmp_path):
    n = 40
    w = StoreWriter.open(tmp_path / "s", {"inputs": {}}, [LayerSpec("mixed5", 2)])
    w.append(pd.DataFrame({"key": [f"k{i}" for i in range(n)], "flag": np.arange(n) < 5}),
             {"mixed5": np.zeros((n, 2), np.float32)})
    s = open_store(tmp_path / "s")  # extraction stopped: never finalised
    for run in ("a", "b"):  # every run is enriched; the warning must still come once
        s.save_run(run, meta={"kind": "kmeans"},
                   obs=pd.DataFrame({"cluster": np.arange(n) % 3}),
                   arrays={"umap": np.random.default_rng(0).normal(size=(n, 2))})
    res = rp.build_report(s, tmp_path / "r.html", thumbnails=0)
    partial = [w for w in res.warnings if "partial STORE" in w]
    assert partial == [f"{s.path}: partial STORE ({n} examples): extraction did not finish; "
                       "results cover only these rows (rerun `dvprobe extract` with the same "
                       "arguments to complete it)"]
    assert "partial STORE" in (tmp_path / "r.html").read_text()


# -- headless Chromium ---------------------------------------------------------------------

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"),
                             "/usr/bin/chromium") if p and os.path.exists(p)), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium not installed (apt-get install chromium; "
    "scripts/test.sh does this in CI)")


def _chromium(url: str, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={tmp / 'profile'}", "--hide-scrollbars",
            "--enable-logging=stderr", "--v=0", "--virtual-time-budget=20000",
            "--window-size=1400,2400", *extra, url]
    return subprocess.run(args, capture_output=True, text=True, timeout=180)


@needs_chromium
def test_report_in_chromium(store, tmp_path):
    res = rp.build_report(store, tmp_path / "report.html", max_points=300, thumbnails=20)
    page = (tmp_path / "report.html").read_text()
    url = (tmp_path / "report.html").as_uri()

    netlog = tmp_path / "net.json"
    dom = _chromium(url, tmp_path, "--dump-dom", f"--log-net-log={netlog}")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    n = len(res.figures)
    assert f'data-rendered="{n}"' in html and 'data-failed="0"' in html, \
        re.findall(r'id="(?:render-status|errors)"[^<]*<', html)
    assert f"rendered {n}/{n} figures" in html
    assert html.count("<canvas") >= n  # every view drew into its canvas
    assert 'alt="1 read_base"' in html and 'alt="19 insert_size"' in html  # pileup panel
    console = [ln for ln in dom.stderr.splitlines() if "CONSOLE" in ln]
    assert not console, console

    # No request from the page: nothing to a host the page text names or to a JS CDN.
    page_hosts = {urlparse(u).netloc for u in re.findall(r"https?://[^\s\"'<>)\\]+", page)}
    banned = page_hosts | {"cdn.jsdelivr.net", "unpkg.com", "vega.github.io"}
    requested = set(re.findall(r'"url":"(https?://[^"]+)"', netlog.read_text()))
    assert not {u for u in requested if urlparse(u).netloc in banned}, requested

    shot = tmp_path / "shot.png"
    r = _chromium(url, tmp_path, f"--screenshot={shot}")
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    image = pytest.importorskip("PIL.Image", reason="Pillow needed to decode the screenshot")
    with image.open(shot) as im:
        px = np.asarray(im.convert("RGB"), dtype=np.float32)
    assert px.shape == (2400, 1400, 3)
    assert px.std() > 20, "screenshot looks blank"
    assert (px.min(axis=2) < 200).mean() > 0.02  # enough non-white: plots were drawn
    target = REPO / "docs" / "report-screenshot.png"
    if os.environ.get("DVPROBE_UPDATE_SCREENSHOT") or not target.exists():
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, target)


# -- show ----------------------------------------------------------------------------------


def test_show_from_examples_and_store(store, tmp_path):
    shard = Path(store.meta["shards"][0])
    out = sh.show(str(shard), locus="chr20:10098", out=tmp_path / "a.png")  # row 1, 1-based
    assert len(out) == 1 and out[0].example.start == 10_097
    assert out[0].path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = sh.show(store=store.path, key="chr20:10194:A>C:0", out=tmp_path / "b.svg")
    text = svg[0].path.read_text()
    assert "read_base" in text and "insert_size" in text and "chr20:10195-10195" in text
    # the 0-based position (as in keys and obs 'pos') misses, and the error points at it
    with pytest.raises(sh.ShowError, match=r"no example at chr20:10097 \(position = 1-based "
                       r".*obs 'pos' \+ 1\); nearest: chr20:10098 \(key chr20:10097:"):
        sh.show(str(shard), locus="chr20:10097", out=tmp_path / "c.png")
    # a range that is not an example's exact span: the examples starting inside it
    inside = sh.show(str(shard), locus="chr20:10090-10100", out=tmp_path / "d.png")
    assert [s.example.start for s in inside] == [10_097]
    with pytest.raises(sh.ShowError, match="END before START"):
        sh.show(str(shard), locus="chr20:10100-10090", out=tmp_path / "e.png")
    with pytest.raises(sh.ShowError, match="--scale must be in"):
        sh.show(str(shard), locus="chr20:10098", out=tmp_path / "f.png", scale=0)


def test_store_rows_reread_exactly(store):
    exs = sh.read_store_examples(store, [0, 7, 299])
    shard = Path(store.meta["shards"][0])
    from probing.examples import read_examples

    want = {i: np.array(e.image) for i, e in enumerate(read_examples(shard)) if i in (0, 7, 299)}
    for r, ex in exs.items():
        assert ex.key == store.obs["key"].iat[r]
        np.testing.assert_array_equal(ex.image, want[r])
        labelled = dict(sh.channel_images(ex.image, CHANNELS))
        np.testing.assert_array_equal(_png_gray(sh.png_bytes(labelled["5 read_supports_variant"])),
                                      want[r][:, :, 4])


def test_moved_examples_are_reported(store, tmp_path):
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copyfile(store.meta["shards"][0], moved / "renamed.tfrecord.gz")
    with pytest.raises(sh.ShowError, match=r"lacks shard\(s\) \['examples.tfrecord.gz'\]"):
        sh.read_store_examples(store, [0], examples=str(moved / "*.gz"))
    shutil.move(moved / "renamed.tfrecord.gz", moved / "examples.tfrecord.gz")
    ex = sh.read_store_examples(store, [5], examples=str(moved / "*.gz"))[5]
    assert ex.path == str(moved / "examples.tfrecord.gz")


def test_cli_report_and_show(store, tmp_path):
    from probing.commands_annotate import register

    app = typer.Typer()
    register(app)
    r = CliRunner().invoke(app, ["report", str(store.path), "--out", str(tmp_path / "r.html"),
                                 "--max-points", "50", "--thumbnails", "3"])
    assert r.exit_code == 0, r.output
    assert "50/300 points plotted (16.7%), 3 pileup thumbnails" in r.output
    r = CliRunner().invoke(app, ["show", "--store", str(store.path), "--key",
                                 "chr20:10000:A>C:0", "--out", str(tmp_path / "s.png")])
    assert r.exit_code == 0 and "chr20:10001-10001  A>C  label hom-ref (0)" in r.output
    assert open_store(store.path).n == 300


def test_report_refuses_missing_or_non_numeric_continuous(store, tmp_path):
    """A misspelt --continuous used to be dropped silently (enrich refused it)."""
    with pytest.raises(en.EnrichmentError, match=r"no continuous column\(s\) \['bogus'\]"):
        rp.build_report(store, tmp_path / "b.html", continuous=["bogus"], thumbnails=0)
    with pytest.raises(en.EnrichmentError, match=r"^--continuous key: not numeric"):
        rp.build_report(store, tmp_path / "k.html", continuous=["key"], thumbnails=0)
    assert not (tmp_path / "b.html").exists()


# -- runs are joined to the STORE by key; where moved examples are given --------------------

def _small_store(path: Path, n: int = 40, shards: list[str] | None = None):
    w = StoreWriter.open(path, {"inputs": {}, "shards": shards or []}, [LayerSpec("mixed5", 2)])
    w.append(pd.DataFrame({"key": [f"k{i}" for i in range(n)], "shard": 0,
                           "record": np.arange(n), "flag": np.arange(n) < 5}),
             {"mixed5": np.zeros((n, 2), np.float32)})
    return w.finalize()


def _page_without_time(path: Path) -> str:
    return re.sub(r"Generated [^.]*\.", "Generated .", path.read_text())


def test_a_run_in_another_order_gives_the_same_report(tmp_path):
    s = _small_store(tmp_path / "s")
    rng = np.random.default_rng(4)
    obs = pd.DataFrame({"key": s.obs["key"], "cluster": np.arange(s.n) % 3})
    umap = rng.normal(size=(s.n, 2))
    s.save_run("a", meta={"kind": "kmeans"}, obs=obs, arrays={"umap": umap})
    rp.build_report(s, tmp_path / "in-order.html", thumbnails=0, max_points=30)
    order = rng.permutation(s.n)
    s.save_run("a", meta={"kind": "kmeans"}, obs=obs.iloc[order], arrays={"umap": umap[order]})
    rp.build_report(s, tmp_path / "shuffled.html", thumbnails=0, max_points=30)
    assert _page_without_time(tmp_path / "shuffled.html") == \
        _page_without_time(tmp_path / "in-order.html")


def test_a_run_of_other_examples_is_refused(tmp_path):
    s = _small_store(tmp_path / "s")
    other = _small_store(tmp_path / "other", n=41)
    other.save_run("foreign", meta={"kind": "kmeans"},
                   obs=pd.DataFrame({"cluster": np.arange(41) % 3}),
                   arrays={"umap": np.zeros((41, 2))})
    (s.path / "runs").mkdir()
    shutil.copytree(other.path / "runs" / "foreign", s.path / "runs" / "foreign")
    with pytest.raises(StoreError, match=r"^run 'foreign' does not hold the examples of STORE "
                                         r".*/s: 1 of its 41 keys are not in the STORE \(e\.g\. "
                                         r"'k40'\), and 0 of the STORE's 40 keys are not in it "):
        rp.build_report(s, tmp_path / "r.html", thumbnails=0)
    assert not (tmp_path / "r.html").exists()


def test_moved_examples_are_to_be_given_with_the_commands_own_option(tmp_path):
    """report takes the new location as --examples, show as its EXAMPLES argument."""
    gone = tmp_path / "moved-away.tfrecord.gz"
    s = _small_store(tmp_path / "s", shards=[str(gone)])
    s.save_run("a", meta={"kind": "kmeans"}, obs=pd.DataFrame({"cluster": np.arange(s.n) % 3}),
               arrays={"umap": np.zeros((s.n, 2))})
    res = rp.build_report(s, tmp_path / "r.html", thumbnails=3)
    assert res.warnings == [f"pileup thumbnails unavailable: {gone}: source examples file of "
                            f"{s.path} is missing (moved? give its new location with "
                            "--examples)"]
    with pytest.raises(sh.ShowError, match=r"give its new location with the EXAMPLES argument"):
        sh.read_store_examples(s, [0])
