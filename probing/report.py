"""One self-contained, offline HTML report of a STORE's analysis runs.

The blog's figures were interactive Vega-Lite charts fetched from a CDN; genomics data often
lives on air-gapped machines, so this report inlines everything: the Vega / Vega-Lite /
vega-embed JavaScript bundled with vl-convert (the same bundle ``altair``'s
``to_html(inline=True)`` uses), the plotted points once as a JS array shared by every
view (inserted into each view's named ``points`` dataset instead of being copied into every
spec), and per-channel PNG thumbnails of some examples' pileups as data URIs. The page makes
no network request (vega-embed's "open in editor" action, its only link out, is disabled).

Figures (altair): per run, UMAP by cluster / ``level1`` / each boolean attribute / each
continuous attribute; attribute share per cluster (the blog's figure 2: "83.9 % of cluster
2 are LINEs") with Fisher/BH numbers in the tooltips; continuous medians and IQRs per
cluster; projection figures for runs made by ``apply`` (applied set over the source run's
UMAP); a cross-tabulation for multi-layer runs; the saved ``dvprobe probe`` results
(STORE/probes) as scores across layers, one line per concept. Clicking a point shows its pileup channels
in a side panel when a thumbnail exists.

The attribution view shows what ``dvprobe explain``, ``ablate`` and ``tcav`` saved in the
STORE: TCAV scores per layer beside the probes' AUROC ("encoded" and "used" side by side,
STORE/tcav), channel importance bars (STORE/ablation), and, for a clicked point that was
explained (STORE/attributions), its integrated-gradients attribution per channel beside
its pileup (every explained example is plotted). Every figure has vega-embed's PNG/SVG export menu;
``export_dir`` also writes them with vl-convert.

Large STOREs are subsampled for the browser (``max_points``); every row of a *rare*
attribute (<= ``rare_max`` rows, e.g. 42 mosaic variants) (and at most a quarter of
``max_points``) is always kept so a labelled set is never sampled away. Enrichment numbers are computed on *all* rows, not the sample.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd

from dvtorch.errors import DvprobeError
from probing import enrich as en
from probing.analysis.guard import partial_store_warning
from probing.info import format_info, store_info
from probing.probe import load_probes
from probing.show import (
    channel_pngs,
    data_uri,
    png_bytes,
    read_store_examples,
    store_channels,
)
from probing.store import Run, Store, as_store, open_store

log = logging.getLogger(__name__)

CONTINUOUS_DEFAULT = ("depth", "mean_mapq", "alt_fraction")
#: the report section of saved ``dvprobe probe`` results (STORE/probes/*.json)
PROBES_SECTION = "Linear probes (dvprobe probe)"
#: the report section of what explain / ablate / tcav saved in the STORE
ATTRIBUTION_SECTION = "Attribution: which inputs and concepts the call uses"
#: where ``dvprobe tcav`` saves (``<name>.json`` + ``<name>.npz``), explain
#: (``<name>/explain.csv`` + npz) and ablate (``<name>.csv``) in a STORE
TCAV_DIR, ATTRIBUTIONS_DIR, ABLATION_DIR = "tcav", "attributions", "ablation"
TCAV_FORMAT = "dvprobe-tcav"
TOOLTIP_COLUMNS = ("locus", "alleles", "label", "pred_genotype", "p_hom_ref", "p_het",
                   "p_hom_alt", "depth", "mean_mapq", "pileup", "attribution")
_BASE_BOOL_EXCLUDE = {"key"}


class ReportError(DvprobeError):
    """The STORE holds nothing to report (no runs with coordinates) or options are wrong."""


@dataclass
class Figure:
    id: str
    title: str
    chart: alt.TopLevelMixin
    caption: str = ""
    uses_points: bool = True
    section: str = ""


@dataclass
class ReportResult:
    path: Path
    n_rows: int
    n_points: int
    n_thumbnails: int
    figures: list[str]
    exported: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        frac = self.n_points / self.n_rows if self.n_rows else 0
        return (f"{self.path}: {len(self.figures)} figures, {self.n_points}/{self.n_rows} "
                f"points plotted ({frac:.1%}), {self.n_thumbnails} pileup thumbnails")


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def _bool_columns(obs: pd.DataFrame) -> list[str]:
    return [c for c in obs.columns if obs[c].dtype == bool and c not in _BASE_BOOL_EXCLUDE]


def _subsample(n: int, max_points: int, keep: np.ndarray, seed: int) -> np.ndarray:
    """Sorted rows to plot: all of ``keep`` plus a uniform sample of the rest."""
    if n <= max_points:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    keep = np.unique(keep)
    rest = np.setdiff1d(np.arange(n), keep)
    k = max(0, max_points - len(keep))
    pick = rng.choice(rest, size=min(k, len(rest)), replace=False)
    return np.sort(np.concatenate([keep, pick]))


def _fmt_alleles(ref: pd.Series, alt: pd.Series, aai: pd.Series) -> list[str]:
    out = []
    for r, a, i in zip(ref.astype(str), alt.astype(str), aai.astype(str), strict=True):
        alts = a.split(",")
        sel = [alts[int(x)] for x in i.split(",") if x.isdigit() and int(x) < len(alts)]
        out.append(f"{r}>{','.join(sel) or a}")
    return out


def _pick_thumbnails(rows: np.ndarray, obs: pd.DataFrame, labels: pd.Series | None,
                     rare: list[np.ndarray], limit: int) -> np.ndarray:
    """Rows to render pileups for: rare-attribute rows first, then per cluster.

    Within each group the rows with the smallest record index are preferred, so reading
    them means scanning each shard only from its start up to a small record number.
    """
    if limit <= 0 or "record" not in obs.columns:
        return np.array([], dtype=np.int64)
    chosen: list[int] = []
    rec = obs["record"].to_numpy()
    plotted = set(rows.tolist())
    for m in rare:
        cand = [r for r in np.flatnonzero(m) if r in plotted]
        cand.sort(key=lambda r: rec[r])
        chosen += cand[: max(1, limit // (2 * max(1, len(rare))))]
    groups = (labels.iloc[rows].groupby(labels.iloc[rows].to_numpy()).groups
              if labels is not None else {"all": rows})
    per = max(1, (limit - len(chosen)) // max(1, len(groups)))
    for _, idx in sorted(groups.items(), key=lambda kv: en._natural_key(kv[0])):
        cand = np.asarray(list(idx), dtype=np.int64)
        cand = cand[np.argsort(rec[cand], kind="stable")]
        chosen += cand[:per].tolist()
    chosen = list(dict.fromkeys(chosen))
    if len(chosen) < limit:  # small clusters left room: fill with the cheapest other rows
        have = set(chosen)
        rest = [r for r in rows[np.argsort(rec[rows], kind="stable")] if r not in have]
        chosen += rest[: limit - len(chosen)]
    return np.array(chosen[:limit], dtype=np.int64)


def _thumbs(store: Store, rows: np.ndarray, examples, downsample: int,
            warnings: list[str]) -> dict[int, dict]:
    if len(rows) == 0:
        return {}
    try:
        exs = read_store_examples(store, rows, examples, examples_option="--examples")
    except DvprobeError as exc:
        warnings.append(f"pileup thumbnails unavailable: {exc}")
        return {}
    channels = store_channels(store)
    out = {}
    for row, ex in exs.items():
        out[int(row)] = {"title": f"{ex.locus} {ex.ref}>{ex.alt}",
                         "ch": [[lbl, data_uri(png)] for lbl, png in
                                channel_pngs(ex.image, channels, downsample)]}
    return out


# --------------------------------------------------------------------------------------
# Charts
# --------------------------------------------------------------------------------------

POINTS = alt.NamedData(name="points")


def _tooltip(extra: list[alt.Tooltip]) -> list[alt.Tooltip]:
    """key, the figure's own fields, then locus/alleles/label/probabilities/depth/pileup."""
    tips = [alt.Tooltip("key:N", title="key"), *extra]
    for c in TOOLTIP_COLUMNS:
        if c.startswith("p_"):
            tips.append(alt.Tooltip(f"{c}:Q", title=c, format=".3f"))
        elif c in ("depth", "mean_mapq"):
            tips.append(alt.Tooltip(f"{c}:Q", title=c, format=".1f"))
        else:
            tips.append(alt.Tooltip(f"{c}:N", title=c))
    return tips


