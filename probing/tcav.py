"""Is a concept the layers encode *used* for the call? TCAV on a STORE (``dvprobe tcav``).

A linear probe (:mod:`probing.probe`) says a concept is *decodable* at a layer; it can be
decodable and play no part in the call. TCAV (Kim et al. 2018, "Interpretability Beyond
Feature Attribution") asks the other question: does moving the layer's activation towards
the concept raise the genotype's logit?

Method, per layer and concept:

1. **Concept activation vectors (CAVs)** from the STORE's own rows of that layer (what the
   probes read): a logistic regression of concept examples (the concept column true) against
   a random set of examples without it, on standardised activations; the CAV is the
   normal of its decision boundary mapped back to activation units (``coef / scale``, unit
   length). ``n_random`` random sets give ``n_random`` concept CAVs; ``n_random`` pairs of
   disjoint random sets (no concept on either side) give as many **random CAVs**, the null.
   How well a CAV separates its sets is scored held-out once per layer and concept (AUROC,
   folds by genomic block as the probes do: ``cav_auroc``). Probes save scores, not
   directions, so the CAVs are fitted here, the same way.
2. **Directional derivatives.** For ``n_examples`` examples (a seeded sample of the STORE;
   their pixels are re-read from the examples files it records, keys checked), the gradient
   of the genotype's logit with respect to the layer's output map. A STORE row is the map
   max- or mean-pooled over H and W; adding ``eps * v`` at every position of the map moves
   that pooled row by exactly ``eps * v`` (the max's position does not change), so the
   directional derivative along a CAV ``v`` is the gradient summed over positions, dotted
   with ``v`` (a flatten-pooled row: the gradient flattened the same way). The gradients
   are Captum's (:class:`~captum.attr.LayerGradientXActivation` with
   ``multiply_by_inputs=False``, as ``captum.concept.TCAV`` computes them), one backward pass
   per batch for every layer at once; every CAV reuses them.
3. **TCAV score** = the fraction of examples whose derivative is positive (zero counts as
   not positive). The target is each example's predicted genotype, or a given one
   (``target=``: then only examples called that genotype are sampled, as the paper takes the
   examples of one class).
4. **Significance**: a two-sided Welch t-test of the concept CAVs' scores against the random
   CAVs' scores (the paper's test); ``p_bonferroni`` = p x the number of layer x concept
   tests, ``significant`` when below ``alpha``. At least :data:`MIN_RANDOM` random sets.

Why not ``captum.concept.TCAV`` itself: it fits CAVs on activations it recomputes from
example iterators (the STORE has them already, pooled as the probes read them), stores
CAVs with ``torch.save`` (pickle: not for files users exchange), and leaves the test to the
caller. The gradient, the part it does that matters, is Captum's here too.

Results are saved in the STORE (``STORE/tcav/<name>.json``, atomic; the CAVs in
``<name>.npz``, plain arrays) and drawn by the report beside the probe scores: "encoded"
and "used" per layer. The model must be the STORE's (its activations define the CAVs): by
default the bundle the STORE records, refused when missing or replaced; a ``model=``
BUNDLE that is not the STORE's draws a warning (:func:`probing.explain.store_model`).

Limits: scores are relative to the random sets (drawn from examples *without* the concept);
a CAV with a held-out AUROC near 0.5 is a random direction and its score means nothing; the
untrained reference model's scores describe a random function (a control, not DeepVariant).
"""

from __future__ import annotations

import io
import json
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dvtorch.errors import DvprobeError
from dvtorch.files import atomic_write_bytes
from probing.explain import GENOTYPES, load_model, logit_forward, scaled, store_model
from probing.probe import ProbeError, genomic_folds, resolve_concepts
from probing.report import TCAV_DIR, TCAV_FORMAT, load_tcav  # noqa: F401  (the reader)
from probing.show import read_store_examples
from probing.store import Store, as_store

log = logging.getLogger(__name__)

#: the TCAV paper's minimum number of random sets for its t-test
MIN_RANDOM = 10
#: concept examples needed, and as many without the concept for every random set
MIN_CONCEPT = 10
OUTPUTS = ("logit", "probability")


class TcavError(DvprobeError):
    """A concept, layer, model or option of ``tcav`` cannot be used (the message says why)."""


