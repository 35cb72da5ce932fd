"""Linear probes per layer: at which depth of the network is a concept decodable?

The blog saw "natural clusters" of an attribute "form at different levels across model
layers, and at times get 'forgotten' as the network further processes the input". Clusters
show that by eye; a linear probe per layer (as in the AlphaZero concept work the blog
follows) puts one number on it per layer and concept:

* a yes/no concept (an annotation such as ``rmsk_LINE`` or ``mosaic``, or ``label=1``) gets
  a logistic regression and its **AUROC** on held-out examples (0.5 = chance);
* a number (``depth``, ``mean_mapq``, ``alt_fraction`` ...) gets a ridge regression and its
  held-out **R²** (0 = no better than the mean; negative = worse).

How, and why so:

* **Folds by genomic block.** Examples a few bases apart share most of their reads, and a
  LINE or segmental duplication spans many examples; random folds put near-copies of a test
  example into training and measure memory, not a concept. Every example of a block of
  ``block_bp`` (default 1 Mb, keyed by chrom and ``pos // block_bp``) falls in the same fold
  (``block_bp=0``: ordinary random folds).
* **Everything fitted inside the fold**: standardisation and PCA (``pca`` components, default
  50) are fitted on the training part only, then applied to the held-out part.
* **One sample, one set of folds for every layer and concept**, so the numbers in a column
  of the profile are comparable; at most ``max_rows`` examples (uniform sample, seeded).
* Score mean and spread over the folds; a fold whose held-out part lacks one class is left
  out of that concept's AUROC (the table says how many folds count).

Read the numbers as *decodability*, not use: a concept a probe can read may play no part in
the call. Random convolutional features decode a lot by themselves, so the baseline for a
trained DeepVariant is the same probe on a STORE of the same examples extracted with the
untrained reference model (``dvtorch.reference_bundle``, the demo's default): ``baseline=``
probes it on the same rows and folds and reports the gain per cell.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from dvtorch.errors import DvprobeError
from dvtorch.files import atomic_write_bytes
from probing.enrich import EnrichmentError, _as_store, resolve_attribute, to_markdown
from probing.enrich import check_output as enrich_check_output
from probing.store import Store

log = logging.getLogger(__name__)

#: numeric obs columns probed when no concept is named (with every boolean annotation)
CONTINUOUS_DEFAULT = ("depth", "mean_mapq", "alt_fraction")
#: share of the available memory one layer's sampled rows (float32) may take
MEMORY_SHARE = 0.25
#: saved results: ``STORE/probes/<name>.json`` (read by ``dvprobe report``)
PROBES_DIR = "probes"
PROBES_FORMAT = "dvprobe-probes"


class ProbeError(DvprobeError):
    """A concept, layer or option of a probe cannot be used (the message says why)."""


@dataclass(frozen=True)
class Concept:
    """One thing to decode: ``values`` over the STORE's rows (bool, or float with NaN for
    rows that have no value)."""

    name: str
    kind: str  # "binary" | "continuous"
    values: np.ndarray

    @property
    def metric(self) -> str:
        return "AUROC" if self.kind == "binary" else "R2"


def resolve_concepts(frame: pd.DataFrame, specs: Sequence[str] | None) -> list[Concept]:
    """``specs`` as concepts: a boolean column (``LINE`` finds ``rmsk_LINE``), ``col=value``
    (a categorical column as a set) or a numeric column (a number to regress). None: every
    boolean column, plus :data:`CONTINUOUS_DEFAULT` where present."""
    if specs is None:
        names = [c for c in frame.columns if frame[c].dtype == bool]
        names += [c for c in CONTINUOUS_DEFAULT if c in frame.columns]
        if not names:
            raise ProbeError("no concept to probe: the STORE has no boolean annotation and none "
                             f"of {', '.join(CONTINUOUS_DEFAULT)}; name some with --concepts")
    else:
        names = list(specs)
        if not names:
            raise ProbeError("--concepts is empty")
    concepts: list[Concept] = []
    for spec in names:
        col = spec if spec in frame.columns else None
        if col is not None and "=" not in spec and _is_number(frame[col]):
            levels = _few_levels(frame[col])
            if levels is not None:
                raise ProbeError(
                    f"--concepts {col}: an integer column with only {len(levels)} values "
                    f"({', '.join(map(str, levels))}) is a category, not a quantity; probe "
                    f"one value as a yes/no concept, e.g. {col}={levels[-1]}")
            values = pd.to_numeric(frame[col], errors="coerce").to_numpy(np.float64)
            concepts.append(Concept(col, "continuous", values))
            continue
        try:
            name, mask = resolve_attribute(frame, spec)
        except EnrichmentError as exc:
            raise ProbeError(str(exc).replace("--continuous ", "--concepts ")) from None
        concepts.append(Concept(name, "binary", mask))
    seen = [c.name for c in concepts]
    twice = sorted({n for n in seen if seen.count(n) > 1})
    if twice:
        raise ProbeError(f"--concepts names {', '.join(twice)} more than once")
    return concepts


def _is_number(s: pd.Series) -> bool:
    """Numeric and not a 0/1 flag (those are yes/no concepts)."""
    if s.dtype == bool or not pd.api.types.is_numeric_dtype(s):
        return False
    return not set(pd.unique(s.dropna())) <= {0, 1}


def _few_levels(s: pd.Series, most: int = 10) -> list[int] | None:
    """The sorted values of an integer column with at most ``most`` of them (a genotype
    ``label``, ``variant_type``), else None."""
    if not pd.api.types.is_integer_dtype(s):
        return None
    levels = sorted(int(v) for v in pd.unique(s.dropna()))
    return levels if len(levels) <= most else None


def genomic_folds(chrom: Sequence | np.ndarray, pos: Sequence | np.ndarray, k: int,
                  block_bp: int, seed: int = 0) -> np.ndarray:
    """Fold (0..k-1) of every row; rows of one ``block_bp`` block share a fold.

    Blocks are dealt to folds largest first (ties in a seeded random order), each to the
    fold with the fewest rows so far, so folds come out near equal in size. ``block_bp=0``
    makes every row its own block (random folds).
    """
    n = len(pos)
    if k < 2:
        raise ProbeError(f"--folds must be >= 2, got {k}")
    if block_bp < 0:
        raise ProbeError(f"--block-bp must be >= 0, got {block_bp}")
    if block_bp == 0:
        keys = np.arange(n)
    else:
        frame = pd.DataFrame({"c": np.asarray(chrom).astype(str),
                              "b": np.asarray(pos, dtype=np.int64) // block_bp})
        keys = frame.groupby(["c", "b"], sort=False).ngroup().to_numpy()
    n_blocks = int(keys.max()) + 1 if n else 0
    if n_blocks < k:
        what = f"{n_blocks} genomic block(s) of {block_bp:,} bp" if block_bp else f"{n} rows"
        raise ProbeError(f"only {what} for {k} folds: use a smaller --block-bp or fewer "
                         "--folds")
    sizes = np.bincount(keys, minlength=n_blocks)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_blocks)
    order = order[np.argsort(-sizes[order], kind="stable")]
    fold_of_block = np.empty(n_blocks, dtype=np.int64)
    load = np.zeros(k, dtype=np.int64)
    for b in order:
        f = int(np.argmin(load))
        fold_of_block[b] = f
        load[f] += sizes[b]
    return fold_of_block[keys]


def _features(train: np.ndarray, test: np.ndarray, pca: int, seed: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """Standardise and PCA-reduce, fitted on ``train`` only."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train)
    a, b = scaler.transform(train), scaler.transform(test)
    n_comp = min(pca, a.shape[1], a.shape[0] - 1)
    if pca and n_comp < a.shape[1]:
        solver = "randomized" if a.shape[1] > 4 * n_comp else "full"
        p = PCA(n_components=n_comp, svd_solver=solver, random_state=seed).fit(a)
        a, b = p.transform(a), p.transform(b)
    return a, b