def _umap_base(xi: str, yi: str, title: str) -> alt.Chart:
    sel = alt.selection_point(name="pick", fields=["row"], on="click", empty=False)
    return (alt.Chart(POINTS, title=title, width=520, height=420)
            .mark_circle(size=14, opacity=0.75)
            .encode(x=alt.X(f"{xi}:Q", title="UMAP 1", axis=alt.Axis(grid=False)),
                    y=alt.Y(f"{yi}:Q", title="UMAP 2", axis=alt.Axis(grid=False)),
                    size=alt.condition(sel, alt.value(160), alt.value(14)))
            .add_params(sel)
            .transform_filter(f"isValid(datum['{xi}'])"))


def umap_by_category(col: str, xi: str, yi: str, order: list[str], title: str,
                     legend: str) -> alt.Chart:
    return _umap_base(xi, yi, title).encode(
        color=alt.Color(f"{col}:N", sort=order, title=legend,
                        scale=alt.Scale(scheme="category20" if len(order) > 10 else "tableau10")),
        tooltip=_tooltip([alt.Tooltip(f"{col}:N", title=legend)]))


def umap_by_flag(col: str, xi: str, yi: str, title: str, label_col: str) -> alt.Chart:
    return _umap_base(xi, yi, title).encode(
        color=alt.Color(f"{col}:N", title=col,
                        scale=alt.Scale(domain=[True, False], range=["#d62728", "#cfcfcf"])),
        order=alt.Order(f"{col}:N", sort="ascending"),
        tooltip=_tooltip([alt.Tooltip(f"{label_col}:N", title="cluster"),
                          alt.Tooltip(f"{col}:N", title=col)]))


def umap_by_value(col: str, xi: str, yi: str, title: str, lo: float, hi: float,
                  label_col: str) -> alt.Chart:
    return _umap_base(xi, yi, title).encode(
        color=alt.Color(f"{col}:Q", title=col, scale=alt.Scale(scheme="viridis",
                                                             domain=[lo, hi], clamp=True)),
        tooltip=_tooltip([alt.Tooltip(f"{label_col}:N", title="cluster")]))


def share_bars(table: pd.DataFrame, attribute: str, level: str, rate: float,
               title: str) -> alt.LayerChart:
    """The blog's figure 2: share of each cluster carrying the attribute (all rows)."""
    d = table[table["attribute"] == attribute].copy()
    d["percent"] = d["share_of_cluster"] * 100
    d["captured_percent"] = d["share_of_attribute"] * 100
    order = en.sorted_levels(d["cluster"])
    bars = alt.Chart(d, title=title, width=max(240, 34 * len(d)), height=260).mark_bar().encode(
        x=alt.X("cluster:N", sort=order, title=level),
        y=alt.Y("percent:Q", title=f"% of cluster that is {attribute}",
                scale=alt.Scale(domain=[0, 100])),
        color=alt.Color("q:Q", title="BH q", scale=alt.Scale(type="log", scheme="reds",
                                                            reverse=True, domainMax=1)),
        tooltip=[alt.Tooltip("cluster:N"), alt.Tooltip("n:Q", title="cluster size"),
                 alt.Tooltip("count:Q", title=f"{attribute} in cluster"),
                 alt.Tooltip("percent:Q", format=".1f", title="% of cluster"),
                 alt.Tooltip("captured_percent:Q", format=".1f",
                             title=f"% of all {attribute}"),
                 alt.Tooltip("fold:Q", format=".2f"), alt.Tooltip("p:Q", format=".2e"),
                 alt.Tooltip("q:Q", format=".2e")])
    text = bars.mark_text(dy=-6, fontSize=10).encode(text=alt.Text("percent:Q", format=".1f"),
                                                     color=alt.value("black"))
    rule = alt.Chart(pd.DataFrame({"overall": [rate * 100]})).mark_rule(
        strokeDash=[4, 3], color="black").encode(y="overall:Q",
                                                 tooltip=alt.Tooltip("overall:Q", format=".1f"))
    return alt.layer(bars, text, rule)


def continuous_bars(cont: pd.DataFrame, attribute: str, level: str, title: str) -> alt.LayerChart:
    d = cont[cont["attribute"] == attribute]
    order = en.sorted_levels(d["cluster"])
    base = alt.Chart(d, title=title, width=max(240, 34 * len(d)), height=220)
    tips = [alt.Tooltip("cluster:N"), alt.Tooltip("n:Q"),
            *[alt.Tooltip(f"{c}:Q", format=".2f") for c in ("median", "q1", "q3", "iqr", "mean")]]
    iqr = base.mark_rule(strokeWidth=6, opacity=0.5).encode(
        x=alt.X("cluster:N", sort=order, title=level), y=alt.Y("q1:Q", title=attribute),
        y2="q3:Q", tooltip=tips)
    med = base.mark_tick(color="black", thickness=2, size=18).encode(
        x=alt.X("cluster:N", sort=order), y="median:Q", tooltip=tips)
    return alt.layer(iqr, med)


