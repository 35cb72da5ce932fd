"""Enrichment of attributes in clusters: the numbers behind "83.9 % of cluster 2 is LINE".

For a run's clustering (``cluster``, ``level1``, ``node``...) and boolean attributes
(annotation columns such as ``rmsk_LINE`` or ``mosaic``), each cluster x attribute cell gets

* ``n`` (cluster size), ``count`` (members with the attribute),
* ``share_of_cluster`` = count / n (the blog's "83.9 % of cluster 2 are LINEs"),
* ``share_of_attribute`` = count / total with the attribute ("61.3 % of LINE examples"),
* ``fold`` = share_of_cluster / overall rate,
* ``p``: one-sided Fisher exact test (greater) on the 2x2 table
  ``[[count, n - count], [total - count, N - n - (total - count)]]``,
* ``q``: Benjamini-Hochberg over every test in the table (all attributes x clusters form
  one family, because a user scans them all at once).

Continuous attributes (depth, mean_mapq, ...) are summarised per cluster (median, quartiles,
IQR, mean) instead: a test would say little with millions of rows. :func:`landing` says
where a labelled set landed ("41/42 in cluster 10").
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import fisher_exact

from dvtorch.errors import DvprobeError
from probing.store import Run, Store, as_store

CONTINUOUS_DEFAULT = ("depth", "mean_mapq", "frac_low_mapq", "mean_baseq", "alt_fraction")
#: columns of a run that ``--level`` may name: flat clusters, hierarchy level 1, hierarchy node
LEVELS = ("cluster", "level1", "node")
#: ``--out`` suffixes :func:`write_enrichment` writes
OUT_SUFFIXES = (".csv", ".md", ".markdown")

log = logging.getLogger(__name__)


class EnrichmentError(DvprobeError):
    """An attribute, level or run asked for does not exist or cannot be tested."""


def bh_qvalues(p: Sequence[float] | np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (NaN p-values are left out of the family).

    ``q_(i) = min_{j >= i} p_(j) * m / j`` over the sorted p-values, capped at 1.
    """
    p = np.asarray(p, dtype=float)
    q = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    m = int(ok.sum())
    if m == 0:
        return q
    pv = p[ok]
    order = np.argsort(pv, kind="mergesort")
    ranked = pv[order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(ranked, 1.0)
    q[ok] = out
    return q


def _natural_key(v: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(v)))


def sorted_levels(values: Sequence) -> list[str]:
    """Cluster labels as strings in natural order (2 before 10, "1.2" before "1.10")."""
    return sorted({str(v) for v in values}, key=_natural_key)


def run_levels(run: Run) -> list[str]:
    """The clusterings of ``run`` that enrichment can group by (``level2`` alone is not
    one: sub-cluster 0 of every level-1 cluster would be pooled into one group)."""
    return [lv for lv in LEVELS if lv in run.obs.columns]


def cluster_labels(store: Store, run: Run, level: str) -> pd.Series:
    """The run's labels at ``level`` (``cluster``, ``level1``, ``node``) as strings, one per
    STORE row in STORE order (the run is joined by key)."""
    valid = run_levels(run)
    if level not in valid:
        raise EnrichmentError(f"--level {level!r}: run {run.name!r} can be grouped by "
                              f"{' | '.join(valid) or 'nothing (it has no clusters)'}")
    return store.run_obs(run)[level].astype(str)


def equals_value(s: pd.Series, value: str) -> np.ndarray:
    """Rows of ``s`` equal to ``value`` as typed on a command line: compared as numbers in a
    numeric column (``label=1`` also matches a float-stored 1.0), else as text; a missing
    value matches nothing."""
    number = None
    if pd.api.types.is_numeric_dtype(s) and s.dtype != bool:
        with contextlib.suppress(ValueError):
            number = float(value)
    hit = (pd.to_numeric(s, errors="coerce") == number) if number is not None \
        else (s.astype(str) == value)
    return hit.fillna(False).to_numpy(bool) & s.notna().to_numpy()


