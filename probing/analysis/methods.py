"""The analysis methods and their options: the one place every default is declared.

Each method (``pca``, ``umap``, ``kmeans``, ``hkmeans``, ``spectral``, ``hspectral``,
``multilayer``) is an options dataclass registered in :data:`METHODS`. :func:`options_for`
turns keyword arguments into that dataclass, refusing an unknown method or option with the
valid ones listed; the dataclass's :meth:`~MethodOptions.plan` says what to fit (layers,
normalisation, PCA sizes, clusterer, UMAP), which :mod:`probing.analysis.fit` then runs.
The CLI and the Python wrappers (``pa.kmeans`` ...) only choose a method and pass options:
neither repeats a default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

from probing.analysis.errors import AnalysisError
from probing.analysis.hierarchical import parse_split

DEFAULT_CLUSTER_METHOD = "kmeans"
DEFAULT_REDUCE_METHOD = "pca"
#: command-line flags whose name is not the option's (``--`` + name with ``-`` otherwise)
_FLAGS = {"n_landmarks": "--landmarks", "per_layer_pca": "--layer-pca"}


def flag(option: str) -> str:
    """The command-line flag of an option (error messages name it for both audiences)."""
    return _FLAGS.get(option, "--" + option.replace("_", "-"))


def at_least_one(value: int | None, option: str) -> None:
    """Refuse 0 or a negative count (``None`` means "none" or "the default" where allowed)."""
    if value is not None and value < 1:
        raise AnalysisError(f"{option} must be >= 1, got {value}")


@dataclass(frozen=True)
class RunSettings:
    """How a run is named, fitted and saved, whatever the method: ``run`` (default
    ``<method><k>-<layer>``), ``overwrite`` (``False`` refuses to replace a run of that
    name), ``backend`` (auto | cuml | sklearn | dask | dask-cuda), ``scheduler`` (a Dask
    scheduler address for ``dask`` / ``dask-cuda``; None starts a local cluster for the
    run), ``seed``, ``fit_sample``: the rows the models are fitted on before every row is
    labelled with them; ``None``/``"auto"``: all rows up to the method's default sample
    size, a seeded chromosome-stratified sample of that size above it
    (:mod:`probing.analysis.sample`); ``N``: N rows; ``"all"``: every row."""

    run: str | None = None
    overwrite: bool = True
    backend: str = "auto"
    seed: int = 0
    fit_sample: int | str | None = None
    scheduler: str | None = None


#: options every method takes (keyword arguments of :func:`probing.analysis.cluster`)
RUN_OPTIONS = tuple(f.name for f in fields(RunSettings))


@dataclass(frozen=True)
class UmapSpec:
    """A UMAP fit: also the 2-D display UMAP that clustering methods add with ``umap=True``."""

    n_components: int = 2
    n_neighbors: int = 15
    min_dist: float = 0.1


@dataclass(frozen=True)
class ClusterSpec:
    """What to cluster with: ``method`` in kmeans|spectral|hkmeans|hspectral (+ its options).

    Every field is recorded in the run (``run.json`` ``cluster``), whichever method uses it.
    """

    method: str
    k: int
    n_init: int = 10
    split: list[int] | None = None
    max_split: int = 5
    min_cluster_size: int = 50
    n_landmarks: int = 1000
    n_neighbors: int = 15

    @property
    def hierarchical(self) -> bool:
        return self.method in ("hkmeans", "hspectral")


@dataclass(frozen=True)
class Plan:
    """What one run fits: ``layer(s) -> normalise -> PCA(pca) [-> concat -> PCA(pca2)]``, then
    an optional clusterer and an optional UMAP. ``pca_option`` names the flag of ``pca`` in
    error messages (``--n-components`` for a PCA run, ``--layer-pca`` for multilayer)."""

    kind: str
    layers: tuple[str, ...]
    normalize: str
    pca: int | None
    pca2: int | None = None
    cluster: ClusterSpec | None = None
    umap: UmapSpec | None = None
    pca_option: str = "--pca"
    #: the UMAP is the default's (multilayer), not asked for: dropped on a large STORE
    umap_by_default: bool = False

    @property
    def cluster_method(self) -> str:
        """The name the fit-sample sizes and the scale guard know this fit's clusterer by."""
        return "multilayer" if self.kind == "multilayer" else (
            self.cluster.method if self.cluster else self.kind)