@dataclass
class TcavConfig:
    """What to test. ``concepts``: yes/no obs columns (``mosaic``, ``LINE`` for
    ``rmsk_LINE``, ``col=value``; a BED becomes one with ``dvprobe annotate``); ``layers``:
    default the STORE's; ``model``: a BUNDLE or module (default: the STORE's bundle);
    ``examples``: where the STORE's examples are now (default: where it recorded them);
    ``n_examples``: examples whose derivatives are counted; ``n_concept``: examples per
    concept / random set (at most); ``folds`` / ``block_bp``: the CAVs' held-out AUROC."""

    concepts: Sequence[str] = ()
    layers: Sequence[str] | None = None
    model: Any = None
    examples: str | os.PathLike | None = None
    target: str | None = None
    output: str = "logit"
    n_examples: int = 200
    n_concept: int = 100
    n_random: int = MIN_RANDOM
    folds: int = 5
    block_bp: int = 1_000_000
    alpha: float = 0.05
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 16

    def check(self) -> None:
        if not self.concepts:
            raise TcavError("name at least one concept (--concepts mosaic,LINE)")
        if self.n_random < MIN_RANDOM:
            raise TcavError(f"n_random must be >= {MIN_RANDOM} (the TCAV paper's t-test needs "
                            f"that many random CAVs), got {self.n_random}")
        for what, v, lo in (("n_examples", self.n_examples, 2), ("n_concept", self.n_concept,
                            MIN_CONCEPT), ("batch_size", self.batch_size, 1)):
            if v < lo:
                raise TcavError(f"{what} must be >= {lo}, got {v}")
        if self.target is not None and self.target not in GENOTYPES:
            raise TcavError(f"target {self.target!r}: use {' | '.join(GENOTYPES)} (or none "
                            "for each example's predicted genotype)")
        if self.output not in OUTPUTS:
            raise TcavError(f"output {self.output!r}: use {' | '.join(OUTPUTS)}")
        if not 0 < self.alpha < 1:
            raise TcavError(f"alpha must be between 0 and 1, got {self.alpha}")


@dataclass
class TcavResult:
    """``table``: one row per layer x concept (scores, the test, the CAVs' quality);
    ``scores``: every CAV's score (long: layer, concept, kind concept|random, cav, score);
    ``cavs``: ``{"<layer>/<concept>/<kind>": [n_random, dim]}``."""

    table: pd.DataFrame
    scores: pd.DataFrame
    cavs: dict[str, np.ndarray]
    params: dict
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """One line per layer x concept, for the CLI."""
        out = []
        for r in self.table.itertuples(index=False):
            verdict = "significant" if r.significant else "not significant"
            out.append(f"{r.layer:>10}  {r.concept}: TCAV {r.score_mean:.3f} ± {r.score_sd:.3f}"
                       f" vs random {r.random_mean:.3f} ± {r.random_sd:.3f}; p {r.p:.2g}, "
                       f"Bonferroni {r.p_bonferroni:.2g}: {verdict} (CAV AUROC "
                       f"{r.cav_auroc:.3f})")
        return out


# --------------------------------------------------------------------------------------
# Planning: concepts, layers, rows
# --------------------------------------------------------------------------------------


@dataclass
class _Plan:
    store: Store
    layers: list[str]
    concepts: dict[str, np.ndarray]  # name -> boolean per STORE row (False where missing)
    chrom: np.ndarray | None
    pos: np.ndarray | None
    rows: np.ndarray  # examples whose derivatives are counted
    pred: np.ndarray | None  # the STORE's pred_genotype of those rows
    notes: list[str]