def _score(concept: Concept, a: np.ndarray, b: np.ndarray, y_tr: np.ndarray,
           y_te: np.ndarray, seed: int) -> float | None:
    """Held-out score of one fold; None when it cannot be computed there."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.metrics import r2_score, roc_auc_score

    if concept.kind == "binary":
        if len(np.unique(y_tr)) < 2 or len(np.unique(y_te)) < 2:
            return None
        clf = LogisticRegression(class_weight="balanced", max_iter=2000, random_state=seed)
        clf.fit(a, y_tr)
        return float(roc_auc_score(y_te, clf.decision_function(b)))
    if len(y_te) < 2 or np.ptp(y_tr) == 0:
        return None
    mu, sd = y_tr.mean(), y_tr.std()
    reg = Ridge(alpha=1.0).fit(a, (y_tr - mu) / sd)
    return float(r2_score(y_te, reg.predict(b) * sd + mu))


@dataclass
class ProbeResult:
    """One row per layer x concept (``table``) and how it was obtained."""

    table: pd.DataFrame
    n_rows: int
    n_store: int
    folds: int
    block_bp: int
    pca: int
    seed: int
    notes: list[str] = field(default_factory=list)
    baseline: str | None = None  # the baseline STORE's path, when there is one

    def profile(self, values: str = "mean") -> pd.DataFrame:
        """Layers (rows, in probing order) x concepts (columns): the mean held-out score (or
        another column of ``table``)."""
        t = self.table
        out = t.pivot(index="layer", columns="concept", values=values)
        return out.loc[list(dict.fromkeys(t["layer"])), list(dict.fromkeys(t["concept"]))]

    def peaks(self) -> list[str]:
        """Per concept: the layer where it is best decoded and what the last layer keeps."""
        lines = []
        for name, g in self.table.groupby("concept", sort=False):
            g = g.dropna(subset=["mean"])
            if g.empty:
                continue
            best = g.loc[g["mean"].idxmax()]
            last = g.iloc[-1]
            tail = ("" if last["layer"] == best["layer"] else
                    f"; {last['layer']} {last['mean']:.3f} ({last['mean'] - best['mean']:+.3f})")
            if "gain" in g.columns and not np.isnan(best["gain"]):
                tail += (f"; over the baseline at {best['layer']}: {best['gain']:+.3f} "
                         f"(baseline {best['baseline_mean']:.3f})")
            lines.append(f"{name}: best {best['layer']} ({best['metric']} {best['mean']:.3f})"
                         + tail)
        return lines

    def counts(self) -> str:
        """How many sampled examples have each yes/no concept (a small count makes a noisy
        AUROC)."""
        t = self.table.drop_duplicates("concept")
        t = t[t["metric"] == "AUROC"]
        return "examples with each yes/no concept: " + ", ".join(
            f"{c} {int(k):,}" for c, k in zip(t["concept"], t["n_with"], strict=True))

    def header(self) -> str:
        how = (f"folds by {self.block_bp:,} bp genomic block" if self.block_bp
               else "random folds (--block-bp 0)")
        sample = (f"{self.n_rows:,} of {self.n_store:,} examples (seed {self.seed})"
                  if self.n_rows < self.n_store else f"{self.n_rows:,} examples")
        against = (f"; (+x) = gain over the same probe on the baseline {self.baseline}"
                   if self.baseline else "")
        return (f"linear probes, {self.folds}-fold CV, {how}, standardise + PCA {self.pca} "
                f"fitted inside each fold; AUROC for yes/no concepts (0.5 = chance), R2 for "
                f"numbers (0 = the mean); {sample}{against}")


def _extraction_order(st: Store) -> list[str]:
    """The STORE's layers in the order extraction was asked for them (``--layers``, normally
    input to output), which ``Store.layers`` (sorted by name: mixed10 before mixed3) loses."""
    asked = list((st.meta.get("inputs") or {}).get("layers") or [])
    have = list(st.layers)
    return asked if sorted(asked) == sorted(have) else have


def _suggest_block(chrom: np.ndarray, pos: np.ndarray, k: int, block_bp: int) -> int | None:
    """The largest 1-2-5 block size below ``block_bp`` that gives >= 2k blocks, if any."""
    frame = pd.DataFrame({"c": np.asarray(chrom).astype(str), "p": np.asarray(pos, np.int64)})
    for exp in range(int(np.log10(max(block_bp, 1))), 1, -1):
        for lead in (5, 2, 1):
            size = lead * 10 ** (exp - 1)
            if size >= block_bp:
                continue
            if frame.assign(b=frame["p"] // size).groupby(["c", "b"]).ngroups >= 2 * k:
                return size
    return None


def probe_layers(store: Store | str | os.PathLike, concepts: Sequence[str] | None = None,
                 layers: Sequence[str] | None = None, *, folds: int = 5, pca: int = 50,
                 block_bp: int = 1_000_000, max_rows: int = 50_000, seed: int = 0,
                 progress: bool = False, available: int | None = None,
                 baseline: Store | str | os.PathLike | None = None) -> ProbeResult:
    """Probe every layer of ``layers`` (default: all of the STORE's) for every concept.

    See the module docstring for the method. ``available`` (bytes; default: what the
    machine or container has free) bounds one layer's sampled rows. ``baseline``: a STORE
    of the same examples extracted with another model (the untrained reference); the same
    rows, folds and concepts are probed there too, and the table gains ``baseline_mean``,
    ``baseline_sd`` and ``gain`` (mean - baseline_mean).
    """
    from probing.analysis.guard import available_memory, warn_if_partial

    st = _as_store(store)
    if pca < 0:
        raise ProbeError(f"--pca must be >= 0, got {pca}")
    if max_rows < 2:
        raise ProbeError(f"--max-rows must be >= 2, got {max_rows}")
    names = list(layers) if layers is not None else _extraction_order(st)
    unknown = [n for n in names if n not in st.layers]
    if unknown:
        raise ProbeError(f"layer(s) {', '.join(unknown)} not in {st.path} (it has "
                         f"{', '.join(st.layers)}; extract them first)")
    if len(set(names)) != len(names) or not names:
        raise ProbeError(f"--layers must name each layer once, got {names}")
    if st.n == 0:
        raise ProbeError(f"{st.path}: the STORE has no examples yet")
    warn_if_partial(st, log)
    obs = st.obs
    todo = resolve_concepts(obs, concepts)
    missing = [c for c in ("chrom", "pos") if c not in obs.columns]
    if block_bp and missing:
        raise ProbeError(f"{st.path}: obs has no {'/'.join(missing)} to make genomic blocks "
                         "from; pass --block-bp 0 for random folds")

    n = st.n
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, max_rows, replace=False)) if n > max_rows else np.arange(n)
    room = available if available is not None else available_memory()
    widest = max(st.layer_specs[name].dim for name in names)
    need = len(rows) * widest * 4 * 3  # the rows, their standardised copy, the PCA's work
    if room and need > MEMORY_SHARE * room:
        fit = int(MEMORY_SHARE * room / (widest * 4 * 3))
        raise ProbeError(f"{len(rows):,} rows of a {widest:,}-wide layer need ~{need / 1e9:.1f} "
                         f"GB, more than {MEMORY_SHARE:.0%} of the {room / 1e9:.1f} GB "
                         f"available; pass --max-rows {max(fit, 2)} or less")
    where = (obs["chrom"].to_numpy()[rows], obs["pos"].to_numpy()[rows]) if block_bp \
        else (np.zeros(len(rows)), np.zeros(len(rows)))
    try:
        fold = genomic_folds(*where, folds, block_bp, seed)
    except ProbeError as exc:
        better = _suggest_block(*where, folds, block_bp) if block_bp else None
        if better is None:
            raise
        raise ProbeError(f"{exc} (--block-bp {better} gives at least {2 * folds} blocks "
                         "here)") from None

    notes: list[str] = []
    ys = {}
    for c in todo:
        y = c.values[rows]
        if c.kind == "binary":
            pos_n = int(y.sum())
            if min(pos_n, len(y) - pos_n) < folds:
                notes.append(f"{c.name}: {pos_n} of {len(y)} sampled examples have it; too few "
                             f"for {folds} folds, not probed")
                continue
        elif np.isfinite(y).sum() < 2 * folds:
            notes.append(f"{c.name}: fewer than {2 * folds} examples have a value; not probed")
            continue
        ys[c.name] = (c, y)
    if not ys:
        raise ProbeError("no concept can be probed: " + "; ".join(notes))

    base = _check_baseline(_as_store(baseline), st, names) if baseline is not None else None
    from tqdm.auto import tqdm

    records = []
    with tqdm(total=len(names) * folds * (2 if base is not None else 1), desc="probe",
              unit="fold", disable=not progress, leave=False) as bar:
        for name in names:
            scores = _layer_scores(st.layer(name)[rows], ys, fold, folds, pca, seed, bar)
            if base is not None:
                base_scores = _layer_scores(base.layer(name)[rows], ys, fold, folds, pca, seed,
                                            bar)
            for cname, (c, y) in ys.items():
                rec = {"layer": name, "concept": cname, "metric": c.metric,
                       **_summary(scores[cname]), "folds": len(scores[cname]),
                       "n": int(np.isfinite(y).sum()) if c.kind == "continuous" else len(y),
                       "n_with": int(y.sum()) if c.kind == "binary" else np.nan}
                if base is not None:
                    b = _summary(base_scores[cname])
                    rec.update(baseline_mean=b["mean"], baseline_sd=b["sd"],
                               gain=rec["mean"] - b["mean"])
                records.append(rec)
    table = pd.DataFrame.from_records(records)
    return ProbeResult(table=table, n_rows=len(rows), n_store=n, folds=folds,
                       block_bp=block_bp, pca=pca, seed=seed, notes=notes,
                       baseline=str(base.path) if base is not None else None)


def _summary(scores: list[float]) -> dict[str, float]:
    v = np.asarray(scores)
    return {"mean": float(v.mean()) if len(v) else np.nan,
            "sd": float(v.std(ddof=1)) if len(v) > 1 else np.nan}


def _layer_scores(rows: np.ndarray, ys: dict[str, tuple[Concept, np.ndarray]],
                  fold: np.ndarray, folds: int, pca: int, seed: int, bar) -> dict[str, list]:
    """Held-out scores of every concept on one layer's sampled rows, fold by fold; the
    features are fitted once per fold and shared by the concepts."""
    x = np.asarray(rows, dtype=np.float32)
    scores: dict[str, list[float]] = {c: [] for c in ys}
    for f in range(folds):
        test = fold == f
        a, b = _features(x[~test], x[test], pca, seed)
        for cname, (c, y) in ys.items():
            if c.kind == "binary":
                s = _score(c, a, b, y[~test], y[test], seed)
            else:  # rows without a value take no part in the regression
                keep_tr, keep_te = np.isfinite(y[~test]), np.isfinite(y[test])
                s = _score(c, a[keep_tr], b[keep_te], y[~test][keep_tr], y[test][keep_te],
                           seed)
            if s is not None:
                scores[cname].append(s)
        bar.update(1)
    return scores


def _check_baseline(base: Store, st: Store, names: Sequence[str]) -> Store:
    """The baseline STORE must hold the same examples in the same order (its rows are taken
    by the same indices) and the probed layers, pooled alike."""
    if base.path.resolve() == st.path.resolve():
        raise ProbeError(f"--baseline {base.path} is the STORE itself")
    if base.n != st.n:
        raise ProbeError(f"--baseline {base.path} has {base.n:,} examples, {st.path} "
                         f"{st.n:,}: extract the same examples with the baseline model")
    a, b = st.obs, base.obs
    if "key" in a.columns and "key" in b.columns and not a["key"].equals(b["key"]):
        row = int(np.flatnonzero(a["key"].to_numpy() != b["key"].to_numpy())[0])
        raise ProbeError(f"--baseline {base.path}: example {row} is {b['key'].iloc[row]!r}, "
                         f"in {st.path} {a['key'].iloc[row]!r}: extract the same examples "
                         "(same files, same --limit)")
    for name in names:
        if name not in base.layers:
            raise ProbeError(f"--baseline {base.path} has no layer {name} (it has "
                             f"{', '.join(base.layers)})")
        mine, theirs = st.layer_specs[name], base.layer_specs[name]
        if (mine.dim, mine.pool) != (theirs.dim, theirs.pool):
            raise ProbeError(f"--baseline {base.path}: layer {name} is {theirs.dim}-wide, "
                             f"pooled {theirs.pool}; here {mine.dim}-wide, pooled {mine.pool}")
    return base


def profile_markdown(res: ProbeResult) -> str:
    """The layer x concept profile as a markdown table, each cell ``mean ± sd`` (and the
    gain over the baseline, when there is one)."""
    t = res.table
    gains = t["gain"] if "gain" in t.columns else pd.Series(np.nan, index=t.index)
    cells = t.assign(cell=[("" if np.isnan(m) else f"{m:.3f}"
                            + ("" if np.isnan(s) else f" ± {s:.3f}")
                            + ("" if np.isnan(g) else f" ({g:+.3f})"))
                           for m, s, g in zip(t["mean"], t["sd"], gains, strict=True)])
    wide = replace(res, table=cells).profile("cell")
    metric = dict(zip(t["concept"], t["metric"], strict=False))
    wide.columns = [f"{c} ({metric[c]})" for c in wide.columns]
    return to_markdown(wide.reset_index())


def check_output(out: str | os.PathLike) -> Path:
    """Refuse an ``--out`` :func:`write_probes` cannot write (enrich's rule: .csv or .md),
    before probing anything."""
    try:
        return enrich_check_output(out)
    except EnrichmentError as exc:
        raise ProbeError(str(exc)) from None


def write_probes(res: ProbeResult, out: str | os.PathLike) -> Path:
    """``.csv``: the long table (layer, concept, metric, mean, sd, folds, n, n_with);
    ``.md``: the method line, the profile, the peaks and any notes."""
    out = check_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".csv":
        res.table.to_csv(out, index=False)
    else:
        parts = ["# Linear probes per layer\n", res.header() + "\n", res.counts() + "\n",
                 profile_markdown(res),
                 "## Where each concept is best decoded\n",
                 *[f"- {line}" for line in res.peaks()], ""]
        if res.notes:
            parts += ["## Not probed\n", *[f"- {note}" for note in res.notes], ""]
        out.write_text("\n".join(parts))
    return out


# --------------------------------------------------------------------------------------
# Saved in the STORE (JSON, no pickle), for the report
# --------------------------------------------------------------------------------------


def check_name(name: str) -> str:
    """Refuse a name ``STORE/probes/<name>.json`` cannot hold, before probing."""
    if not name or name.startswith(".") or any(c in name for c in "/\\\0"):
        raise ProbeError(f"--name {name!r}: not a valid name (it names a file in "
                         "STORE/probes: no '/' or '\\', no leading '.')")
    return name


def probes_path(store: Store, name: str) -> Path:
    return store.path / PROBES_DIR / f"{check_name(name)}.json"


def check_new(store: Store, name: str, overwrite: bool) -> None:
    """Refuse to replace saved probes unless asked to (the CLI's ``--overwrite``)."""
    if not overwrite and probes_path(store, name).exists():
        raise ProbeError(f"probes {name!r} already exist in {store.path}; pass --overwrite to "
                         "replace them or choose another --name")


def save_probes(store: Store | str | os.PathLike, res: ProbeResult, name: str = "probes"
                ) -> Path:
    """Write ``res`` to ``STORE/probes/<name>.json`` atomically (replacing one of that name).

    Saved with the STORE's row count: probes of a partial STORE are set aside with its runs
    when extraction resumes, and :func:`load_probes` skips any made on another row count."""
    st = _as_store(store)
    path = probes_path(st, name)
    doc = {"format": PROBES_FORMAT, "name": name, "n_store": res.n_store,
           "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "params": {"n_rows": res.n_rows, "folds": res.folds, "block_bp": res.block_bp,
                      "pca": res.pca, "seed": res.seed, "baseline": res.baseline},
           "notes": res.notes,
           "table": [{k: _json_value(v) for k, v in row.items()}
                     for row in res.table.to_dict(orient="records")]}
    path.parent.mkdir(exist_ok=True)
    atomic_write_bytes(path, (json.dumps(doc, indent=1) + "\n").encode("utf-8"))
    return path


def _json_value(v):
    """A table cell as JSON: numpy scalars as Python numbers (full precision), NaN as null."""
    if isinstance(v, np.generic):
        v = v.item()
    return None if isinstance(v, float) and np.isnan(v) else v


def load_probes(store: Store | str | os.PathLike) -> dict[str, ProbeResult]:
    """Every saved probe result of the STORE, by name (sorted); files that are not ours, are
    unreadable or were made on another number of rows are skipped with a warning."""
    st = _as_store(store)
    out: dict[str, ProbeResult] = {}
    for path in sorted((st.path / PROBES_DIR).glob("*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if doc.get("format") != PROBES_FORMAT:
                raise ValueError(f"format is not {PROBES_FORMAT}")
            if doc["n_store"] != st.n:
                log.warning("%s: made on %d examples, the STORE has %d; skipped", path,
                            doc["n_store"], st.n)
                continue
            p = doc["params"]
            out[path.stem] = ProbeResult(
                table=pd.DataFrame.from_records(doc["table"]), n_rows=p["n_rows"],
                n_store=doc["n_store"], folds=p["folds"], block_bp=p["block_bp"], pca=p["pca"],
                seed=p["seed"], notes=list(doc.get("notes", [])), baseline=p.get("baseline"))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s: not a readable probe result (%s); skipped", path, exc)
    return out