def resolve_attribute(frame: pd.DataFrame, spec: str) -> tuple[str, np.ndarray]:
    """A boolean vector for ``spec``: a boolean column, ``rmsk_<spec>``, or ``col=value``.

    ``LINE`` finds ``rmsk_LINE`` (the default name ``annotate --repeat-class LINE`` writes);
    ``label=1`` or ``variant_type=2`` turn a categorical column into a set.
    """
    if "=" in spec:
        col, _, val = spec.partition("=")
        if col not in frame.columns:
            raise EnrichmentError(f"attribute {spec!r}: no column {col!r}")
        return spec, equals_value(frame[col], val)
    for col in (spec, f"rmsk_{spec}"):
        if col in frame.columns:
            s = frame[col]
            if s.dtype == bool or str(s.dtype) == "boolean":
                return col, s.fillna(False).to_numpy(bool)
            vals = set(pd.unique(s.dropna()))
            if vals <= {0, 1}:
                return col, s.fillna(0).astype(int).to_numpy() == 1
            raise EnrichmentError(
                f"attribute {col!r} is not boolean (values like {_examples(s, vals)}); "
                f"use {col}=VALUE for a categorical column, or --continuous {col} for numbers")
    bools = [c for c in frame.columns if frame[c].dtype == bool]
    raise EnrichmentError(f"no attribute {spec!r} (nor rmsk_{spec}); boolean columns: {bools}")


def _examples(s: pd.Series, vals: set, n: int = 5) -> str:
    """The first ``n`` distinct values, numbers in numeric order (1, 2, 10; not 1, 10, 11)."""
    if pd.api.types.is_numeric_dtype(s):
        return ", ".join(f"{v:g}" for v in sorted(vals)[:n])
    return ", ".join(sorted(map(str, vals), key=_natural_key)[:n])