def plan(store: Store, config: TcavConfig) -> _Plan:
    """Everything checked and chosen before a model is loaded or a pixel read."""
    config.check()
    names = _layers(store, config.layers)
    dtypes = store.obs_dtypes
    wanted = [c for c, t in dtypes.items() if pd.api.types.is_bool_dtype(t)]
    for spec in config.concepts:
        col = spec.partition("=")[0]
        wanted += [col, f"rmsk_{col}"]
    wanted += ["chrom", "pos", "pred_genotype"]
    obs = store.read_obs([c for c in dict.fromkeys(wanted) if c in dtypes.index])
    try:
        resolved = resolve_concepts(obs, list(config.concepts))
    except ProbeError as exc:
        raise TcavError(str(exc)) from None
    concepts = {}
    for c in resolved:
        if c.kind != "binary":
            raise TcavError(f"--concepts {c.name}: a number, not a yes/no concept; TCAV needs "
                            f"examples with and without it (e.g. {c.name}=VALUE)")
        has = np.nan_to_num(c.values, nan=0.0) == 1
        n_with, n_without = int(has.sum()), int((c.values == 0).sum())
        need = 2 * MIN_CONCEPT
        if n_with < MIN_CONCEPT or n_without < need:
            raise TcavError(f"--concepts {c.name}: {n_with} example(s) have it and {n_without} "
                            f"do not; TCAV needs at least {MIN_CONCEPT} with and {need} "
                            "without (two disjoint random sets)")
        concepts[c.name] = has
    rows = _example_rows(store.n, obs, config)
    chrom = obs["chrom"].to_numpy() if "chrom" in obs.columns else None
    pos = obs["pos"].to_numpy() if "pos" in obs.columns else None
    pred = (obs["pred_genotype"].to_numpy()[rows].astype(np.int64)
            if "pred_genotype" in obs.columns else None)
    return _Plan(store, names, concepts, chrom, pos, rows, pred, [])


def _layers(store: Store, layers: Sequence[str] | None) -> list[str]:
    asked = list((store.meta.get("inputs") or {}).get("layers") or [])
    names = list(layers) if layers else (asked if sorted(asked) == sorted(store.layers)
                                         else list(store.layers))
    unknown = [n for n in names if n not in store.layers]
    if unknown:
        raise TcavError(f"layer(s) {', '.join(unknown)} not in {store.path} (it has "
                        f"{', '.join(store.layers)})")
    if store.n == 0:
        raise TcavError(f"{store.path}: the STORE has no examples yet")
    return names


def _example_rows(n: int, obs: pd.DataFrame, config: TcavConfig) -> np.ndarray:
    """A seeded sample of rows whose derivatives are counted (those called ``target``)."""
    pool = np.arange(n)
    if config.target is not None:
        if "pred_genotype" not in obs.columns:
            raise TcavError("target= needs the STORE's pred_genotype column (from extract)")
        pool = np.flatnonzero(obs["pred_genotype"].to_numpy() == GENOTYPES.index(config.target))
        if len(pool) < 2:
            raise TcavError(f"only {len(pool)} example(s) are called {config.target}; "
                            "choose another --target or none")
    rng = np.random.default_rng(config.seed)
    take = min(config.n_examples, len(pool))
    return np.sort(rng.choice(pool, take, replace=False))


# --------------------------------------------------------------------------------------
# CAVs
# --------------------------------------------------------------------------------------


