"""CLI commands of the analysis engine: ``reduce``, ``cluster``, ``apply`` (see cli.py).

Thin wrappers: parse options, call :mod:`probing.analysis`, print a summary. The heavy
imports (scikit-learn, umap-learn, cuML) happen only when a command runs. Unlike the Python
API (which replaces runs, for notebooks that re-run cells), the commands refuse to replace
an existing run unless ``--overwrite`` is given, like ``extract`` and ``convert``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from probing.analysis.errors import AnalysisError
from probing.store import Run

SINGLE_LAYER = ("kmeans", "hkmeans", "spectral", "hspectral")
HIERARCHICAL = ("hkmeans", "hspectral")
DEFAULT_K = {"kmeans": 10, "spectral": 10, "hkmeans": 3, "hspectral": 3, "multilayer": 12}


class AnalysisUsageError(AnalysisError):
    """Command-line options that contradict each other or the chosen --method."""


class _Format(logging.Formatter):
    """``[12:00:01] message``; warnings say so, so they stand out among progress lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging API)
        text = super().formatMessage(record)
        if record.levelno >= logging.WARNING:
            return text.replace("] ", "] warning: ", 1)
        return text


def setup_analysis_logging() -> None:
    """Progress lines ("fit features ... done (3.1s)") go to stderr at INFO."""
    lg = logging.getLogger("dvprobe.analysis")
    if not lg.handlers:
        h = logging.StreamHandler()
        h.setFormatter(_Format("[%(asctime)s] %(message)s", "%H:%M:%S"))
        lg.addHandler(h)
        lg.setLevel(logging.INFO)
        lg.propagate = False


def _numeric_order(sizes: dict[str, int]) -> str:
    """``{0: 86, 1: 421, 2: 102, ..., 10: 5}`` (and ``0, 0.0, 0.1, 1``): JSON keeps the
    keys as strings, which would print 10 before 2."""
    from probing.enrich import sorted_levels

    return "{" + ", ".join(f"{c}: {sizes[c]}" for c in sorted_levels(sizes)) + "}"


def _summary(run: Run) -> str:
    m = run.meta
    lines = [f"run {run.name!r} ({m['kind']}, backend {m['backend']}, {m['n']} rows, "
             f"{m['n_fit']} fitted, {m['seconds']}s) -> {run.path}"]
    f = m["features"]
    lines.append(f"  features: layers={f['layers']} normalize={f['normalize']} "
                 f"pca={f['pca']} pca2={f['pca2']} -> {f['out_dim']} dims")
    c = m.get("cluster")
    if c:
        sizes = _numeric_order(c.get("level_sizes") or c.get("sizes"))
        lines.append(f"  {c['method']} k={c['k']}" + (f" split={c['split']}" if "split" in c
                                                       else "") + f" sizes={sizes}")
    if m.get("umap"):
        lines.append(f"  umap: {m['umap']['impl']} on {m['umap']['n_fit']} rows")
    return "\n".join(lines)


def _cluster_layers(method: str, layer: str | None, layers: str | None) -> list[str]:
    """The layer(s) ``method`` clusters; refuses the option the method would ignore."""
    if method == "multilayer":
        if layer is not None:
            raise AnalysisUsageError("--layer is for single-layer methods; --method "
                                     "multilayer takes --layers a,b,c")
        if not layers:
            raise AnalysisUsageError("--method multilayer needs --layers a,b,c")
        return [s.strip() for s in layers.split(",") if s.strip()]
    if layers is not None:
        raise AnalysisUsageError(f"--layers is for --method multilayer; --method {method} "
                                 "clusters one layer: use --layer")
    return [layer or "mixed5"]


def _check_cluster_options(method: str, split: str) -> None:
    if method not in DEFAULT_K:
        raise AnalysisUsageError(f"--method must be kmeans, hkmeans, spectral, hspectral or "
                                 f"multilayer, not {method!r}")
    if split.strip().lower() != "auto" and method not in HIERARCHICAL:
        raise AnalysisUsageError(f"--split is for --method hkmeans or hspectral, not {method}")


