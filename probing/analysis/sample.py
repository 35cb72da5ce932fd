"""Which rows a run is fitted on: every row, or a seeded sample stratified by chromosome.

Why sample by default: fitting a normaliser, a PCA, k-means centres or a UMAP on a few
hundred thousand examples gives the same models as fitting them on millions (the models are
a few hundred numbers per dimension), while the fit's time, and for k-means / UMAP its
memory, grow with the rows. So above a per-method row count (:data:`FIT_ROWS`) a run fits on
a sample of that many rows and then pushes *every* row through the fitted models, chunk by
chunk (:mod:`probing.analysis.stream`). The run records which rows (``fit_rows``), how many,
the seed and why (``run.json`` ``fit_sample``), and the CLI prints it.

The sample is stratified by chromosome (obs ``chrom``): each contig gets its share of the
sample, so a small chromosome (chrM, chrY, a decoy) is represented as it is in the STORE
instead of by luck. Within a chromosome, rows are drawn uniformly with the run's seed.
A STORE without ``chrom`` is sampled uniformly.

``fit_sample`` (``--fit-sample``): ``None`` / ``"auto"`` (the default above), an integer N
(fit on N rows, stratified the same way) or ``"all"`` (fit on every row; the scale guard
still refuses a fit that cannot fit in memory, and warns about a slow one).

:data:`FIT_ROWS` (rows above which a method fits on a sample of that size, CPU or GPU):

=============  =========  ==============================================================
method         rows       why this size
=============  =========  ==============================================================
pca            500,000    a d x d covariance: more rows change the components little
kmeans         200,000    k-means restarts cost rows x k x restarts
hkmeans        200,000    the same, at each node
spectral       200,000    its 1000 k-means landmarks cost rows x 1000
hspectral      100,000    landmarks at every node
multilayer     200,000    per-layer PCAs, concat PCA and k-means
umap            50,000    umap-learn's fit grows faster than linearly; the other rows are
                          transformed (see :func:`probing.analysis.guard.umap_transform_note`)
=============  =========  ==============================================================
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from probing.analysis.errors import AnalysisError
from probing.store import Store

#: rows above which a method fits on a seeded, chromosome-stratified sample of that size
FIT_ROWS = {"pca": 500_000, "kmeans": 200_000, "hkmeans": 200_000, "spectral": 200_000,
            "hspectral": 100_000, "multilayer": 200_000, "umap": 50_000}
#: rows up to which multilayer adds its display UMAP by default on the CPU (above, the
#: transform of every row takes long: ``umap=True`` / ``--umap`` asks for it anyway)
DISPLAY_UMAP_ROWS = 200_000
#: the obs column samples are stratified by
STRATUM = "chrom"


@dataclass(frozen=True)
class FitSample:
    """The rows a run is fitted on and why; ``rows`` None = every row."""

    rows: np.ndarray | None  # sorted row indices
    n: int  # rows in the STORE
    seed: int
    why: str
    stratified_by: str | None = None

    @property
    def n_fit(self) -> int:
        return self.n if self.rows is None else len(self.rows)

    def to_meta(self) -> dict:
        return {"rows": self.n_fit, "of": self.n, "seed": self.seed, "why": self.why,
                "stratified_by": self.stratified_by if self.rows is not None else None}

    def describe(self) -> str:
        """One line for logs and the CLI summary."""
        if self.rows is None:
            return f"fitted on all {self.n:,} rows ({self.why})"
        how = f"stratified by {self.stratified_by}" if self.stratified_by else "uniform"
        return (f"fitted on a sample of {self.n_fit:,} of {self.n:,} rows (seed {self.seed}, "
                f"{how}): {self.why}")


def parse_fit_sample(value: int | str | None) -> int | str | None:
    """``None``/``"auto"`` -> None, ``"all"`` -> "all", ``N`` / ``"N"`` -> N (>= 2)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    if isinstance(value, str):
        text = value.strip().lower().replace(",", "").replace("_", "")
        if text == "all":
            return "all"
        if not text.isdigit():
            raise AnalysisError(f"--fit-sample must be a row count, 'all' or 'auto', not "
                                f"{value!r}")
        value = int(text)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise AnalysisError(f"--fit-sample must be a row count, 'all' or 'auto', not {value!r}")
    if value < 2:
        raise AnalysisError(f"--fit-sample must be at least 2, got {value}")
    return int(value)


def default_rows(method: str) -> int:
    return FIT_ROWS.get(method, FIT_ROWS["kmeans"])


def choose_fit_rows(store: Store, method: str, fit_sample: int | str | None,
                    seed: int) -> FitSample:
    """The rows ``method`` fits on under ``fit_sample`` (see the module doc)."""
    n = store.n
    asked = parse_fit_sample(fit_sample)
    if asked == "all":
        return FitSample(None, n, seed, "--fit-sample all")
    if asked is None:
        size = default_rows(method)
        if n <= size:
            return FitSample(None, n, seed, f"{n:,} rows: at most the {size:,} above which "
                                            f"{method} fits on a sample")
        why = (f"the default for {method} above {size:,} rows; --fit-sample all fits every "
               "row, --fit-sample N another sample size")
    else:
        size = asked
        if size >= n:
            return FitSample(None, n, seed, f"--fit-sample {size:,} >= {n:,} rows")
        why = f"--fit-sample {size:,}"
    strata = _strata(store)
    rows = stratified_sample(strata, size, seed) if strata is not None else \
        np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
    return FitSample(rows, n, seed, why, STRATUM if strata is not None else None)


def _strata(store: Store) -> np.ndarray | None:
    """Integer stratum of every row (its chromosome), or None without a ``chrom`` column."""
    if STRATUM not in store.obs_dtypes.index:
        return None
    _, codes = np.unique(store.read_obs([STRATUM])[STRATUM].astype(str).to_numpy(),
                         return_inverse=True)
    return codes.ravel()


def stratified_sample(strata: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted rows: ``size`` in all, each stratum's share proportional to its rows (largest
    remainders round up), drawn uniformly within it with ``seed``."""
    strata = np.asarray(strata)
    n = len(strata)
    if size >= n:
        return np.arange(n)
    counts = np.bincount(strata)
    exact = counts * (size / n)
    take = np.floor(exact).astype(np.int64)
    short = size - int(take.sum())
    if short:
        order = np.argsort(-(exact - take), kind="stable")
        take[order[:short]] += 1
    rng = np.random.default_rng(seed)
    order = np.argsort(strata, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)])
    picked = [order[starts[s]:starts[s + 1]][rng.choice(counts[s], size=take[s], replace=False)]
              for s in range(len(counts)) if take[s]]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def subsample(rows: np.ndarray | None, n: int, size: int, seed: int) -> np.ndarray | None:
    """At most ``size`` of ``rows`` (None: of ``0..n-1``), seeded; None if all of them fit.
    A UMAP shown beside a clustering fits on a subset of the clusterer's sample this way."""
    pool = np.arange(n) if rows is None else rows
    if len(pool) <= size:
        return rows
    pick = np.random.default_rng(seed + 1).choice(len(pool), size=size, replace=False)
    return np.sort(pool[pick])