def fit_cav(positive: np.ndarray, negative: np.ndarray, seed: int) -> np.ndarray:
    """Unit normal, in activation units, of a logistic regression of ``positive`` vs
    ``negative`` rows (standardised first; constant columns get no weight)."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    x = np.concatenate([positive, negative]).astype(np.float64)
    y = np.r_[np.ones(len(positive)), np.zeros(len(negative))]
    mu, sd = x.mean(0), x.std(0)
    sd[sd == 0] = np.inf
    # liblinear's dual solver: fewer examples than dimensions, the usual case here. One
    # BLAS thread: the fits are tiny, and BLAS threads beside torch's made each ~15x slower.
    clf = LogisticRegression(class_weight="balanced", solver="liblinear", dual=True,
                             max_iter=5000, random_state=seed)
    with threadpool_limits(1):
        clf.fit((x - mu) / sd, y)
    v = clf.coef_[0] / sd
    norm = np.linalg.norm(v)
    return v / norm if norm > 0 else v


@dataclass
class _Sets:
    """Rows of the concept side and both random sides of each of the ``n_random`` CAV pairs."""

    concept: list[np.ndarray]
    random_a: list[np.ndarray]
    random_b: list[np.ndarray]


def draw_sets(has: np.ndarray, n_concept: int, n_random: int, seed: int) -> _Sets:
    """Concept set ``i`` against random set ``b_i`` (the concept CAVs); ``a_i`` against
    ``b_i`` (random CAVs), ``a_i`` and ``b_i`` disjoint draws from the rows without it."""
    rng = np.random.default_rng(seed)
    yes, no = np.flatnonzero(has), np.flatnonzero(~has)
    m = min(n_concept, len(yes), len(no) // 2)
    sets = _Sets([], [], [])
    for _ in range(n_random):
        sets.concept.append(np.sort(rng.choice(yes, m, replace=False)))
        pick = rng.choice(no, 2 * m, replace=False)
        sets.random_a.append(np.sort(pick[:m]))
        sets.random_b.append(np.sort(pick[m:]))
    return sets


def cav_auroc(x: _Rows, sets: _Sets, plan_: _Plan, config: TcavConfig) -> float:
    """Held-out AUROC of the first concept CAV's classifier, folds by genomic block (NaN,
    with a note, when its rows fall in too few blocks)."""
    from sklearn.metrics import roc_auc_score

    rows = np.r_[sets.concept[0], sets.random_b[0]]
    y = np.r_[np.ones(len(sets.concept[0])), np.zeros(len(sets.random_b[0]))]
    chrom = plan_.chrom[rows] if plan_.chrom is not None else None
    pos = plan_.pos[rows] if plan_.pos is not None else None
    try:
        fold = genomic_folds(chrom, pos, config.folds, config.block_bp if chrom is not None
                             else 0, config.seed, n=len(rows))
    except ProbeError as exc:
        plan_.notes.append(f"CAV AUROC not scored: {exc}")
        return float("nan")
    scores = []
    for f in range(config.folds):
        te = fold == f
        if len(np.unique(y[te])) < 2 or len(np.unique(y[~te])) < 2:
            continue
        v = fit_cav(x[rows[~te & (y == 1)]], x[rows[~te & (y == 0)]], config.seed)
        scores.append(roc_auc_score(y[te], x[rows[te]] @ v))
    return float(np.mean(scores)) if scores else float("nan")


# --------------------------------------------------------------------------------------
# Directional derivatives
# --------------------------------------------------------------------------------------


def layer_gradients(model, device, images: np.ndarray, layers: Sequence[str],
                    pools: dict[str, str | None], config: TcavConfig,
                    progress: bool = False, predicted: np.ndarray | None = None
                    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per layer ``[N, dim]``: the gradient of each example's target output with respect
    to the layer's map, reduced the way the STORE's rows were pooled (summed over H and W
    for max / mean; flattened in H, W, C order for flatten); and the targets ``[N]``.
    ``predicted``: the examples' predicted genotypes when known (the STORE's, for its own
    model), else computed."""
    import torch
    from captum.attr import LayerGradientXActivation

    from dvtorch.layers import resolve

    forward = logit_forward(model) if config.output == "logit" else model
    modules = [resolve(model, name) for name in layers]
    grads: dict[str, list[np.ndarray]] = {name: [] for name in layers}
    targets = []
    for s in _bar(range(0, len(images), config.batch_size), progress):
        x = scaled(images[s:s + config.batch_size]).to(device)
        if config.target is not None:
            t = torch.full((len(x),), GENOTYPES.index(config.target))
        elif predicted is not None:
            t = torch.from_numpy(predicted[s:s + config.batch_size])
        else:
            with torch.no_grad():
                t = model(x).argmax(1).cpu()
        got = LayerGradientXActivation(forward, modules, multiply_by_inputs=False).attribute(
            x, target=t.tolist())
        for name, g in zip(layers, got, strict=True):
            grads[name].append(_reduce(g.detach().float(), pools[name]).cpu().numpy())
        targets.append(t.cpu().numpy())
    out = {name: np.concatenate(v) for name, v in grads.items()}
    for name, g in out.items():
        if not np.isfinite(g).all():
            raise TcavError(f"layer {name}: gradients are not finite (NaN/inf) for "
                            f"{int((~np.isfinite(g)).any(1).sum())} example(s)")
    return out, np.concatenate(targets)


def _reduce(g, pool: str | None):
    if g.dim() == 2:
        return g
    if pool in ("max", "mean"):
        return g.sum(dim=(2, 3))
    if pool == "flatten":
        return g.permute(0, 2, 3, 1).reshape(g.shape[0], -1)
    raise TcavError(f"a layer stored unpooled (pool {pool!r}) has no row to fit a CAV on")


