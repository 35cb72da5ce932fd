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
  (``block_bp=0``: folds by position, which keeps only a multi-allelic site together).
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
from probing.enrich import EnrichmentError, equals_value, to_markdown
from probing.enrich import check_output as enrich_check_output
from probing.store import Store, StoreError, as_store

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
    """One thing to decode: ``values`` over the STORE's rows as float64, NaN where a row has
    no value (those rows take no part in its probe): 0 / 1 for a yes/no concept."""

    name: str
    kind: str  # "binary" | "continuous"
    values: np.ndarray

    @property
    def metric(self) -> str:
        return "AUROC" if self.kind == "binary" else "R2"


def resolve_concepts(frame: pd.DataFrame, specs: Sequence[str] | None) -> list[Concept]:
    """``specs`` as concepts: a boolean column (``LINE`` finds ``rmsk_LINE``), ``col=value``
    (one value of a categorical column) or a numeric column (a number to regress). None:
    every boolean column, plus :data:`CONTINUOUS_DEFAULT` where present. Missing values stay
    missing (NaN), for yes/no concepts too: a row with no annotation is not a "no"."""
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
    concepts = [_concept(frame, spec) for spec in names]
    seen = [c.name for c in concepts]
    twice = sorted({n for n in seen if seen.count(n) > 1})
    if twice:
        raise ProbeError(f"--concepts names {', '.join(twice)} more than once")
    return concepts


def _concept(frame: pd.DataFrame, spec: str) -> Concept:
    if "=" in spec:
        col, _, value = spec.partition("=")
        if col not in frame.columns:
            raise ProbeError(f"--concepts {spec}: no column {col!r}")
        s = frame[col]
        return Concept(spec, "binary", _with_missing(equals_value(s, value), s))
    col = spec if spec in frame.columns else f"rmsk_{spec}" if f"rmsk_{spec}" in frame.columns \
        else None
    if col is None:
        bools = [c for c in frame.columns if frame[c].dtype == bool]
        raise ProbeError(f"no concept {spec!r} (nor rmsk_{spec}); boolean columns: {bools}")
    s = frame[col]
    if s.dtype == bool or str(s.dtype) == "boolean":
        return Concept(col, "binary", _with_missing(s.fillna(False).to_numpy(bool), s))
    if not pd.api.types.is_numeric_dtype(s):
        shown = ", ".join(map(str, list(pd.unique(s.dropna()))[:3]))
        raise ProbeError(f"--concepts {col}: a text column (values like {shown}); probe one "
                         f"value as a yes/no concept, e.g. {col}={s.dropna().iloc[0]}"
                         if s.notna().any() else f"--concepts {col}: the column has no values")
    values = pd.to_numeric(s, errors="coerce").to_numpy(np.float64)
    present = values[np.isfinite(values)]
    if not len(present):
        raise ProbeError(f"--concepts {col}: the column has no values")
    levels = np.unique(present)
    if set(levels) <= {0.0, 1.0}:
        return Concept(col, "binary", values)  # a 0/1 flag
    if len(levels) <= 10 and np.all(levels == np.round(levels)):
        shown = ", ".join(f"{v:g}" for v in levels)
        raise ProbeError(f"--concepts {col}: a column of only {len(levels)} whole numbers "
                         f"({shown}) is a category, not a quantity; probe one value as a yes/no "
                         f"concept, e.g. {col}={levels[-1]:g}")
    return Concept(col, "continuous", values)


def _with_missing(hit: np.ndarray, source: pd.Series) -> np.ndarray:
    """0 / 1 as float64, NaN where ``source`` has no value."""
    out = hit.astype(np.float64)
    out[source.isna().to_numpy()] = np.nan
    return out


#: largest --block-bp accepted (1 Tb: more than any genome; keeps positions // block in int64)
MAX_BLOCK_BP = 10**12