def run_frame(store: Store, run: Run, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """obs + annotation columns + the run's own columns (run wins on name clashes), one row
    per STORE row: the run is joined by key, and refused if its keys are not the STORE's.
    ``columns``: only these obs columns are read (those the STORE has), not every one."""
    extra = store.run_obs(run).drop(columns=["key"], errors="ignore")
    if columns is None:
        obs = store.obs
    else:
        have = store.obs_dtypes.index
        obs = store.read_obs([c for c in dict.fromkeys(columns)
                              if c in have and c not in extra.columns])
    return pd.concat([obs.drop(columns=[c for c in extra.columns if c in obs.columns]), extra],
                     axis=1)


def needed_columns(store: Store, by: Sequence[str], continuous: Sequence[str] | None
                   ) -> list[str]:
    """The obs columns ``enrich`` reads: those ``by`` and ``continuous`` may name, and every
    boolean column (what an unknown attribute's message lists; one byte a row). Reading only
    these keeps a large STORE's key and locus strings out of memory."""
    dtypes = store.obs_dtypes
    wanted = [c for c, t in dtypes.items() if pd.api.types.is_bool_dtype(t)]
    for spec in by:
        col = spec.partition("=")[0]
        wanted += [col, f"rmsk_{col}"]
    wanted += list(CONTINUOUS_DEFAULT if continuous is None else continuous)
    return [c for c in dict.fromkeys(wanted) if c in dtypes.index]


def label_codes(labels: pd.Series | np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Cluster labels as integer codes into their levels (strings, natural order): one
    hash pass, not one string per row."""
    codes, uniques = pd.factorize(np.asarray(labels))
    names = [str(u) for u in uniques]
    levels = sorted_levels(names)
    rank = {name: i for i, name in enumerate(levels)}
    remap = np.array([rank[name] for name in names], dtype=np.int64)
    return (remap[codes] if len(codes) else codes.astype(np.int64)), levels


#: rows per chunk of the counts behind the enrichment table
COUNT_CHUNK = 1 << 20


def counts_by_cluster(codes: np.ndarray, mask: np.ndarray | None, k: int,
                      chunk: int = COUNT_CHUNK) -> np.ndarray:
    """Rows (with ``mask``, when given) per cluster code, summed over row chunks: the
    additive counts a chunked or distributed backend computes piece by piece."""
    out = np.zeros(k, dtype=np.int64)
    for s in range(0, len(codes), chunk):
        c = codes[s:s + chunk]
        out += np.bincount(c if mask is None else c[np.asarray(mask[s:s + chunk], bool)],
                           minlength=k)
    return out


def continuous_columns(frame: pd.DataFrame, asked: Sequence[str] | None,
                       where: str) -> list[str]:
    """The ``--continuous`` columns to summarise: ``asked`` must exist and be numeric (a
    string column such as ``chrom`` has no median; refusing it beats a float-conversion
    traceback); the defaults are used where present."""
    if asked is None:
        return [c for c in CONTINUOUS_DEFAULT if c in frame.columns]
    cols = list(asked)
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise EnrichmentError(f"no continuous column(s) {missing} in {where}")
    bad = [c for c in cols if not pd.api.types.is_numeric_dtype(frame[c])]
    if bad:
        raise EnrichmentError(f"--continuous {', '.join(bad)}: not numeric in {where} "
                              f"({', '.join(f'{c}: {frame[c].dtype}' for c in bad)}); "
                              f"test a categorical column as an attribute {bad[0]}=VALUE instead")
    return cols


def enrichment_table(labels: pd.Series | np.ndarray, attrs: dict[str, np.ndarray]) -> pd.DataFrame:
    """Per (attribute, cluster) counts, shares, fold, Fisher p and BH q (see module doc)."""
    codes, levels = label_codes(labels)
    big_n = len(codes)
    sizes = counts_by_cluster(codes, None, len(levels))
    rows = []
    for name, mask in attrs.items():
        mask = np.asarray(mask, dtype=bool)
        total = int(mask.sum())
        counts = counts_by_cluster(codes, mask, len(levels))
        rate = total / big_n if big_n else np.nan
        for ci, cl in enumerate(levels):
            n, c = int(sizes[ci]), int(counts[ci])
            table = [[c, n - c], [total - c, big_n - n - (total - c)]]
            p = float(fisher_exact(table, alternative="greater")[1]) if total else np.nan
            share_c = c / n if n else np.nan
            rows.append({
                "attribute": name, "cluster": cl, "n": n, "count": c,
                "share_of_cluster": share_c,
                "share_of_attribute": c / total if total else np.nan,
                "fold": share_c / rate if rate else np.nan,
                "p": p,
            })
    df = pd.DataFrame(rows, columns=["attribute", "cluster", "n", "count", "share_of_cluster",
                                     "share_of_attribute", "fold", "p"])
    df["q"] = bh_qvalues(df["p"].to_numpy()) if len(df) else []
    return df


def continuous_table(labels: pd.Series | np.ndarray, values: dict[str, np.ndarray]) -> pd.DataFrame:
    """Per (attribute, cluster): n non-missing, mean, median, q1, q3, IQR."""
    codes, levels = label_codes(labels)
    rows = []
    for name, v in values.items():
        s = pd.Series(np.asarray(v, dtype=float))
        g = s.groupby(pd.Categorical.from_codes(codes, levels), observed=False)
        stats = pd.DataFrame({"n": g.count(), "mean": g.mean(), "median": g.median(),
                              "q1": g.quantile(0.25), "q3": g.quantile(0.75)})
        for cl in levels:
            r = stats.loc[cl]
            rows.append({"attribute": name, "cluster": cl, "n": int(r["n"]),
                         "mean": r["mean"], "median": r["median"], "q1": r["q1"],
                         "q3": r["q3"], "iqr": r["q3"] - r["q1"]})
    return pd.DataFrame(rows, columns=["attribute", "cluster", "n", "mean", "median", "q1",
                                       "q3", "iqr"])


def best_clusters(table: pd.DataFrame) -> pd.DataFrame:
    """Per attribute, the single cluster that best recovers it (the blog's "cluster 2 is
    83.9 % LINE and holds 61.3 % of LINE examples" figures).

    "Best" maximises F1 = harmonic mean of purity (``share_of_cluster``) and capture
    (``share_of_attribute``), so neither a tiny pure cluster nor the largest cluster wins by
    default; ties go to the higher purity. Columns: ``attribute``, ``total`` (examples with
    the attribute), ``base_rate`` and the winning row's ``cluster``, ``n``, ``count``,
    ``share_of_cluster``, ``share_of_attribute``, ``fold``, ``q``, ``f1``. An attribute no
    example has gets ``total`` 0 and NaNs.
    """
    rows = []
    for name, g in table.groupby("attribute", sort=False):
        total = int(g["count"].sum())
        big_n = int(g["n"].sum())
        base = {"attribute": name, "total": total, "base_rate": total / big_n if big_n else np.nan}
        if total == 0:
            rows.append(base)
            continue
        p, c = g["share_of_cluster"].to_numpy(float), g["share_of_attribute"].to_numpy(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.where(p + c > 0, 2 * p * c / (p + c), 0.0)
        best = max(range(len(g)), key=lambda i: (f1[i], p[i]))
        r = g.iloc[best]
        rows.append({**base, "cluster": r["cluster"], "n": int(r["n"]), "count": int(r["count"]),
                     "share_of_cluster": float(r["share_of_cluster"]),
                     "share_of_attribute": float(r["share_of_attribute"]),
                     "fold": float(r["fold"]), "q": float(r["q"]), "f1": float(f1[best])})
    cols = ["attribute", "total", "base_rate", "cluster", "n", "count", "share_of_cluster",
            "share_of_attribute", "fold", "q", "f1"]
    return pd.DataFrame(rows, columns=cols)


@dataclass
class Landing:
    """Where a labelled set landed: counts per cluster, largest first."""

    name: str
    total: int
    counts: pd.Series  # cluster -> count (only clusters holding the set)

    def where(self, limit: int | None = 4) -> str:
        """``"41/42 in cluster 10 (1 in 3)"`` (``"empty set"`` when nothing is labelled);
        at most ``limit`` clusters are named (None: all of them)."""
        if self.total == 0:
            return "empty set"
        top, k = self.counts.index[0], int(self.counts.iloc[0])
        shown = self.counts.iloc[1:limit]
        rest = ", ".join(f"{int(v)} in {c}" for c, v in shown.items())
        more = ", ..." if len(self.counts) > 1 + len(shown) else ""
        return f"{k}/{self.total} in cluster {top}" + (f" ({rest}{more})" if rest else "")

    def summary(self, limit: int | None = 4) -> str:
        return f"{self.name}: {self.where(limit)}"


def landing(labels: pd.Series | np.ndarray, mask: np.ndarray | None, name: str) -> Landing:
    """Counts of the set ``mask`` (all rows when None, e.g. an applied run) per cluster."""
    labels = np.asarray(labels)
    sel = labels if mask is None else labels[np.asarray(mask, dtype=bool)]
    return landing_from_counts(pd.Series(sel).astype(str).value_counts(), name)


def landing_from_counts(counts: pd.Series, name: str) -> Landing:
    """A :class:`Landing` from counts per cluster (zeros dropped; largest first, ties in
    natural order), e.g. one row of ``dvprobe apply --label-col``'s cross-table."""
    vc = pd.Series(counts).astype(int)
    vc.index = vc.index.astype(str)
    vc = vc[vc > 0]
    order = sorted(vc.index, key=lambda c: (-int(vc[c]), _natural_key(c)))
    return Landing(name, int(vc.sum()), vc.loc[order])


@dataclass
class Enrichment:
    """Everything ``dvprobe enrich`` computes for one run and level."""

    run: str
    level: str
    table: pd.DataFrame
    continuous: pd.DataFrame
    landings: list[Landing]


def enrichment(store: Store | str | os.PathLike, run: str, by: Sequence[str],
               level: str = "cluster", continuous: Sequence[str] | None = None) -> pd.DataFrame:
    """Enrichment table of boolean attributes ``by`` in ``run``'s clusters at ``level``."""
    return enrich(store, run, by, level=level, continuous=continuous or ()).table


def enrich(store: Store | str | os.PathLike, run: str, by: Sequence[str],
           level: str = "cluster", continuous: Sequence[str] | None = None, *,
           warn_partial: bool = True) -> Enrichment:
    """Full result: enrichment table, continuous summaries and landing summaries.

    A landing line is produced for every attribute (where its True rows fell) and, when the
    run was produced by ``apply``, for the whole STORE (every row is the applied set).
    A partial STORE (extraction stopped) is enriched with a logged warning; callers that
    enrich many runs of one STORE (the report) pass ``warn_partial=False`` and say it once.
    """
    from probing.analysis.guard import warn_if_partial

    store = as_store(store)
    if warn_partial:
        warn_if_partial(store, log)
    r = store.load_run(run)
    if level not in run_levels(r):
        cluster_labels(store, r, level)  # raises, naming the levels there are
    frame = run_frame(store, r, needed_columns(store, by, continuous))
    labels = frame[level].to_numpy()
    attrs = dict(resolve_attribute(frame, b) for b in by)
    cont_cols = continuous_columns(frame, continuous, str(store.path))
    cont = {c: frame[c].to_numpy(dtype=float) for c in cont_cols}
    lands = [landing(labels, m, name) for name, m in attrs.items()]
    if r.meta.get("applied_from"):
        af = r.meta["applied_from"]
        lands.append(landing(labels, None, f"applied set ({af.get('run')} from "
                                           f"{Path(str(af.get('store'))).name})"))
    return Enrichment(run, level, enrichment_table(labels, attrs),
                      continuous_table(labels, cont), lands)


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------


def _fmt(v) -> str:
    if isinstance(v, (float, np.floating)):
        if np.isnan(v):
            return ""
        return f"{v:.3g}" if (abs(v) < 1e-3 and v != 0) else f"{v:.4f}".rstrip("0").rstrip(".")
    return str(v)


#: How a p or q of exactly 0 is shown: a float underflow at large n (Fisher's test), not
#: certainty (tables here and in the report).
P_UNDERFLOW = "< 1e-300"


def _fmt_cell(column: str, v) -> str:
    if column in ("p", "q") and isinstance(v, (float, np.floating)) and v == 0:
        return P_UNDERFLOW
    return _fmt(v)


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table (no ``tabulate`` dependency)."""
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    cols = [str(c) for c in df.columns]
    body = ["| " + " | ".join(_fmt_cell(c, v) for c, v in zip(cols, row, strict=True)) + " |"
            for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body]) + "\n"


def check_output(out: str | os.PathLike) -> Path:
    """Refuse an ``--out`` :func:`write_enrichment` cannot write, before computing anything."""
    out = Path(out)
    if out.suffix not in OUT_SUFFIXES:
        raise EnrichmentError(f"{out}: output must end in .csv or .md, not "
                              f"{out.suffix or 'no suffix'!r}")
    return out


def enrichment_outputs(res: Enrichment, out: str | os.PathLike) -> list[Path]:
    """Every file :func:`write_enrichment` writes for ``out`` (a ``.csv`` gets its continuous
    summary beside it), so the CLI can name each one instead of only the one asked for."""
    out = check_output(out)
    if out.suffix == ".csv" and len(res.continuous):
        return [out, out.with_suffix(".continuous.csv")]
    return [out]


def write_enrichment(res: Enrichment, out: str | os.PathLike) -> Path:
    """Write ``.csv`` (enrichment table; continuous summary beside it as ``*.continuous.csv``)
    or ``.md`` (all tables and landing lines in one document)."""
    out, *beside = enrichment_outputs(res, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".csv":
        res.table.to_csv(out, index=False)
        for path in beside:  # the continuous summary, when there is one
            res.continuous.to_csv(path, index=False)
    else:
        parts = [f"# Enrichment: run `{res.run}`, level `{res.level}`\n"]
        if res.landings:
            parts.append("## Where labelled sets landed\n")
            parts += [f"- {ld.summary()}" for ld in res.landings]
            parts.append("")
        if len(res.table):
            parts += ["## Boolean attributes (Fisher one-sided, BH q)\n", to_markdown(res.table)]
        if len(res.continuous):
            parts += ["## Continuous attributes\n", to_markdown(res.continuous)]
        out.write_text("\n".join(parts))
    return out
