"""CLI commands ``explain``, ``ablate`` and ``tcav`` (registered by cli.py): parse, call,
summarise.

The work is in :func:`probing.explain.explain`, :func:`probing.ablate.ablate` and
:func:`probing.tcav.tcav`; torch and
Captum are imported inside the commands so ``dvprobe --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

ModelArg = Annotated[Path, typer.Argument(help="BUNDLE directory (dvprobe convert / reference).")]
ExamplesArg = Annotated[
    Optional[str],  # noqa: UP045  (typer needs Optional on py3.10)
    typer.Argument(help="examples spec (file, name@N.gz, glob); with --store: where the "
                   "STORE's shards are now (default: the paths it recorded)"),
]
LocusOpt = Annotated[
    Optional[list[str]],  # noqa: UP045
    typer.Option("--locus", help="chr20:10001234, the variant's 1-based first base "
                 "(repeatable; every alt subset there)"),
]
KeysOpt = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option("--keys", help="file of obs keys (chrom:pos:ref>alt:indices), one a line"),
]
StoreOpt = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option("--store", help="STORE whose run's cluster to sample (with --run, --cluster)"),
]
RunOpt = Annotated[Optional[str], typer.Option("--run", help="analysis run of --store")]  # noqa: UP045
ClusterOpt = Annotated[Optional[str], typer.Option("--cluster", help="cluster of --run")]  # noqa: UP045
SeedOpt = Annotated[int, typer.Option("--seed", help="seed of the cluster sample / bootstrap")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N")]
SaveInOpt = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option("--save-in", help="also save in this STORE (its examples only), for its "
                 "report (default: --store's)"),
]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="progress bar")]


def _selection(locus, keys, store, run, cluster, n, seed):
    from probing.explain import Selection

    return Selection(loci=locus or (), keys_file=keys, store=store, run=run, cluster=cluster,
                     n=n, seed=seed)


def explain_cmd(
    model: ModelArg,
    examples: ExamplesArg = None,
    locus: LocusOpt = None,
    keys: KeysOpt = None,
    store: StoreOpt = None,
    run: RunOpt = None,
    cluster: ClusterOpt = None,
    n: Annotated[int, typer.Option("--n", min=1, help="examples to take (cluster sample, "
                                   "or the first N without --locus/--keys/--store)")] = 20,
    seed: SeedOpt = 0,
    target: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--target", help="hom_ref | het | hom_alt (default: the predicted genotype)")] = None,
    baseline: Annotated[str, typer.Option(
        "--baseline", help="blank-reads (read rows empty, reference rows kept) | zeros "
        "(scaled 0 = pixel 128) | PATH.npy ([H, W, C] uint8 pixels or scaled floats)")
    ] = "blank-reads",
    steps: Annotated[Optional[int], typer.Option(  # noqa: UP045
        "--steps", min=1, help="integration steps (default: probing.explain.DEFAULT_STEPS; "
        "each example's convergence delta says whether they sufficed)")] = None,
    output: Annotated[str, typer.Option(
        "--output", help="probability (softmax) | logit (pre-softmax; does not saturate)")
    ] = "probability",
    out: Annotated[Path, typer.Option("--out", help="directory for npz, csv and png")
                   ] = Path("explain"),
    no_png: Annotated[bool, typer.Option("--no-png", help="skip the panels")] = False,
    sanity: Annotated[bool, typer.Option(
        "--sanity", help="model-randomisation check (Adebayo et al.): attribute with a "
        "randomised copy too and report how alike the maps are")] = False,
    save_in: SaveInOpt = None,
    name: Annotated[str, typer.Option("--name", help="saved as STORE/attributions/NAME")
                    ] = "explain",
    device: DeviceOpt = "cpu",
    batch_size: Annotated[int, typer.Option(
        "--batch-size", min=1, help="path points per forward")] = 50,
    progress: ProgressOpt = True,
) -> None:
    """Integrated-gradients attribution of chosen examples' calls, with a panel each."""
    import numpy as np

    from probing.explain import explain, sanity_line

    base = np.load(baseline, allow_pickle=False) if baseline.endswith(".npy") else baseline
    results = explain(model, examples, _selection(locus, keys, store, run, cluster, n, seed),
                      target=target, baseline=base, output=output, out=out,
                      **({} if steps is None else {"steps": steps}),
                      render=not no_png, device=device, batch_size=batch_size,
                      sanity=sanity, save_in=save_in or store, name=name, progress=progress)
    for e in results:
        flag = "" if e.converged else "  (not converged: raise --steps)"
        rho = "" if e.randomised_rho is None else f"  randomised-model rho {e.randomised_rho:.2f}"
        typer.echo(f"{e.example.key}  {e.target_name}  f(x)-f(b) {e.f_x - e.f_baseline:+.4g}  "
                   f"sum {e.attributions.sum():+.4g}  delta {e.delta:+.2g}{rho}{flag}")
    if sanity:
        typer.echo(sanity_line(results))
    typer.echo(f"{len(results)} example(s) -> {out}"
               + (f" and {save_in or store}/attributions/{name}" if save_in or store else ""))