@dataclass(frozen=True, kw_only=True)
class MethodOptions:
    """Options of one method (defaults here are the API's defaults)."""

    def plan(self) -> Plan:
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class _OneLayer(MethodOptions):
    layer: str = "mixed5"
    normalize: str = "none"


@dataclass(frozen=True, kw_only=True)
class PCAOptions(_OneLayer):
    """PCA of one layer; the run's ``pca`` array is ``[n, n_components]``."""

    n_components: int = 50

    def plan(self) -> Plan:
        at_least_one(self.n_components, "--n-components")
        return Plan("pca", (self.layer,), self.normalize, self.n_components,
                    pca_option="--n-components")


@dataclass(frozen=True, kw_only=True)
class UMAPOptions(_OneLayer):
    """UMAP of one layer, on its PCA(``pca``) (``None``: on the raw layer); re-appliable."""

    n_components: int = UmapSpec.n_components
    pca: int | None = 50
    n_neighbors: int = UmapSpec.n_neighbors
    min_dist: float = UmapSpec.min_dist

    def plan(self) -> Plan:
        at_least_one(self.n_components, "--n-components")
        return Plan("umap", (self.layer,), self.normalize, self.pca,
                    umap=UmapSpec(self.n_components, self.n_neighbors, self.min_dist))


@dataclass(frozen=True, kw_only=True)
class _Clustering(_OneLayer):
    """Clusters fitted in the normalised/PCA space (never in UMAP space); ``umap`` adds a
    2-D UMAP for display."""

    pca: int | None = 50
    umap: bool = False

    def _plan(self, spec: ClusterSpec) -> Plan:
        return Plan(spec.method, (self.layer,), self.normalize, self.pca, cluster=spec,
                    umap=UmapSpec() if self.umap else None)


@dataclass(frozen=True, kw_only=True)
class KMeansOptions(_Clustering):
    """k-means (the blog's k = 10 on mixed5); ``n_init`` restarts."""

    k: int = 10
    n_init: int = ClusterSpec.n_init

    def plan(self) -> Plan:
        return self._plan(ClusterSpec("kmeans", self.k, n_init=self.n_init))


@dataclass(frozen=True, kw_only=True)
class SpectralOptions(_Clustering):
    """Landmark spectral clustering (see :mod:`probing.analysis.cluster`)."""

    k: int = 10
    n_landmarks: int = ClusterSpec.n_landmarks
    n_neighbors: int = ClusterSpec.n_neighbors

    def plan(self) -> Plan:
        return self._plan(ClusterSpec("spectral", self.k, n_landmarks=self.n_landmarks,
                                      n_neighbors=self.n_neighbors))


@dataclass(frozen=True, kw_only=True)
class _Hierarchical(_Clustering):
    """Level 1 with ``k`` clusters, then each split again: ``split="3,2,4"`` (or a list)
    gives each level-1 cluster's sub-cluster count; ``"auto"`` chooses it per cluster by
    :func:`probing.analysis.cluster.choose_k` (silhouette over k = 2..min(max_split,
    size // min_cluster_size) on a <= 2000-row subsample; clusters smaller than
    2 * min_cluster_size stay whole)."""

    k: int = 3
    split: str | list[int] | None = "auto"
    max_split: int = ClusterSpec.max_split
    min_cluster_size: int = ClusterSpec.min_cluster_size


@dataclass(frozen=True, kw_only=True)
class HierarchicalKMeansOptions(_Hierarchical):
    """The blog's hierarchical k-means: k-means(k), then each cluster split again."""

    n_init: int = ClusterSpec.n_init

    def plan(self) -> Plan:
        return self._plan(ClusterSpec("hkmeans", self.k, n_init=self.n_init,
                                      split=parse_split(self.split), max_split=self.max_split,
                                      min_cluster_size=self.min_cluster_size))


@dataclass(frozen=True, kw_only=True)
class HierarchicalSpectralOptions(_Hierarchical):
    """Hierarchical clustering with landmark spectral clustering at every node."""

    n_landmarks: int = ClusterSpec.n_landmarks
    n_neighbors: int = ClusterSpec.n_neighbors

    def plan(self) -> Plan:
        return self._plan(ClusterSpec("hspectral", self.k, split=parse_split(self.split),
                                      max_split=self.max_split,
                                      min_cluster_size=self.min_cluster_size,
                                      n_landmarks=self.n_landmarks,
                                      n_neighbors=self.n_neighbors))