def genomic_folds(chrom: Sequence | np.ndarray | None, pos: Sequence | np.ndarray | None,
                  k: int, block_bp: int, seed: int = 0, n: int | None = None) -> np.ndarray:
    """Fold (0..k-1) of every row; rows of one ``block_bp`` block share a fold.

    Blocks are dealt to folds largest first (ties in a seeded random order), each to the
    fold with the fewest rows so far, so folds come out near equal in size. ``block_bp=0``
    makes every position its own block (the examples of a multi-allelic site, which share
    one pileup, stay together); without ``chrom``/``pos`` (None; give ``n``) every row is its
    own block.
    """
    check_fold_options(k, block_bp)
    if chrom is None or pos is None:
        keys = np.arange(n if n is not None else 0)
        what = "rows"
    else:
        keys = _block_keys(chrom, pos, max(block_bp, 1))  # 0: one block per position
        what = f"genomic block(s) of {block_bp:,} bp" if block_bp else "positions"
    n_blocks = int(keys.max()) + 1 if len(keys) else 0
    if n_blocks < k:
        fix = "a smaller --block-bp or fewer --folds" if what.startswith("genomic") \
            else "fewer --folds"
        raise ProbeError(f"only {n_blocks} {what} for {k} folds: use {fix}")
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


def check_fold_options(folds: int, block_bp: int) -> None:
    if folds < 2:
        raise ProbeError(f"--folds must be >= 2, got {folds}")
    if not 0 <= block_bp <= MAX_BLOCK_BP:
        raise ProbeError(f"--block-bp must be between 0 and {MAX_BLOCK_BP:,}, got {block_bp}")


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
           y_te: np.ndarray, seed: int) -> float:
    """Held-out score of one fold (one that :func:`_scorable_folds` admits for ``concept``)."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.metrics import r2_score, roc_auc_score

    if concept.kind == "binary":
        clf = LogisticRegression(class_weight="balanced", max_iter=2000, random_state=seed)
        clf.fit(a, y_tr)
        return float(roc_auc_score(y_te, clf.decision_function(b)))
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

    def best(self) -> pd.DataFrame:
        """Per concept (table order): the layer where it is best decoded (``best_layer``,
        ``best``, its ``sd``, ``folds`` and, with a baseline, ``gain`` / ``baseline_mean``
        there) and what the last layer keeps (``last_layer``, ``last``)."""
        rows = []
        for concept, g in self.table.groupby("concept", sort=False):
            g = g.dropna(subset=["mean"])
            if g.empty:
                continue
            top, last = g.loc[g["mean"].idxmax()], g.iloc[-1]
            rows.append({"concept": concept, "metric": top["metric"], "best_layer": top["layer"],
                         "best": top["mean"], "sd": top["sd"], "folds": int(top["folds"]),
                         "gain": top.get("gain", np.nan),
                         "baseline_mean": top.get("baseline_mean", np.nan),
                         "last_layer": last["layer"], "last": last["mean"]})
        return pd.DataFrame(rows)

    def peaks(self) -> list[str]:
        """Per concept, one line of :meth:`best`."""
        lines = []
        for r in self.best().itertuples(index=False):
            tail = ("" if r.last_layer == r.best_layer else
                    f"; {r.last_layer} {r.last:.3f} ({r.last - r.best:+.3f})")
            if not np.isnan(r.gain):
                tail += (f"; over the baseline at {r.best_layer}: {r.gain:+.3f} "
                         f"(baseline {r.baseline_mean:.3f})")
            lines.append(f"{r.concept}: best {r.best_layer} ({r.metric} {r.best:.3f})" + tail)
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
               else "folds by position (--block-bp 0)")
        sample = (f"{self.n_rows:,} of {self.n_store:,} examples (seed {self.seed})"
                  if self.n_rows < self.n_store else f"{self.n_rows:,} examples")
        against = (f"; (+x) = gain over the same probe on the baseline {self.baseline}"
                   if self.baseline else "")
        features = (f"standardise + PCA to {self.pca} components (fewer for a narrower layer)"
                    if self.pca else "standardise (no PCA)")
        return (f"linear probes, {self.folds}-fold CV, {how}, {features} "
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
    for exp in range(int(np.log10(max(block_bp, 1))), 1, -1):
        for lead in (5, 2, 1):
            size = lead * 10 ** (exp - 1)
            if size < block_bp and _block_keys(chrom, pos, size).max() + 1 >= 2 * k:
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
    of the same examples extracted with another model (the untrained reference); its rows
    are joined to this STORE's by example key, the same examples, folds and concepts are
    probed there too, and the table gains ``baseline_mean``, ``baseline_sd`` and ``gain``
    (mean - baseline_mean).
    """
    from probing.analysis.guard import warn_if_partial

    st = as_store(store)
    _check_options(pca, max_rows, seed, folds, block_bp)
    names = _layer_names(st, layers)
    warn_if_partial(st, log)
    obs = _probe_obs(st, concepts)
    todo = resolve_concepts(obs, concepts)
    missing = [c for c in ("chrom", "pos") if c not in obs.columns]
    if block_bp and missing:
        raise ProbeError(f"{st.path}: obs has no {'/'.join(missing)} to make genomic blocks "
                         "from; pass --block-bp 0 for folds by row (examples that are "
                         "neighbours then land on both sides and inflate the scores)")
    base = _baseline(as_store(baseline), st, names) if baseline is not None else None
    rows = _sample_rows(st.n, max_rows, seed)
    _check_memory(st, names, len(rows), available)
    chrom, pos = (obs["chrom"].to_numpy()[rows], obs["pos"].to_numpy()[rows]) \
        if not missing else (None, None)
    fold = _folds(chrom, pos, folds, block_bp, seed, len(rows))
    ys, notes = _targets(todo, rows, fold, folds)
    n_blocks = len(np.unique(_block_keys(chrom, pos, block_bp))) if block_bp else None
    if n_blocks is not None and n_blocks < FEW_BLOCKS:
        notes.append(f"only {n_blocks} genomic blocks of {block_bp:,} bp: a concept that covers "
                     "whole regions is scored on few independent units, so its score varies "
                     "with --seed; a smaller --block-bp gives more")
    table = _probe_table(st, base, names, rows, ys, fold, folds, pca, seed, progress)
    return ProbeResult(table=table, n_rows=len(rows), n_store=st.n, folds=folds,
                       block_bp=block_bp, pca=pca, seed=seed, notes=notes,
                       baseline=str(base.store.path) if base is not None else None)