def ablate_cmd(
    model: ModelArg,
    examples: ExamplesArg = None,
    n: Annotated[int, typer.Option("--n", min=1, help="examples (the first N, or a sample "
                                   "of --cluster)")] = 1000,
    neutral: Annotated[str, typer.Option(
        "--neutral", help="zeros (scaled 0 = pixel 128) | mean (per-pixel mean of the sample)")
    ] = "zeros",
    shuffle: Annotated[bool, typer.Option(
        "--shuffle", help="also swap each channel between examples (seeded)")] = False,
    bootstrap: Annotated[int, typer.Option(
        "--bootstrap", min=0, help="bootstrap resamples for the 95% intervals")] = 1000,
    seed: SeedOpt = 0,
    locus: LocusOpt = None,
    keys: KeysOpt = None,
    store: StoreOpt = None,
    run: RunOpt = None,
    cluster: ClusterOpt = None,
    out: Annotated[Path, typer.Option("--out", help="directory for csv, md and png")
                   ] = Path("ablation"),
    save_in: SaveInOpt = None,
    name: Annotated[str, typer.Option("--name", help="saved as STORE/ablation/NAME.csv")
                    ] = "ablation",
    device: DeviceOpt = "cpu",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="pileups per forward")
                          ] = 64,
    progress: ProgressOpt = True,
) -> None:
    """Channel importance: each channel replaced by a neutral value over N examples."""
    from probing.ablate import ablate, markdown

    res = ablate(model, examples, select=_selection(locus, keys, store, run, cluster, n, seed),
                 n=n, neutral=neutral, shuffle=shuffle, bootstrap=bootstrap, seed=seed,
                 out=out, device=device, batch_size=batch_size, save_in=save_in or store,
                 name=name, progress=progress)
    typer.echo(markdown(res.table), nl=False)
    typer.echo(f"{len(res.keys)} example(s) -> {out}")


def tcav_cmd(
    store: Annotated[Path, typer.Argument(help="STORE (dvprobe extract), annotated with the "
                                          "concepts (dvprobe annotate)")],
    concepts: Annotated[str, typer.Option(
        "--concepts", help="comma-separated yes/no obs columns: mosaic,LINE (rmsk_LINE), "
        "col=value; a BED: annotate it first")],
    layers: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--layers", help="comma-separated layers (default: the STORE's)")] = None,
    model: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        "--model", help="BUNDLE (default: the one the STORE was extracted with)")] = None,
    examples: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--examples", help="where the STORE's examples are now (default: the recorded paths)")
    ] = None,
    target: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--target", help="hom_ref | het | hom_alt: examples called that, its logit "
        "(default: each example's predicted genotype)")] = None,
    output: Annotated[str, typer.Option(
        "--output", help="logit (the paper's) | probability")] = "logit",
    n_examples: Annotated[int, typer.Option(
        "--n-examples", min=2, help="examples whose directional derivatives are counted")] = 200,
    n_concept: Annotated[int, typer.Option(
        "--n-concept", min=10, help="examples per concept / random set (at most)")] = 100,
    n_random: Annotated[int, typer.Option(
        "--n-random", min=10, help="random sets: concept CAVs and random CAVs each")] = 10,
    folds: Annotated[int, typer.Option("--folds", min=2, help="folds of the CAV AUROC")] = 5,
    block_bp: Annotated[int, typer.Option(
        "--block-bp", min=0, help="genomic block of the CAV AUROC's folds (0: by position)")
    ] = 1_000_000,
    alpha: Annotated[float, typer.Option("--alpha", help="after Bonferroni")] = 0.05,
    seed: SeedOpt = 0,
    name: Annotated[str, typer.Option("--name", help="saved as STORE/tcav/NAME.json")] = "tcav",
    no_save: Annotated[bool, typer.Option("--no-save", help="print only")] = False,
    device: DeviceOpt = "cpu",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="examples per "
                                            "backward pass")] = 16,
    progress: ProgressOpt = True,
) -> None:
    """Concept sensitivity (TCAV): does moving a layer towards a concept raise the call?"""
    from probing.tcav import TcavConfig, check_name, save_tcav, tcav

    if not no_save:
        check_name(name)
    cfg = TcavConfig(concepts=[c.strip() for c in concepts.split(",") if c.strip()],
                     layers=[s.strip() for s in layers.split(",")] if layers else None,
                     model=model, examples=examples, target=target, output=output,
                     n_examples=n_examples, n_concept=n_concept, n_random=n_random,
                     folds=folds, block_bp=block_bp, alpha=alpha, seed=seed, device=device,
                     batch_size=batch_size)
    res = tcav(store, cfg, progress=progress)
    for w in res.warnings:
        typer.secho(f"warning: {w}", err=True, fg=typer.colors.YELLOW)
    p = res.params
    typer.echo(f"TCAV of the {p['output']} of the {p['target']} genotype over {p['n_examples']} "
               f"examples, {p['n_random']} concept and random CAVs each "
               f"(two-sided Welch t-test, Bonferroni over {len(res.table)} tests)")
    for line in res.lines() + [f"note: {n}" for n in res.notes]:
        typer.echo(line)
    if not no_save:
        typer.echo(f"saved {save_tcav(store, res, name)}")


def register(app: typer.Typer) -> None:
    """Attach ``explain``, ``ablate`` and ``tcav`` to the app."""
    app.command("explain")(explain_cmd)
    app.command("ablate")(ablate_cmd)
    app.command("tcav")(tcav_cmd)