def _bar(items, progress: bool):
    if not progress:
        return items
    import sys

    from tqdm.auto import tqdm

    return tqdm(items, unit="batch", desc="tcav gradients", file=sys.stderr,
                dynamic_ncols=True)


def tcav_score(grads: np.ndarray, cav: np.ndarray) -> float:
    """The fraction of examples whose directional derivative along ``cav`` is positive."""
    return float(np.mean(grads @ cav > 0))


def significance(concept: np.ndarray, random: np.ndarray) -> tuple[float, float]:
    """``(t, p)`` of a two-sided Welch t-test; equal constant samples give ``(0, 1)``,
    different constant samples ``(±inf, 0)``."""
    from scipy.stats import ttest_ind

    if np.ptp(concept) == 0 and np.ptp(random) == 0:
        d = float(concept[0] - random[0])
        return (0.0, 1.0) if d == 0 else (float(np.sign(d) * np.inf), 0.0)
    with warnings.catch_warnings():  # one constant sample (all 1.0): scipy warns, rightly
        warnings.simplefilter("ignore", RuntimeWarning)  # computed, as the variance is 0
        t, p = ttest_ind(concept, random, equal_var=False)
    return float(t), float(p)


# --------------------------------------------------------------------------------------
# The whole computation
# --------------------------------------------------------------------------------------


def tcav(store: Store | str | os.PathLike, config: TcavConfig | None = None, *,
         progress: bool = True, **options: Any) -> TcavResult:
    """TCAV scores and their significance for every layer x concept (module docstring).

    ``options`` override fields of ``config`` (``tcav(store, concepts=["mosaic"],
    n_examples=50)``). Nothing is saved here: :func:`save_tcav` does that.
    """
    from dataclasses import replace

    st = as_store(store)
    config = replace(config or TcavConfig(), **options)
    p = plan(st, config)
    model_ref, warned = store_model(st, config.model)
    model, device = load_model(model_ref, config.device)
    if (getattr(model, "bundle_meta", None) or {}).get("untrained"):
        p.notes.append("the model is UNTRAINED (a seeded reference bundle): its scores say how "
                       "a random network responds to the concepts, nothing about DeepVariant")
    exs = read_store_examples(st, p.rows.tolist(), config.examples,
                              examples_option="--examples")
    images = np.stack([exs[int(r)].image for r in p.rows])
    pools = {name: st.layer_specs[name].pool for name in p.layers}
    own = not warned and not hasattr(config.model, "parameters")  # the STORE's bundle
    grads, targets = layer_gradients(model, device, images, p.layers, pools, config, progress,
                                     p.pred if own else None)
    sets = {c: draw_sets(has, config.n_concept, config.n_random, config.seed)
            for c, has in p.concepts.items()}
    needed = np.unique(np.concatenate([np.concatenate(s.concept + s.random_a + s.random_b)
                                       for s in sets.values()]))
    records, scores, cavs = [], [], {}
    for name in p.layers:
        x = _Rows(st, name, needed)
        _check_dims(name, x, grads[name])
        for cname, has in p.concepts.items():
            rec, cav, sc = _layer_concept(x, grads[name], has, sets[cname], p, config)
            records.append({"layer": name, "concept": cname, **rec})
            for kind in ("concept", "random"):
                cavs[f"{name}/{cname}/{kind}"] = cav[kind]
                scores += [{"layer": name, "concept": cname, "kind": kind, "cav": i,
                            "score": s} for i, s in enumerate(sc[kind])]
    table = pd.DataFrame.from_records(records)
    table["p_bonferroni"] = np.minimum(1.0, table["p"] * len(table))
    table["significant"] = table["p_bonferroni"] < config.alpha
    counts = np.bincount(targets, minlength=3)
    params = {"n_examples": len(p.rows), "n_random": config.n_random,
              "n_concept": config.n_concept, "output": config.output,
              "target": config.target or "predicted", "alpha": config.alpha,
              "seed": config.seed, "folds": config.folds, "block_bp": config.block_bp,
              "targets": {g: int(k) for g, k in zip(GENOTYPES, counts, strict=True)},
              "model": str(model_ref) if isinstance(model_ref, (str, os.PathLike))
              else type(model_ref).__name__}
    return TcavResult(table, pd.DataFrame.from_records(scores), cavs, params, p.notes, warned)