def _check_options(pca: int, max_rows: int, seed: int, folds: int, block_bp: int) -> None:
    if pca < 0:
        raise ProbeError(f"--pca must be >= 0, got {pca}")
    if max_rows < 2:
        raise ProbeError(f"--max-rows must be >= 2, got {max_rows}")
    if seed < 0:
        raise ProbeError(f"--seed must be >= 0, got {seed}")
    check_fold_options(folds, block_bp)


def _layer_names(st: Store, layers: Sequence[str] | None) -> list[str]:
    """The layers to probe (default: the STORE's, in extraction order), each checked."""
    names = list(layers) if layers is not None else _extraction_order(st)
    unknown = [n for n in names if n not in st.layers]
    if unknown:
        raise ProbeError(f"layer(s) {', '.join(unknown)} not in {st.path} (it has "
                         f"{', '.join(st.layers)}; extract them first)")
    if len(set(names)) != len(names) or not names:
        raise ProbeError(f"--layers must name each layer once, got {names}")
    if st.n == 0:
        raise ProbeError(f"{st.path}: the STORE has no examples yet")
    return names


def _probe_obs(st: Store, concepts: Sequence[str] | None) -> pd.DataFrame:
    """The obs columns a probe reads, and no others (a large STORE's key and locus strings
    are most of its obs): every boolean column (the default concepts, and what an unknown
    concept's message lists), the columns ``concepts`` may name, ``chrom`` and ``pos``."""
    dtypes = st.obs_dtypes
    wanted = [c for c, t in dtypes.items() if pd.api.types.is_bool_dtype(t)]
    if concepts is None:
        wanted += list(CONTINUOUS_DEFAULT)
    else:
        for spec in concepts:
            col = spec.partition("=")[0]
            wanted += [col, f"rmsk_{col}"]
    wanted += ["chrom", "pos"]
    return st.read_obs([c for c in dict.fromkeys(wanted) if c in dtypes.index])