def probe_profile(table: pd.DataFrame, title: str) -> alt.FacetChart:
    """Held-out probe score per layer (x, network order), one line per concept, one panel per
    metric (AUROC and R2 have different scales); bars = ± sd over the folds; a baseline
    model's scores (``--baseline``), when probed, as dashed lines."""
    parts = [table.assign(model="probed STORE")]
    if "baseline_mean" in table.columns:
        parts.append(table.assign(model="baseline", mean=table["baseline_mean"],
                                  sd=table["baseline_sd"]))
    d = pd.concat(parts, ignore_index=True).dropna(subset=["mean"])
    d["sd"] = d["sd"].fillna(0.0)
    d["lo"], d["hi"] = d["mean"] - d["sd"], d["mean"] + d["sd"]
    d = d[["layer", "concept", "metric", "model", "mean", "sd", "lo", "hi", "folds", "n"]]
    order = list(dict.fromkeys(table["layer"]))
    tips = [alt.Tooltip("layer:N"), alt.Tooltip("concept:N"), alt.Tooltip("model:N"),
            alt.Tooltip("metric:N"), alt.Tooltip("mean:Q", format=".3f"),
            alt.Tooltip("sd:Q", format=".3f"), alt.Tooltip("folds:Q"),
            alt.Tooltip("n:Q", title="examples")]
    base = alt.Chart(d).encode(x=alt.X("layer:N", sort=order, title="layer",
                                       axis=alt.Axis(labelAngle=0)),
                               color=alt.Color("concept:N", title="concept"),
                               strokeDash=alt.StrokeDash("model:N", title="model",
                                                         sort=["probed STORE", "baseline"]))
    lines = base.mark_line(point=True).encode(y=alt.Y("mean:Q", title="held-out score",
                                                      scale=alt.Scale(zero=False)),
                                              tooltip=tips)
    bars = base.mark_rule(opacity=0.5).encode(y="lo:Q", y2="hi:Q", tooltip=tips)
    return (alt.layer(bars, lines, data=d).properties(width=max(260, 48 * len(order)), height=240)
            .facet(column=alt.Column("metric:N", title=None), title=title)
            .resolve_scale(y="independent"))


def crosstab_heatmap(a: pd.Series, b: pd.Series, a_name: str, b_name: str,
                     title: str) -> alt.LayerChart:
    ct = pd.crosstab(a.to_numpy(), b.to_numpy()).stack().reset_index()
    ct.columns = ["a", "b", "n"]
    ct["a"], ct["b"] = ct["a"].astype(str), ct["b"].astype(str)
    base = alt.Chart(ct, title=title).encode(
        x=alt.X("b:N", sort=en.sorted_levels(ct["b"]), title=b_name),
        y=alt.Y("a:N", sort=en.sorted_levels(ct["a"]), title=a_name))
    return alt.layer(
        base.mark_rect().encode(color=alt.Color("n:Q", scale=alt.Scale(type="symlog")),
                                tooltip=["a:N", "b:N", "n:Q"]),
        base.mark_text(fontSize=9).encode(text="n:Q"))


# --------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:60]