def register(app: typer.Typer) -> None:
    """Attach ``reduce``, ``cluster`` and ``apply`` to the ``dvprobe`` app."""

    @app.command("reduce")
    def reduce_cmd(
        store: Path = typer.Argument(..., help="STORE directory"),
        layer: str = typer.Option("mixed5", help="layer to reduce"),
        method: str = typer.Option("pca", help="pca | umap"),
        n_components: int = typer.Option(None, "--n-components",
                                         help="default 50 for pca, 2 for umap"),
        normalize: str = typer.Option("none", help="none | l2 | standardize"),
        pca: int = typer.Option(50, help="umap only: PCA components fed to UMAP (0 = raw)"),
        run: str = typer.Option(None, help="run name (default: <method>-<layer>)"),
        backend: str = typer.Option("auto", help="auto | cuml | sklearn"),
        seed: int = typer.Option(0),
        fit_sample: int = typer.Option(None, "--fit-sample",
                                       help="fit on N random rows, then apply to all"),
        overwrite: bool = typer.Option(False, "--overwrite",
                                       help="replace an existing run of the same name"),
    ) -> None:
        """PCA or UMAP of one layer; saved as a run in the STORE."""
        setup_analysis_logging()
        from probing import analysis as pa

        r = pa.reduce(store, layer, method=method, n_components=n_components,
                      normalize=normalize, pca=pca or None, backend=backend, seed=seed,
                      fit_sample=fit_sample, run=run, overwrite=overwrite)
        typer.echo(_summary(r))

    @app.command("cluster")
    def cluster_cmd(
        store: Path = typer.Argument(..., help="STORE directory"),
        layer: str = typer.Option(None, help="layer for kmeans/hkmeans/spectral/hspectral "
                                             "(default mixed5)"),
        method: str = typer.Option("kmeans",
                                   help="kmeans | hkmeans | spectral | hspectral | multilayer"),
        k: int = typer.Option(None, help="clusters (first level for hkmeans/hspectral); "
                                         "default 10, 3 hierarchical, 12 multilayer"),
        split: str = typer.Option("auto", help="hierarchical: 'auto' or per-cluster counts "
                                               "like 3,2,4"),
        layers: str = typer.Option(None, help="multilayer only: comma-separated layers"),
        pca: int = typer.Option(None, help="PCA components before clustering (0 = none); "
                                           "default 50, multilayer 200 (after concat)"),
        layer_pca: int = typer.Option(200, "--layer-pca", help="multilayer: PCA per layer"),
        normalize: str = typer.Option(None, help="none | l2 | standardize (default none; "
                                                 "multilayer l2)"),
        umap: bool = typer.Option(None, "--umap/--no-umap",
                                  help="also fit a 2-D UMAP (default: multilayer only)"),
        n_init: int = typer.Option(10, "--n-init", help="k-means restarts"),
        landmarks: int = typer.Option(1000, help="spectral: k-means landmarks"),
        run: str = typer.Option(None, help="run name (default <method><k>-<layer>, e.g. "
                                           "kmeans10-mixed5, multilayer12-3layers)"),
        backend: str = typer.Option("auto", help="auto | cuml | sklearn"),
        seed: int = typer.Option(0),
        fit_sample: int = typer.Option(None, "--fit-sample",
                                       help="fit on N random rows, then apply to all"),
        overwrite: bool = typer.Option(False, "--overwrite",
                                       help="replace an existing run of the same name"),
    ) -> None:
        """Cluster a layer (or several) and save labels, models and coordinates as a run."""
        setup_analysis_logging()
        from probing import analysis as pa

        _check_cluster_options(method, split)
        names = _cluster_layers(method, layer, layers)
        k = DEFAULT_K[method] if k is None else k
        common = dict(backend=backend, seed=seed, fit_sample=fit_sample, run=run,
                      overwrite=overwrite)
        norm = normalize or ("l2" if method == "multilayer" else "none")
        p = None if pca == 0 else (pca if pca is not None else
                                   (200 if method == "multilayer" else 50))
        if method == "multilayer":
            if p is None:
                raise AnalysisUsageError("--method multilayer needs --pca > 0")
            r = pa.multilayer(store, names, per_layer_pca=layer_pca, pca=p, k=k,
                              normalize=norm, n_init=n_init,
                              umap=True if umap is None else umap, **common)
        elif method == "kmeans":
            r = pa.kmeans(store, names[0], k=k, normalize=norm, pca=p, n_init=n_init,
                          umap=bool(umap), **common)
        elif method == "spectral":
            r = pa.spectral(store, names[0], k=k, normalize=norm, pca=p,
                            n_landmarks=landmarks, umap=bool(umap), **common)
        elif method == "hkmeans":
            r = pa.hierarchical_kmeans(store, names[0], k=k, split=split, normalize=norm,
                                       pca=p, n_init=n_init, umap=bool(umap), **common)
        else:
            r = pa.hierarchical_spectral(store, names[0], k=k, split=split, normalize=norm,
                                         pca=p, n_landmarks=landmarks, umap=bool(umap),
                                         **common)
        typer.echo(_summary(r))

    @app.command("apply")
    def apply_cmd(
        store: Path = typer.Argument(..., help="STORE holding the fitted run"),
        run: str = typer.Option(..., help="fitted run to re-apply"),
        to: Path = typer.Option(..., "--to", help="STORE whose examples are projected "
                                "(extracted with the same model and --pool)"),
        name: str = typer.Option(None, help="run name in the target (default <run>-applied)"),
        label_col: str = typer.Option(None, "--label-col",
                                      help="target obs column to cross-tabulate, e.g. mosaic"),
        backend: str = typer.Option("auto", help="auto | cuml | sklearn"),
        overwrite: bool = typer.Option(False, "--overwrite",
                                       help="replace an existing run of the same name in the "
                                            "target (never the applied run itself)"),
    ) -> None:
        """Push another STORE's examples through a run's fitted models; print where they land."""
        setup_analysis_logging()
        from probing import analysis as pa

        res = pa.apply(store, run, to, name=name, backend=backend, label_col=label_col,
                       overwrite=overwrite)
        typer.echo(str(res))