@dataclass(frozen=True, kw_only=True)
class MultiLayerOptions(MethodOptions):
    """The blog's multi-layer pipeline: per-layer normalise + PCA(``per_layer_pca``), concat,
    PCA(``pca``), k-means(``k``) (+ UMAP for display: ``umap=None``, the default, adds
    one up to :data:`probing.analysis.sample.DISPLAY_UMAP_ROWS` rows on the CPU, where the
    UMAP transform of every row is still short; ``True`` always, ``False`` never).

    ``normalize="l2"`` so each layer enters the concatenation with the same row norm
    (otherwise wide or high-activation layers dominate the second PCA). PCA sizes are
    clipped to what the data allows, with a logged warning.
    """

    layers: tuple[str, ...] | list[str] = ()
    per_layer_pca: int = 200
    pca: int = 200
    k: int = 12
    normalize: str = "l2"
    n_init: int = ClusterSpec.n_init
    umap: bool | None = None

    def plan(self) -> Plan:
        if not self.layers or isinstance(self.layers, str):
            raise AnalysisError("multilayer needs at least one layer (--layers a,b,c; "
                                "a list of names from Python)")
        if self.pca is None:
            raise AnalysisError("--method multilayer needs --pca > 0: the concatenated "
                                "layers are clustered in their PCA space")
        return Plan("multilayer", tuple(self.layers), self.normalize, self.per_layer_pca,
                    pca2=self.pca, cluster=ClusterSpec("kmeans", self.k, n_init=self.n_init),
                    umap=UmapSpec() if self.umap is not False else None,
                    pca_option="--layer-pca", umap_by_default=self.umap is None)


@dataclass(frozen=True)
class Method:
    """A registered method: its name, options dataclass and whether its runs hold clusters
    (``dvprobe cluster``) or only coordinates (``dvprobe reduce``)."""

    name: str
    options: type[MethodOptions]
    clusters: bool

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self.options))

    def default(self, option: str):
        """The API default of ``option`` (the CLI shows it in ``--help``)."""
        return {f.name: f.default for f in fields(self.options)}[option]


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("pca", PCAOptions, clusters=False),
    Method("umap", UMAPOptions, clusters=False),
    Method("kmeans", KMeansOptions, clusters=True),
    Method("hkmeans", HierarchicalKMeansOptions, clusters=True),
    Method("spectral", SpectralOptions, clusters=True),
    Method("hspectral", HierarchicalSpectralOptions, clusters=True),
    Method("multilayer", MultiLayerOptions, clusters=True),
)}


def _either(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def method_names(clusters: bool | None = None) -> list[str]:
    """Registered methods, all or only those whose runs hold (``True``) or lack clusters."""
    return [m.name for m in METHODS.values() if clusters is None or m.clusters == clusters]


def get_method(name: str, clusters: bool | None = None, option: str = "method") -> Method:
    """The registered method ``name``; an unknown one is refused with the valid names
    (restricted to clustering / non-clustering methods when ``clusters`` is given)."""
    valid = method_names(clusters)
    if name not in valid:
        raise AnalysisError(f"{option} must be {_either(valid)}, not {name!r}")
    return METHODS[name]


def _unknown_option(method: Method, option: str) -> AnalysisError:
    takers = [m.name for m in METHODS.values() if option in m.option_names]
    own = f"{method.name} options: {', '.join(method.option_names)}; every method: " \
          f"{', '.join(RUN_OPTIONS)}"
    if takers:
        return AnalysisError(f"{flag(option)} is for --method {_either(takers)}, not "
                             f"{method.name} ({own})")
    return AnalysisError(f"method {method.name!r} has no option {option!r} ({own})")


def options_for(method: str, given: Mapping[str, object],
                clusters: bool | None = None) -> MethodOptions:
    """``given`` keyword options as ``method``'s dataclass (missing ones take its defaults)."""
    m = get_method(method, clusters)
    for name in given:
        if name not in m.option_names:
            raise _unknown_option(m, name)
    return m.options(**given)