def _json_for_script(obj) -> str:
    """JSON safe inside ``<script>`` (no ``</script>`` or ``<!--`` can close it)."""
    return (json.dumps(obj, separators=(",", ":"), default=_json_default, allow_nan=False)
            .replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return None if np.isnan(o) else float(o)
    if isinstance(o, np.bool_):
        return bool(o)
    raise TypeError(type(o))


def _records(df: pd.DataFrame) -> list[dict]:
    clean = df.astype(object).where(pd.notna(df), None)
    return clean.to_dict(orient="records")


def _spec(chart: alt.TopLevelMixin) -> dict:
    spec = chart.to_dict()
    spec.pop("$schema", None)  # never fetched by vega-embed, but keep the page URL-free
    return spec


def build_report(store: Store | str | os.PathLike, out: str | os.PathLike, *,
                 runs: list[str] | None = None, max_points: int = 20000,
                 attributes: list[str] | None = None, continuous: list[str] | None = None,
                 thumbnails: int = 120, thumbnail_downsample: int = 1,
                 examples: str | os.PathLike | None = None,
                 export_dir: str | os.PathLike | None = None, rare_max: int = 1000,
                 seed: int = 0, title: str | None = None) -> ReportResult:
    """Write the report; see the module docstring for what it contains.

    Stages: gather what is reported (:func:`_gather`), the plotted points
    (:func:`_points`), one section per run (:func:`_run_section`) and the saved probes,
    pileup thumbnails, then the page (:func:`_page`), written atomically.
    """
    if max_points < 1:
        raise ReportError("--max-points must be >= 1")
    data = _gather(as_store(store), runs, attributes, continuous, max_points, rare_max, seed)
    pts = _points(data)
    contents = _Contents()
    first_labels: pd.Series | None = None
    for ri, run in enumerate(data.runs):
        labels = _run_section(data, contents, pts, ri, run)
        if first_labels is None:
            first_labels = labels
    _probe_sections(data.probes, contents)
    _attribution_sections(data, contents)
    thumb_rows = _pick_thumbnails(data.rows, data.obs, first_labels, data.rare, thumbnails)
    thumbs = _thumbs(data.store, thumb_rows, examples, thumbnail_downsample, data.warnings)
    pts["pileup"] = np.isin(pts["row"].to_numpy(), list(thumbs))
    exported = _export(contents.figures, pts, Path(export_dir)) if export_dir else []
    pts["attribution"] = np.isin(pts["row"].to_numpy(), list(data.attribution.explained))
    page = _page(data, contents, pts, thumbs, title or f"dvprobe report: {data.store.path.name}")
    out = _write_text(Path(out), page)
    for w in data.warnings:
        log.warning(w)
    return ReportResult(out, data.n, len(data.rows), len(thumbs),
                        [f.title for f in contents.figures], exported, data.warnings)


@dataclass
class _Data:
    """What every section reads: the STORE's rows, the runs and probes to show, the
    attributes, and the rows plotted in the browser (``rows``; tables use all rows)."""

    store: Store
    obs: pd.DataFrame
    runs: list[Run]
    probes: dict
    attrs: dict[str, np.ndarray]
    cont_cols: list[str]
    rare_cap: int
    rare: list[np.ndarray]
    keep: np.ndarray
    rows: np.ndarray
    max_points: int
    seed: int
    warnings: list[str]
    attribution: Attribution

    @property
    def n(self) -> int:
        return len(self.obs)


@dataclass
class _Contents:
    """The figures and tables of the page, in page order."""

    figures: list[Figure] = field(default_factory=list)
    tables: list[tuple[str, str]] = field(default_factory=list)

    def figure(self, title: str, chart: alt.TopLevelMixin, caption: str, uses_points: bool,
               section: str) -> None:
        self.figures.append(Figure(f"f{len(self.figures)}", title, chart, caption,
                                   uses_points, section))


def _gather(store: Store, runs: list[str] | None, attributes: list[str] | None,
            continuous: list[str] | None, max_points: int, rare_max: int,
            seed: int) -> _Data:
    """The runs (with a UMAP or clusters) and probes to report, the attributes, and the
    sample of rows to plot; a ReportError when there is nothing to report."""
    loaded = [store.load_run(r) for r in (runs if runs else store.runs)]
    loaded = [r for r in loaded if "umap" in r.arrays or "cluster" in r.obs.columns]
    probes = load_probes(store)
    if not loaded and not probes and not _has_attribution(store):
        raise ReportError(f"{store.path}: no analysis run with a UMAP or clusters, and no "
                          f"saved probes, to report (runs: {store.runs}); run `dvprobe "
                          "cluster` or `dvprobe probe` first")
    obs = store.obs
    attrs = dict(en.resolve_attribute(obs, a) for a in
                 (attributes if attributes is not None else _bool_columns(obs)))
    # Asked-for columns must exist and be numeric (as enrich requires): silently skipping
    # a misspelt one hid it from the report; the defaults are used where present.
    cont_cols = ([c for c in CONTINUOUS_DEFAULT if c in obs.columns] if continuous is None
                 else en.continuous_columns(obs, continuous, str(store.path)))
    # "Rare": small enough to keep every row and still leave most of the budget to the
    # uniform sample (so --max-points stays a real cap).
    rare_cap = min(rare_max, max(1, max_points // 4))
    rare = [m for m in attrs.values() if 0 < m.sum() <= rare_cap]
    keep = np.unique(np.concatenate([np.flatnonzero(m) for m in rare])) if rare else \
        np.array([], np.int64)
    if len(keep) > max_points // 2:
        keep = np.sort(np.random.default_rng(seed).choice(keep, max_points // 2, replace=False))
    warnings = [w for w in [partial_store_warning(store)] if w]
    attribution = load_attribution(store, obs, warnings)
    keep = np.union1d(keep, np.fromiter(attribution.explained, np.int64)).astype(np.int64)
    rows = _subsample(len(obs), max_points, keep, seed)
    return _Data(store, obs, loaded, probes, attrs, cont_cols, rare_cap, rare, keep, rows,
                 max_points, seed, warnings, attribution)


def _points(data: _Data) -> pd.DataFrame:
    """The plotted points: one shared table (each run adds its coordinates and labels)."""
    obs, rows = data.obs, data.rows
    pts = pd.DataFrame({"row": rows})
    for c in ("key", "locus", "label", "pred_genotype", "p_hom_ref", "p_het", "p_hom_alt",
              "depth", "mean_mapq", *data.cont_cols):
        if c in obs.columns and c not in pts.columns:
            v = obs[c].iloc[rows].reset_index(drop=True)
            pts[c] = v.astype("float64").round(4) if v.dtype.kind == "f" else v
    if {"ref", "alt", "alt_allele_indices"} <= set(obs.columns):
        o = obs.iloc[rows]
        pts["alleles"] = _fmt_alleles(o["ref"], o["alt"], o["alt_allele_indices"])
    for a, m in data.attrs.items():
        pts[a] = m[rows]
    return pts


@dataclass
class _RunView:
    """One run as its section draws it: its columns in STORE row order (joined by key) and
    the names of its columns in the shared points table."""

    run: Run
    index: int
    obs: pd.DataFrame
    rows: np.ndarray  # for each STORE row, the run's row of the same example
    levels: list[str]
    labels: pd.Series | None

    @property
    def section(self) -> str:
        return f"Run {self.run.name}"

    @property
    def xy(self) -> tuple[str, str]:
        return f"x{self.index}", f"y{self.index}"

    @property
    def has_umap(self) -> bool:
        return "umap" in self.run.arrays and self.run.arrays["umap"].shape[1] >= 2

    @property
    def label_col(self) -> str:
        return f"cluster{self.index}" if self.labels is not None else "key"


def _run_view(store: Store, ri: int, r: Run) -> _RunView:
    rows = store.run_rows(r)  # refuses a run whose keys are not the STORE's
    obs = r.obs.take(rows).reset_index(drop=True)
    levels = [lv for lv in ("cluster", "level1") if lv in obs.columns]
    labels = obs["cluster"].astype(str) if "cluster" in obs.columns else None
    return _RunView(r, ri, obs, rows, levels, labels)


def _run_section(data: _Data, contents: _Contents, pts: pd.DataFrame, ri: int,
                 r: Run) -> pd.Series | None:
    """Figures and tables of one run; adds its coordinates and labels to ``pts``. Returns
    its cluster labels (STORE order), or None."""
    view = _run_view(data.store, ri, r)
    xi, yi = view.xy
    if view.has_umap:
        u = r.arrays["umap"]
        pts[xi] = np.round(u[view.rows[data.rows], 0].astype(float), 4)
        pts[yi] = np.round(u[view.rows[data.rows], 1].astype(float), 4)
    for lv in view.levels:
        pts[f"{lv}{ri}"] = view.obs[lv].astype(str).to_numpy()[data.rows]
    if view.has_umap:
        _umap_level_figures(contents, view)
    res = en.enrich(data.store, r.name, list(data.attrs), level="cluster",
                    continuous=data.cont_cols,
                    warn_partial=False) if view.labels is not None else None
    _attribute_figures(data, contents, view, res)
    if view.has_umap:
        _umap_value_figures(data, contents, view)
    if res is not None:
        _enrichment_sections(data, contents, view, res)
    af = r.meta.get("applied_from")
    if af and view.has_umap and view.labels is not None:
        contents.figures.append(_projection_figure(data, view, af))
    if r.meta.get("kind", "?") == "multilayer" and view.labels is not None:
        _crosstab_figure(data, contents, view)
    return view.labels


def _umap_level_figures(contents: _Contents, view: _RunView) -> None:
    r, (xi, yi) = view.run, view.xy
    layers = r.meta.get("features", {}).get("layers") if isinstance(
        r.meta.get("features"), dict) else None
    desc = f"{r.meta.get('kind', '?')} on {', '.join(layers) if layers else '?'}"
    for lv in view.levels:
        order = en.sorted_levels(view.obs[lv])
        contents.figure(f"{r.name}: UMAP by {lv}",
                        umap_by_category(f"{lv}{view.index}", xi, yi, order,
                                         f"{r.name} ({desc}) - {lv}", lv),
                        f"{len(order)} clusters. Click a point to see its "
                        "pileup (when a thumbnail exists).", True, view.section)


def _attribute_figures(data: _Data, contents: _Contents, view: _RunView,
                       res: en.Enrichment | None) -> None:
    """Per attribute: the UMAP coloured by it, and its share per cluster (all rows)."""
    r, (xi, yi) = view.run, view.xy
    lands = {ld.name: ld.summary() for ld in res.landings} if res else {}
    for a, m in data.attrs.items():
        if view.has_umap:
            cap = lands.get(a, "") + f" ({int(m.sum())} of {data.n} examples carry {a}.)"
            contents.figure(f"{r.name}: UMAP, {a}",
                            umap_by_flag(a, xi, yi, f"{r.name} - {a}", view.label_col),
                            cap, True, view.section)
        if res is not None and m.sum():
            contents.figure(f"{r.name}: share of {a} per cluster",
                            share_bars(res.table, a, "cluster", m.mean(),
                                       f"{r.name}: % of each cluster that is {a}"),
                            "All rows (not the plotted sample). Bar colour = BH q of a "
                            "one-sided Fisher test; dashed line = overall rate.", False,
                            view.section)


def _umap_value_figures(data: _Data, contents: _Contents, view: _RunView) -> None:
    r, (xi, yi) = view.run, view.xy
    for c in data.cont_cols:
        v = data.obs[c].to_numpy(dtype=float)
        lo, hi = (np.nanpercentile(v, [1, 99]) if np.isfinite(v).any() else (0, 1))
        contents.figure(f"{r.name}: UMAP by {c}",
                        umap_by_value(c, xi, yi, f"{r.name} - {c}", float(lo), float(hi),
                                      view.label_col),
                        "Colour clipped to the 1st-99th percentile.", True, view.section)


def _enrichment_sections(data: _Data, contents: _Contents, view: _RunView,
                         res: en.Enrichment) -> None:
    """Continuous summaries per cluster, the enrichment table and the landing lines."""
    name = view.run.name
    for c in data.cont_cols:
        contents.figure(f"{name}: {c} per cluster",
                        continuous_bars(res.continuous, c, "cluster",
                                        f"{name}: {c} (median, IQR)"),
                        "All rows.", False, view.section)
    if len(res.table):
        contents.tables.append((f"{name}: enrichment (all {data.n} rows)",
                                _table_html(res.table)))
    if res.landings:
        contents.tables.append((f"{name}: where labelled sets landed",
                                "<ul>" + "".join(f"<li>{html.escape(ld.summary())}</li>"
                                                 for ld in res.landings) + "</ul>"))


def _crosstab_figure(data: _Data, contents: _Contents, view: _RunView) -> None:
    """A multi-layer run's clusters against the first single-layer run's."""
    r = view.run
    others = [o for o in data.runs if o is not r and "cluster" in o.obs.columns
              and o.meta.get("kind") != "multilayer"]
    if not others:
        return
    o = others[0]
    contents.figure(f"{r.name} vs {o.name}",
                    crosstab_heatmap(view.labels, data.store.run_obs(o)["cluster"].astype(str),
                                     f"{r.name} cluster", f"{o.name} cluster",
                                     f"Multi-layer clusters ({r.name}) vs {o.name}"),
                    "Counts over all rows: how the multi-layer clustering splits or merges "
                    "the single-layer clusters.", False, view.section)


def _probe_sections(probes: dict, contents: _Contents) -> None:
    for pname, pres in probes.items():
        contents.figure(f"{pname}: concepts across layers",
                        probe_profile(pres.table, f"{pname}: where each concept is decodable"),
                        pres.header() + ". " + " ".join(f"{line}." for line in pres.peaks()),
                        False, PROBES_SECTION)
        contents.tables.append((f"{pname}: linear probes per layer", _table_html(pres.table)))


# --------------------------------------------------------------------------------------
# Attribution view: what explain / ablate / tcav saved in the STORE
# --------------------------------------------------------------------------------------


@dataclass
class Attribution:
    """Saved TCAV results (name -> document, ``table`` / ``scores`` as frames), ablation
    tables (name -> frame) and explained rows (STORE row -> the side panel's images)."""

    tcav: dict[str, dict] = field(default_factory=dict)
    ablation: dict[str, pd.DataFrame] = field(default_factory=dict)
    explained: dict[int, dict] = field(default_factory=dict)


def _has_attribution(store: Store) -> bool:
    return any(any((store.path / d).glob(pattern)) for d, pattern in
               ((TCAV_DIR, "*.json"), (ABLATION_DIR, "*.csv"),
                (ATTRIBUTIONS_DIR, "*/explain.csv")))


def load_tcav(store: Store | str | os.PathLike) -> dict[str, dict]:
    """Every saved TCAV result of the STORE by name: the JSON document, its ``table`` and
    ``scores`` as DataFrames; unreadable or foreign files are skipped with a warning."""
    st = as_store(store)
    out = {}
    for path in sorted((st.path / TCAV_DIR).glob("*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if doc.get("format") != TCAV_FORMAT:
                raise ValueError(f"format is not {TCAV_FORMAT}")
            if doc.get("n_store") != st.n:
                log.warning("%s: made on %s examples, the STORE has %d; skipped", path,
                            doc.get("n_store"), st.n)
                continue
            doc["table"] = pd.DataFrame.from_records(doc["table"])
            doc["scores"] = pd.DataFrame.from_records(doc["scores"])
            out[path.stem] = doc
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s: not a readable TCAV result (%s); skipped", path, exc)
    return out


def load_attribution(store: Store, obs: pd.DataFrame, warnings: list[str]) -> Attribution:
    """What explain / ablate / tcav saved in ``store`` (each unreadable file is a warning)."""
    att = Attribution(tcav=load_tcav(store))
    for path in sorted((store.path / ABLATION_DIR).glob("*.csv")):
        try:
            att.ablation[path.stem] = pd.read_csv(path)
        except (OSError, ValueError) as exc:
            warnings.append(f"{path}: not a readable ablation table ({exc}); skipped")
    row_of = pd.Series(np.arange(len(obs)), index=obs["key"]) if "key" in obs.columns else None
    for table in sorted((store.path / ATTRIBUTIONS_DIR).glob("*/explain.csv")):
        try:
            for r in pd.read_csv(table).itertuples(index=False):
                if row_of is not None and r.key in row_of.index:
                    att.explained[int(row_of[r.key])] = _explained_panel(table.parent, r)
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            warnings.append(f"{table.parent}: explanations unreadable ({exc}); skipped")
    return att


def _explained_panel(directory: Path, r) -> dict:
    """The side panel's attribution images of one explained example (its npz's overlays)."""
    with np.load(directory / r.npz, allow_pickle=False) as z:
        images, labels = z["overlays"], [str(v) for v in z["overlay_labels"]]
    what = "IG of " + (f"p({r.target})" if r.output == "probability" else f"logit({r.target})")
    title = (f"{directory.name}: {what}, baseline {r.baseline}, {r.steps} steps, sum "
             f"{r.attribution_sum:+.3g} = f(x) - f(b) {r.f_x - r.f_baseline:+.3g}; red raises "
             "the call, blue lowers it (right of each channel)")
    return {"title": title, "ch": [[f"attribution: {lbl}", data_uri(png_bytes(img))]
                                   for lbl, img in zip(labels, images, strict=True)]}


def tcav_profile(doc: dict, probes: dict) -> alt.FacetChart:
    """Per layer: the probes' held-out AUROC ("encoded") beside the TCAV score ("used"),
    one line per concept; 0.5 is chance for both. Random CAVs' mean score dashed; a filled
    point is significant after Bonferroni; bars = ± sd over the CAVs or folds."""
    t = doc["table"]
    order = list(dict.fromkeys(t["layer"]))
    used = t.assign(measure="used: TCAV score", series=t["concept"], mean=t["score_mean"],
                    sd=t["score_sd"], significant=t["significant"].astype(bool))
    rnd = t.assign(measure="used: TCAV score", series=t["concept"] + " (random CAVs)",
                   mean=t["random_mean"], sd=t["random_sd"], significant=False)
    parts = [used, rnd]
    for pres in probes.values():
        p = pres.table[pres.table["concept"].isin(set(t["concept"]))
                       & pres.table["layer"].isin(order)]
        if len(p):
            parts.append(p.assign(measure="encoded: probe AUROC", series=p["concept"],
                                  significant=True))
            break
    d = pd.concat(parts, ignore_index=True)[["layer", "measure", "series", "mean", "sd",
                                             "significant"]]
    d["sd"] = d["sd"].fillna(0.0)
    d["lo"], d["hi"] = d["mean"] - d["sd"], d["mean"] + d["sd"]
    d["random"] = d["series"].str.endswith("(random CAVs)")
    tips = [alt.Tooltip("layer:N"), alt.Tooltip("series:N", title="concept"),
            alt.Tooltip("measure:N"), alt.Tooltip("mean:Q", format=".3f"),
            alt.Tooltip("sd:Q", format=".3f"), alt.Tooltip("significant:N")]
    base = alt.Chart().encode(
        x=alt.X("layer:N", sort=order, axis=alt.Axis(labelAngle=0)),
        color=alt.Color("series:N", title="concept"),
        strokeDash=alt.StrokeDash("random:N", legend=None))
    lines = base.mark_line().encode(y=alt.Y("mean:Q", title="score (0.5 = chance)",
                                            scale=alt.Scale(domain=[0, 1])))
    dots = base.mark_point(size=60).encode(
        y="mean:Q", fill=alt.condition("datum.significant", alt.Color("series:N"),
                                       alt.value("white")), tooltip=tips)
    bars = base.mark_rule(opacity=0.5).encode(y="lo:Q", y2="hi:Q")
    chance = alt.Chart().mark_rule(color="#999", strokeDash=[2, 2]).encode(
        y=alt.datum(0.5))
    return (alt.layer(bars, lines, dots, chance, data=d)
            .properties(width=max(260, 48 * len(order)), height=240)
            .facet(column=alt.Column("measure:N", title=None,
                                     sort=["encoded: probe AUROC", "used: TCAV score"]),
                   title=f"{doc['name']}: encoded (probe) and used (TCAV) per layer"))


def ablation_bars(table: pd.DataFrame, title: str) -> alt.FacetChart:
    """Per channel: importance (mean total-variation change of the probabilities when the
    channel is replaced) with its bootstrap 95 % interval, one panel per replacement."""
    d = table[["channel", "mode", "importance", "importance_lo", "importance_hi",
               "flip_fraction"]].copy()
    for c in ("importance_lo", "importance_hi"):  # no bootstrap: a point, not an interval
        d[c] = d[c].fillna(d["importance"])
    y = alt.Y("channel:N", sort="-x", title=None)
    tips = [alt.Tooltip("channel:N"), alt.Tooltip("mode:N"),
            alt.Tooltip("importance:Q", format=".4f"),
            alt.Tooltip("importance_lo:Q", format=".4f", title="95% CI low"),
            alt.Tooltip("importance_hi:Q", format=".4f", title="95% CI high"),
            alt.Tooltip("flip_fraction:Q", format=".3f", title="calls flipped")]
    bars = alt.Chart().mark_bar().encode(
        y=y, x=alt.X("importance:Q", title="mean total-variation change of p (95% CI)"),
        tooltip=tips)
    ci = alt.Chart().mark_rule(color="black").encode(y=y, x="importance_lo:Q",
                                                     x2="importance_hi:Q")
    return (alt.layer(bars, ci, data=d).properties(width=360)
            .facet(row=alt.Row("mode:N", title="replaced by",
                               sort=list(dict.fromkeys(d["mode"]))), title=title)
            .resolve_scale(y="independent"))


def _attribution_sections(data: _Data, contents: _Contents) -> None:
    att = data.attribution
    for name, doc in att.tcav.items():
        p = doc.get("params", {})
        sig = doc["table"].query("significant")
        said = (", ".join(f"{r.concept} at {r.layer} ({r.score_mean:.2f})"
                          for r in sig.itertuples()) or "none")
        contents.figure(f"{name}: concepts encoded and used", tcav_profile(doc, data.probes),
                        f"TCAV (Kim et al. 2018): share of {p.get('n_examples')} examples whose "
                        f"{p.get('output')} of the {p.get('target')} genotype rises along the "
                        f"concept's CAV, {p.get('n_random')} concept and random CAVs each; "
                        f"filled = significant after Bonferroni (two-sided Welch t-test vs the "
                        f"random CAVs, dashed). Significant: {said}. Decodable (left) is not "
                        "used (right).", False, ATTRIBUTION_SECTION)
        contents.tables.append((f"{name}: TCAV per layer and concept",
                                _table_html(doc["table"])))
    for name, table in att.ablation.items():
        contents.figure(f"{name}: channel importance", ablation_bars(
            table, f"{name}: what each channel is worth to the call"),
            f"Channel ablation (dvprobe ablate) over {int(table['n'].iloc[0])} examples: each "
            "channel replaced in turn; bars = mean total-variation change of the genotype "
            "probabilities, lines = bootstrap 95% intervals.", False, ATTRIBUTION_SECTION)
        contents.tables.append((f"{name}: channel ablation", _table_html(table)))


def _write_text(out: Path, text: str) -> Path:
    """Write ``text`` to ``out`` atomically (a reader never sees half a page)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    return out


def _projection_figure(data: _Data, view: _RunView, af: dict) -> Figure:
    """Applied points (coloured by their cluster) over the source run's UMAP in grey."""
    r, (xi, yi) = view.run, view.xy
    bg = None
    try:
        src = open_store(af["store"]).load_run(af["run"])
        if "umap" in src.arrays:
            u = src.arrays["umap"]
            pick = _subsample(len(u), data.max_points, np.array([], np.int64), data.seed)
            bg = pd.DataFrame({xi: u[pick, 0].astype(float).round(4),
                               yi: u[pick, 1].astype(float).round(4)})
    except (DvprobeError, OSError, KeyError) as exc:
        data.warnings.append(f"projection {r.name}: source run unavailable ({exc}); "
                             "showing the applied points alone")
    land = en.landing(view.labels, None, "applied set").summary()
    order = en.sorted_levels(view.labels)
    fg = umap_by_category(f"cluster{view.index}", xi, yi, order,
                          f"{r.name}: applied to run {af.get('run')}", "cluster")
    chart: alt.TopLevelMixin = fg
    if bg is not None:
        # InlineData, not the DataFrame: altair refuses a DataFrame over 5,000 rows
        # (MaxRowsError), and the background is subsampled to --max-points already.
        back = (alt.Chart(alt.InlineData(values=_records(bg)))
                .mark_circle(size=8, color="#d0d0d0", opacity=0.5)
                .encode(x=f"{xi}:Q", y=f"{yi}:Q"))
        chart = alt.layer(back, fg).properties(width=520, height=420)
    return Figure("", f"{r.name}: projection", chart,
                  f"Grey: source run {af.get('run')} ({Path(str(af.get('store'))).name}); "
                  f"coloured: this STORE's examples. {land}", True, view.section)


def _table_html(df: pd.DataFrame) -> str:
    d = df.copy()
    for c in ("share_of_cluster", "share_of_attribute"):
        if c in d:
            d[c] = (d[c] * 100).map(lambda v: "" if pd.isna(v) else f"{v:.1f} %")
    for c in ("p", "q"):
        if c in d:
            d[c] = d[c].map(lambda v: "" if pd.isna(v) else en.P_UNDERFLOW if v == 0
                            else f"{v:.2e}")
    if "fold" in d:
        d["fold"] = d["fold"].map(lambda v: "" if pd.isna(v) else f"{v:.2f}")
    return d.to_html(index=False, classes="tbl", border=0, escape=True)


def _export(figures: list[Figure], pts: pd.DataFrame, export_dir: Path) -> list[Path]:
    """PNG + SVG of every figure via vl-convert (the named dataset inlined)."""
    import vl_convert as vlc

    export_dir.mkdir(parents=True, exist_ok=True)
    values = _records(pts)
    paths = []
    for i, f in enumerate(figures):
        spec = _spec(f.chart)
        if f.uses_points:
            spec.setdefault("datasets", {})["points"] = values
        stem = export_dir / f"{i:02d}-{_slug(f.title)}"
        spec_json = json.dumps(spec, default=_json_default)
        (png := stem.with_suffix(".png")).write_bytes(vlc.vegalite_to_png(spec_json, scale=2))
        (svg := stem.with_suffix(".svg")).write_text(vlc.vegalite_to_svg(spec_json))
        paths += [png, svg]
    return paths


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#222}
header{padding:14px 24px;background:#f4f6f8;border-bottom:1px solid #ddd}
main{margin-right:430px;padding:8px 24px}
h1{font-size:20px;margin:0 0 6px} h2{font-size:17px;border-bottom:1px solid #ddd}
h3{font-size:14px;margin:18px 0 4px} .cap{font-size:12px;color:#555;max-width:900px}
.note{font-size:13px} .warn{color:#a33} #errors{color:#b00;font-weight:bold}
#panel{position:fixed;right:0;top:0;bottom:0;width:410px;overflow:auto;background:#fafafa;
 border-left:1px solid #ccc;padding:10px;font-size:12px}
#panel figure{margin:4px 0} #panel img{width:100%;image-rendering:pixelated;
 border:1px solid #bbb} #panel figcaption{font-size:11px;color:#333}
table.tbl{border-collapse:collapse;font-size:11px;margin:6px 0}
table.tbl td,table.tbl th{border-bottom:1px solid #e4e4e4;padding:2px 8px;text-align:right}
details{margin:6px 0} .pair{display:flex;gap:4px} .pair figure{flex:1}
"""

_JS = r"""
// editor: false -- the "open in Vega editor" action is the bundle's only link out.
// minus "-": d3's default U+2212 is missing from some fonts and then renders as nothing.
const embedOpt = {mode: "vega-lite", renderer: "canvas",
  actions: {export: true, source: true, compiled: true, editor: false},
  formatLocale: {decimal: ".", thousands: ",", grouping: [3], currency: ["$", ""],
                 minus: "-"}};
let rendered = 0, failed = 0;
function status() {
  const el = document.getElementById("render-status");
  el.textContent = `rendered ${rendered}/${FIGURES.length} figures` +
    (failed ? `, ${failed} failed` : "");
  document.body.dataset.rendered = rendered;
  document.body.dataset.failed = failed;
}
function showPileup(row) {
  const p = POINTS.find(d => d.row === row);
  const t = THUMBS[String(row)];
  const box = document.getElementById("pileup");
  box.innerHTML = "";
  const h = document.createElement("div");
  h.innerHTML = "<b></b><br><span></span>";
  h.querySelector("b").textContent = p ? p.key : `row ${row}`;
  h.querySelector("span").textContent = p ?
    `label ${p.label ?? "-"}, predicted ${p.pred_genotype ?? "-"}; ` +
    `p(hom-ref, het, hom-alt) = ${[p.p_hom_ref, p.p_het, p.p_hom_alt]
      .map(v => v == null ? "-" : v.toFixed(3)).join(", ")}` : "";
  box.appendChild(h);
  const a = ATTR[String(row)];
  if (!t && !a) {
    const s = document.createElement("p");
    s.textContent = "No pileup thumbnail for this point (see the note above for which " +
      "points have one; they show pileup = true in the tooltip).";
    box.appendChild(s);
    return;
  }
  // The pileup and, when the point was explained, its attribution, channel by channel.
  const shown = t ? t.ch : [];
  for (let i = 0; i < Math.max(shown.length, a ? a.ch.length : 0); i++) {
    const row = document.createElement("div");
    row.className = "pair";
    for (const item of [shown[i], a ? a.ch[i] : undefined]) {
      if (!item) continue;
      const [label, uri] = item;
      const f = document.createElement("figure");
      const img = document.createElement("img");
      img.src = uri; img.alt = label;
      const c = document.createElement("figcaption");
      c.textContent = label;
      f.appendChild(img); f.appendChild(c); row.appendChild(f);
    }
    box.appendChild(row);
  }
  if (a) {
    const s = document.createElement("p");
    s.className = "cap";
    s.textContent = a.title;
    box.insertBefore(s, box.children[1]);
  }
}
for (const f of FIGURES) {
  // The plotted points exist once in the page; each view gets them by reference as its
  // named "points" dataset (before the first render, so no empty-data pass).
  const spec = f.points ?
    Object.assign({}, f.spec, {datasets: Object.assign({}, f.spec.datasets, {points: POINTS})}) :
    f.spec;
  vegaEmbed("#" + f.id, spec, embedOpt).then(res => {
    res.view.addEventListener("click", (ev, item) => {
      if (item && item.datum && item.datum.row !== undefined) showPileup(item.datum.row);
    });
    return res.view.runAsync();
  }).then(() => { rendered += 1; status(); }).catch(err => {
    failed += 1; status();
    const e = document.getElementById("errors");
    e.textContent += `figure ${f.id}: ${err}\n`;
    console.error(err);
  });
}
const first = Object.keys(ATTR)[0] ?? Object.keys(THUMBS)[0];  // an explained point first
if (first !== undefined) showPileup(Number(first));
status();
"""


def _sample_note(data: _Data) -> str:
    """How the plotted points were chosen (all rows, or a sample keeping rare attributes)."""
    n, n_points = data.n, len(data.rows)
    if n_points == n:
        return f"All {n} examples are plotted."
    rare_names = [a for a, m in data.attrs.items() if 0 < m.sum() <= data.rare_cap]
    all_kept = all(np.isin(np.flatnonzero(data.attrs[a]), data.keep).all() for a in rare_names)
    return (f"{n_points} of {n} examples plotted ({n_points / n:.2%}, uniform random sample"
            + (f"; {'every' if all_kept else 'a share of the'} example(s) of the rare "
               f"attribute(s) {', '.join(rare_names)} included first" if rare_names
               else "") + "). Tables and bar charts use all examples.")


def _body(contents: _Contents) -> str:
    """Each figure under its section's heading, then the tables (folded)."""
    body = []
    section = None
    for f in contents.figures:
        if f.section != section:
            section = f.section
            body.append(f"<h2>{html.escape(section)}</h2>")
        body.append(f'<section><h3>{html.escape(f.title)}</h3><div id="{f.id}"></div>'
                    f'<p class="cap">{html.escape(f.caption)}</p></section>')
    for t, h in contents.tables:
        body.append(f"<details><summary><b>{html.escape(t)}</b></summary>{h}</details>")
    return "".join(body)


def _contents_line(figures: list[Figure]) -> str:
    """The runs (and probes) the page shows, for its header."""
    line = ", ".join(sorted({f.section.removeprefix("Run ") for f in figures
                             if f.section.startswith("Run ")}))
    if any(f.section == PROBES_SECTION for f in figures):
        line += "; linear probes"
    if any(f.section == ATTRIBUTION_SECTION for f in figures):
        line += "; attribution"
    return line


def _vega_bundle() -> str:
    """The Vega / Vega-Lite / vega-embed JavaScript, to inline in the page."""
    import vl_convert as vlc
    from altair.utils._importers import vl_version_for_vl_convert

    bundle = vlc.javascript_bundle(vl_version=vl_version_for_vl_convert())
    if "</script" in bundle.lower():
        raise ReportError("vl-convert's JavaScript bundle contains </script>; cannot inline")
    return bundle


def _page(data: _Data, contents: _Contents, pts: pd.DataFrame, thumbs: dict[int, dict],
          title: str) -> str:
    """The whole HTML page: header notes, the figures' specs, the points once, the
    thumbnails, and the script that renders them offline."""
    bundle = _vega_bundle()
    figures, store = contents.figures, data.store
    for i, f in enumerate(figures):
        f.id = f"fig{i}"
    sample_note = _sample_note(data)
    thumb_note = (f"Pileup thumbnails are embedded for {len(thumbs)} of the plotted points "
                  "(chosen per cluster and from rare attributes; tooltip field pileup = true). "
                  "Click such a point to show its channels here.")
    fig_specs = [{"id": f.id, "points": f.uses_points, "spec": _spec(f.chart)} for f in figures]
    thumbs_js = {str(k): v for k, v in thumbs.items()}
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    warn_html = "".join(f'<p class="warn">{html.escape(w)}</p>' for w in data.warnings)
    n = data.n
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'unsafe-inline' 'unsafe-eval'; style-src 'unsafe-inline'; img-src data: blob:; font-src data:">
<title>{html.escape(title)}</title><style>{_CSS}</style>
<script>{bundle}</script></head>
<body>
<header><h1>{html.escape(title)}</h1>
<div class="note">STORE <code>{html.escape(str(store.path))}</code>, {n} examples, runs:
{html.escape(_contents_line(figures))}. Generated {created}.</div>
<div class="note" id="sampling">{html.escape(sample_note)}</div>
<details class="note" id="provenance"><summary>How this STORE was made (<code>dvprobe info</code>)</summary>
<pre>{html.escape(format_info(store_info(store.path)))}</pre></details>
<div class="note" id="render-status">rendering...</div><pre id="errors"></pre>{warn_html}
</header>
<aside id="panel"><b>Pileup of the selected point</b>
<p class="cap">{html.escape(thumb_note)}</p><div id="pileup"></div></aside>
<main>{_body(contents)}</main>
<script>
const POINTS = {_json_for_script(_records(pts))};
const THUMBS = {_json_for_script(thumbs_js)};
const ATTR = {_json_for_script({str(k): v for k, v in data.attribution.explained.items()})};
const FIGURES = {_json_for_script(fig_specs)};
{_JS}
</script>
</body></html>
"""