def _check_dims(name: str, x: _Rows, g: np.ndarray) -> None:
    if x.dim != g.shape[1]:
        raise TcavError(f"layer {name}: the STORE's rows are {x.dim}-wide, the model's "
                        f"gradient {g.shape[1]}-wide: not the model the STORE was made with "
                        "(--model)")


class _Rows:
    """The layer's rows the CAVs need (sorted STORE row numbers ``needed``), indexed by STORE
    row number: only those rows are read."""

    def __init__(self, st: Store, name: str, needed: np.ndarray):
        self.needed = needed
        self.x = np.asarray(st.layer(name)[needed], dtype=np.float32)
        if not np.isfinite(self.x).all():
            raise TcavError(f"{st.path}: layer {name} holds NaN or infinite values in the "
                            "CAVs' rows (an fp16 overflow?); a CAV needs finite activations")

    @property
    def dim(self) -> int:
        return self.x.shape[1]

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        return self.x[np.searchsorted(self.needed, rows)]


def _layer_concept(x: _Rows, grads: np.ndarray, has: np.ndarray, sets: _Sets, p: _Plan,
                   config: TcavConfig) -> tuple[dict, dict, dict]:
    """One layer x concept: CAVs, their scores, the test."""
    cav = {"concept": np.stack([fit_cav(x[c], x[b], config.seed)
                                for c, b in zip(sets.concept, sets.random_b, strict=True)]),
           "random": np.stack([fit_cav(x[a], x[b], config.seed)
                               for a, b in zip(sets.random_a, sets.random_b, strict=True)])}
    sc = {k: np.array([tcav_score(grads, v) for v in vs]) for k, vs in cav.items()}
    t, pval = significance(sc["concept"], sc["random"])
    rec = {"score_mean": float(sc["concept"].mean()), "score_sd": float(sc["concept"].std(ddof=1)),
           "random_mean": float(sc["random"].mean()), "random_sd": float(sc["random"].std(ddof=1)),
           "t": t, "p": pval, "cav_auroc": cav_auroc(x, sets, p, config),
           "n_set": len(sets.concept[0]), "n_with": int(has.sum()),
           "n_examples": len(grads)}
    return rec, cav, sc


# --------------------------------------------------------------------------------------
# Saved in the STORE (JSON + npz, no pickle), for the report
# --------------------------------------------------------------------------------------


def check_name(name: str) -> str:
    if not name or name.startswith(".") or any(c in name for c in "/\\\0") or len(name) > 200:
        raise TcavError(f"--name {name[:60]!r}: not a valid name (a file in STORE/{TCAV_DIR}: "
                        "at most 200 characters, no '/' or '\\', no leading '.')")
    return name


def save_tcav(store: Store | str | os.PathLike, res: TcavResult, name: str = "tcav") -> Path:
    """``STORE/tcav/<name>.json`` (table, scores, parameters) and ``<name>.npz`` (the CAVs),
    each written atomically; replaces results of the same name."""
    st = as_store(store)
    directory = st.path / TCAV_DIR
    directory.mkdir(exist_ok=True)
    path = directory / f"{check_name(name)}.json"
    buf = io.BytesIO()
    np.savez_compressed(buf, **{k.replace("/", "|"): v for k, v in res.cavs.items()})
    atomic_write_bytes(path.with_suffix(".npz"), buf.getvalue())
    doc = {"format": TCAV_FORMAT, "name": name, "n_store": st.n,
           "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "params": res.params, "notes": res.notes,
           "table": _records(res.table), "scores": _records(res.scores)}
    atomic_write_bytes(path, (json.dumps(doc, indent=1) + "\n").encode("utf-8"))
    return path


def _records(df: pd.DataFrame) -> list[dict]:
    def plain(v):
        v = v.item() if isinstance(v, np.generic) else v
        return None if isinstance(v, float) and not np.isfinite(v) else v

    return [{k: plain(v) for k, v in r.items()} for r in df.to_dict(orient="records")]