def _sample_rows(n: int, max_rows: int, seed: int) -> np.ndarray:
    """One seeded sample of at most ``max_rows`` rows, sorted (every layer reads the same)."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, max_rows, replace=False)) if n > max_rows else np.arange(n)


def _check_memory(st: Store, names: Sequence[str], n_rows: int, available: int | None) -> None:
    """Refuse a sample whose widest layer would not fit in :data:`MEMORY_SHARE` of memory."""
    from probing.analysis.guard import available_memory

    room = available if available is not None else available_memory()
    widest = max(st.layer_specs[name].dim for name in names)
    need = n_rows * widest * 4 * 3  # the rows, their standardised copy, the PCA's work
    if room and need > MEMORY_SHARE * room:
        fit = int(MEMORY_SHARE * room / (widest * 4 * 3))
        advice = (f"pass --max-rows {fit} or less" if fit >= 100 else
                  "too little memory for a probe of this layer (a flatten-pooled one? probe "
                  "a max- or mean-pooled extraction)")
        raise ProbeError(f"{n_rows:,} rows of a {widest:,}-wide layer need ~{need / 1e9:.1f} "
                         f"GB, more than {MEMORY_SHARE:.0%} of the {room / 1e9:.1f} GB "
                         f"available; {advice}")


def _folds(chrom: np.ndarray | None, pos: np.ndarray | None, folds: int, block_bp: int,
           seed: int, n: int) -> np.ndarray:
    """:func:`genomic_folds` of the sample, suggesting a smaller block when too few."""
    try:
        return genomic_folds(chrom, pos, folds, block_bp, seed, n=n)
    except ProbeError as exc:
        better = _suggest_block(chrom, pos, folds, block_bp) if block_bp else None
        if better is None:
            raise
        raise ProbeError(f"{exc} (--block-bp {better} gives at least {2 * folds} blocks "
                         "here)") from None


#: a concept to probe: the concept, its sampled values and the folds that can score it
Target = tuple[Concept, np.ndarray, list[int]]


def _targets(todo: Sequence[Concept], rows: np.ndarray, fold: np.ndarray, folds: int
             ) -> tuple[dict[str, Target], list[str]]:
    """The concepts the sample can score, and a note for each one it cannot (fully)."""
    notes: list[str] = []
    ys: dict[str, Target] = {}
    for c in todo:
        y = c.values[rows]
        if c.kind == "binary":
            have, yes = int(np.isfinite(y).sum()), int(np.nansum(y))
            if min(yes, have - yes) < folds:
                notes.append(f"{c.name}: not probed: {yes} of the {have} sampled examples with "
                             f"a value have it and {have - yes} do not; each side needs at "
                             f"least {folds} (one per fold)")
                continue
        usable = _scorable_folds(c, y, fold, folds)
        if not usable:
            notes.append(f"{c.name}: not probed: {_why_not(c, y, fold, folds)}")
            continue
        if len(usable) < folds:
            notes.append(f"{c.name}: scored on {len(usable)} of {folds} folds (the others' "
                         "held-out part " + ("lacks one class" if c.kind == "binary"
                                             else "has fewer than 2 values") + ")")
        ys[c.name] = (c, y, usable)
    if not ys:
        raise ProbeError("no concept can be probed: " + "; ".join(notes))
    return ys, notes


def _probe_table(st: Store, base: Baseline | None, names: Sequence[str], rows: np.ndarray,
                 ys: dict[str, Target], fold: np.ndarray, folds: int, pca: int, seed: int,
                 progress: bool) -> pd.DataFrame:
    """One row per layer x concept: the held-out scores (and the baseline's, when given)."""
    from tqdm.auto import tqdm

    records = []
    with tqdm(total=len(names) * folds * (2 if base is not None else 1), desc="probe",
              unit="fold", disable=not progress, leave=False) as bar:
        for name in names:
            scores = _layer_scores(st, name, rows, ys, fold, folds, pca, seed, bar)
            if base is not None:
                base_scores = _layer_scores(base.store, name, base.rows[rows], ys, fold, folds,
                                            pca, seed, bar)
            for cname, (c, y, _) in ys.items():
                rec = {"layer": name, "concept": cname, "metric": c.metric,
                       **_summary(scores[cname]), "folds": len(scores[cname]),
                       "n": int(np.isfinite(y).sum()),
                       "n_with": int(np.nansum(y)) if c.kind == "binary" else np.nan}
                if base is not None:
                    b = _summary(base_scores[cname])
                    rec.update(baseline_mean=b["mean"], baseline_sd=b["sd"],
                               gain=rec["mean"] - b["mean"])
                records.append(rec)
    return pd.DataFrame.from_records(records)


#: fewer genomic blocks than this in the sample draws a note (the score of a concept that
#: covers whole regions then swings with the seed)
FEW_BLOCKS = 100


def _block_keys(chrom: np.ndarray, pos: np.ndarray, block_bp: int) -> np.ndarray:
    frame = pd.DataFrame({"c": np.asarray(chrom).astype(str),
                          "b": np.asarray(pos, dtype=np.int64) // block_bp})
    return frame.groupby(["c", "b"], sort=False).ngroup().to_numpy()


def _scorable_folds(c: Concept, y: np.ndarray, fold: np.ndarray, folds: int) -> list[int]:
    """Folds whose held-out part can be scored for ``c`` (and whose training part can fit
    it): both classes on both sides for a yes/no concept, two values or more otherwise."""
    ok = []
    for f in range(folds):
        tr, te = y[(fold != f) & np.isfinite(y)], y[(fold == f) & np.isfinite(y)]
        if c.kind == "binary":
            good = len(np.unique(tr)) == 2 and len(np.unique(te)) == 2
        else:
            good = len(te) >= 2 and len(tr) >= 2 and np.ptp(tr) > 0
        if good:
            ok.append(f)
    return ok


def _why_not(c: Concept, y: np.ndarray, fold: np.ndarray, folds: int) -> str:
    have = np.isfinite(y)
    if c.kind != "binary":
        return f"{int(have.sum())} of {len(y)} sampled examples have a value"
    yes = int(np.nansum(y))
    spread = len(np.unique(fold[y == 1]))
    return (f"its {yes} sampled examples (of {int(have.sum())}) fall in {spread} of the "
            f"{folds} folds; no held-out fold has both classes (a smaller --block-bp spreads "
            "them)")


def _summary(scores: list[float]) -> dict[str, float]:
    v = np.asarray(scores)
    return {"mean": float(v.mean()) if len(v) else np.nan,
            "sd": float(v.std(ddof=1)) if len(v) > 1 else np.nan}


def _layer_scores(st: Store, name: str, rows: np.ndarray,
                  ys: dict[str, tuple[Concept, np.ndarray, list[int]]], fold: np.ndarray,
                  folds: int, pca: int, seed: int, bar) -> dict[str, list]:
    """Held-out scores of every concept on one layer's sampled rows, over the folds where it
    can be scored; the features are fitted once per fold and shared by the concepts. Rows
    where a concept has no value take no part in its probe."""
    x = np.asarray(st.layer(name)[rows], dtype=np.float32)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise ProbeError(f"{st.path}: layer {name} holds NaN or infinite values in "
                         f"{int(bad.sum())} of the {len(x)} sampled examples (e.g. row "
                         f"{int(rows[np.argmax(bad)])}; an fp16 overflow?); a probe needs "
                         "finite activations")
    scores: dict[str, list[float]] = {c: [] for c in ys}
    for f in range(folds):
        test = fold == f
        scored = [(cname, c, y) for cname, (c, y, usable) in ys.items() if f in usable]
        if scored:
            a, b = _features(x[~test], x[test], pca, seed)
        for cname, c, y in scored:
            keep_tr, keep_te = np.isfinite(y[~test]), np.isfinite(y[test])
            scores[cname].append(_score(c, a[keep_tr], b[keep_te], y[~test][keep_tr],
                                        y[test][keep_te], seed))
        bar.update(1)
    return scores


@dataclass(frozen=True)
class Baseline:
    """A baseline STORE and, for each row of the probed STORE, its row of the same example."""

    store: Store
    rows: np.ndarray


def _baseline(base: Store, st: Store, names: Sequence[str]) -> Baseline:
    """The baseline STORE must hold the same examples (joined by key, in any order) and the
    probed layers, pooled alike."""
    if base.path.resolve() == st.path.resolve():
        raise ProbeError(f"--baseline {base.path} is the STORE itself")
    if base.n != st.n:
        raise ProbeError(f"--baseline {base.path} has {base.n:,} examples, {st.path} "
                         f"{st.n:,}: extract the same examples with the baseline model")
    try:
        rows = st.align_keys(base.keys, f"--baseline {base.path}",
                             hint="extract the same examples (same files, same --limit) with "
                                  "the baseline model")
    except StoreError as exc:
        raise ProbeError(str(exc)) from None
    for name in names:
        if name not in base.layers:
            raise ProbeError(f"--baseline {base.path} has no layer {name} (it has "
                             f"{', '.join(base.layers)})")
        mine, theirs = st.layer_specs[name], base.layer_specs[name]
        if (mine.dim, mine.pool) != (theirs.dim, theirs.pool):
            raise ProbeError(f"--baseline {base.path}: layer {name} is {theirs.dim}-wide, "
                             f"pooled {theirs.pool}; here {mine.dim}-wide, pooled {mine.pool}")
    return Baseline(base, rows)


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
    """Refuse an ``--out`` :func:`write_probes` cannot write (enrich's rule: .csv or .md; a
    directory, or a place it may not write), before probing anything."""
    try:
        out = enrich_check_output(out)
    except EnrichmentError as exc:
        raise ProbeError(str(exc)) from None
    if out.is_dir():
        raise ProbeError(f"--out {out}: a directory; name a .csv or .md file")
    scratch = out.with_name(f".{out.name}.check")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        scratch.write_bytes(b"")
        scratch.unlink()
    except OSError as exc:
        raise ProbeError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None
    return out


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
    if not name or name.startswith(".") or any(c in name for c in "/\\\0") or len(name) > 200:
        raise ProbeError(f"--name {name[:60]!r}{'...' if len(name) > 60 else ''}: not a valid "
                         "name (it names a file in STORE/probes: at most 200 characters, no "
                         "'/' or '\\', no leading '.')")
    return name


def probes_path(store: Store, name: str) -> Path:
    return store.path / PROBES_DIR / f"{check_name(name)}.json"


def check_new(store: Store, name: str, overwrite: bool) -> None:
    """Refuse to replace saved probes unless asked to (the CLI's ``--overwrite``)."""
    if not overwrite and probes_path(store, name).exists():
        raise ProbeError(f"probes {name!r} already exist in {store.path}; pass --overwrite to "
                         "replace them or choose another --name")


def check_writable(store: Store, name: str) -> Path:
    """Fail now, not after the probing, when ``STORE/probes/<name>.json`` cannot be written
    (a read-only STORE, a name too long for the file system): write and remove a scratch
    file of the same name length beside it."""
    path = probes_path(store, name)
    scratch = path.with_name(f".{path.name}.check")
    try:
        path.parent.mkdir(exist_ok=True)
        scratch.write_bytes(b"")
        scratch.unlink()
    except OSError as exc:
        raise ProbeError(f"cannot save probes as {path}: {exc.strerror or exc} (--no-save only "
                         "prints them; --out writes them elsewhere)") from None
    return path


def save_probes(store: Store | str | os.PathLike, res: ProbeResult, name: str = "probes"
                ) -> Path:
    """Write ``res`` to ``STORE/probes/<name>.json`` atomically (replacing one of that name).

    Saved with the STORE's row count: probes of a partial STORE are set aside with its runs
    when extraction resumes, and :func:`load_probes` skips any made on another row count."""
    st = as_store(store)
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
    st = as_store(store)
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
