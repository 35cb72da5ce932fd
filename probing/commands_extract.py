"""``dvprobe extract`` and ``dvprobe info``: the CLI face of :mod:`probing.extract` and
:mod:`probing.info`.

Thin by design: options are parsed into an :class:`~probing.extract.ExtractConfig`;
everything else (checks, resume, progress, the final summary line) happens in the API so
that scripts get the same behaviour.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dvtorch.errors import DvprobeError

STORE_DTYPE_HELP = (
    "float32 | float16 | bfloat16: how pooled rows are stored on disk (rounded to nearest "
    "from float32; analyses read them back as float32). float16 and bfloat16 halve the "
    "disk; the loss against float32 (max relative error, k-means ARI) is measured in "
    "docs/performance.md. float16 refuses values beyond 65504; bfloat16 has float32's "
    "range. Flattened maps are float16 always.")


def _split_layers(value: str) -> list[str]:
    layers = [v.strip() for v in value.split(",") if v.strip()]
    if not layers:
        raise DvprobeError("--layers needs at least one layer name, e.g. mixed5,mixed10")
    return layers


def extract_command(
    bundle: Annotated[Path, typer.Argument(help="BUNDLE directory (dvprobe convert / reference) or release name, e.g. deepvariant-1.10.0-wgs (converted in the cache by `dvprobe weights fetch NAME --convert`).")],
    examples: Annotated[str, typer.Argument(
        help="DeepVariant examples: name@N.gz shard spec, glob, comma list or one file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="STORE directory to create or resume.")],
    layers: Annotated[str, typer.Option(
        "--layers", help="Comma-separated layer names (dvprobe layers lists them).")
    ] = "mixed5,mixed10",
    pool: Annotated[str, typer.Option(
        "--pool", help="max | mean (over H,W -> C values) | flatten (H*W*C, float16).")
    ] = "max",
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda[:N]")] = "auto",
    batch_size: Annotated[int, typer.Option(
        "--batch-size", min=1, help="Examples per batch (one forward each).")] = 64,
    workers: Annotated[Optional[int], typer.Option(  # noqa: UP045 (typer reads the annotation)
        "--workers", min=0,
        help="Data-loading processes (0 = in the main process). Default: on CPU 1 if a core "
             "is free beyond torch's threads, else 0; on CUDA min(4, cores - 1).")] = None,
    dtype: Annotated[str, typer.Option(
        "--dtype", help="fp32 | bf16 | fp16 (fp16: cuda only).")] = "fp32",
    store_dtype: Annotated[str, typer.Option("--store-dtype", help=STORE_DTYPE_HELP)] = "float32",
    limit: Annotated[Optional[int], typer.Option(  # noqa: UP045
        "--limit", min=1,
        help="Only the first N records of the input (with --sample: the chosen ones among "
             "them).")] = None,
    sample: Annotated[Optional[float], typer.Option(  # noqa: UP045
        "--sample",
        help="Extract a pseudo-random FRACTION (0-1] of the records, e.g. 0.01 to survey a "
             "whole-genome run on a laptop: chosen by a seeded hash of each record, so the "
             "same ones on every rerun and resume. Every record is still read (gzip), only "
             "the chosen ones are decoded and run through the model.")] = None,
    sample_seed: Annotated[int, typer.Option(
        "--sample-seed", min=0, help="Seed of --sample: another seed, another subset.")] = 0,
    regions: Annotated[Optional[list[str]], typer.Option(  # noqa: UP045
        "--regions", metavar="REGION",
        help="Only examples whose variant overlaps these regions: chr20, "
             "chr20:1,000,001-2,000,000 (1-based, inclusive) or a BED file; repeat the "
             "option for several. chr20 and 20 match either way. Every record is still read "
             "(and parsed), only the chosen ones run through the model.")] = None,
    skip_corrupt: Annotated[bool, typer.Option(
        "--skip-corrupt",
        help="Skip records that fail CRC / parsing (counted in store.json) instead of "
             "failing; where a file's framing is lost, skip the rest of that file.")] = False,
    compile_: Annotated[bool, typer.Option(
        "--compile", help="CUDA only: run the model through torch.compile (slower start, "
                          "faster batches on long runs).")] = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace an existing STORE at --out.")] = False,
    commit_every: Annotated[float, typer.Option(
        "--commit-every", min=0,
        help="Seconds between commits (0: after every batch). Ctrl-C always commits; a hard "
             "kill redoes at most the batches since the last commit, never duplicates "
             "rows.")] = 15.0,
    task: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--task", metavar="I|auto",
        help="Extract only task I (0-based) of --num-tasks into its own part of the STORE, "
             "like DeepVariant's make_examples --task: run every task, anywhere the STORE "
             "is mounted, and the parts read back as one STORE in input order. auto: "
             "torchrun's RANK / WORLD_SIZE, or a SLURM array's SLURM_ARRAY_TASK_ID / "
             "SLURM_ARRAY_TASK_COUNT.")] = None,
    num_tasks: Annotated[Optional[int], typer.Option(  # noqa: UP045
        "--num-tasks", min=1,
        help="How many tasks share the input: blocks of whole shards, or record ranges "
             "when there are fewer shards than tasks.")] = None,
    procs: Annotated[Optional[int], typer.Option(  # noqa: UP045
        "--procs", min=1,
        help="Run the extraction as N tasks in N local processes on the CPU (cores split "
             "between them), with one progress bar.")] = None,
    gpus: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--gpus", metavar="all|0,1,3",
        help="Run one task per GPU, each process seeing only its GPU "
             "(CUDA_VISIBLE_DEVICES), with one progress bar.")] = None,
    no_progress: Annotated[bool, typer.Option(
        "--no-progress", help="No progress bar / messages.")] = False,
) -> None:
    """Extract layer activations of DeepVariant examples into a STORE (resumable).

    Re-run the same command after a crash or Ctrl-C to continue where it stopped.
    """
    from probing.extract import ExtractConfig, ExtractionInterrupted, extract

    config = ExtractConfig(
        bundle=bundle, examples=examples, out=out, layers=_split_layers(layers), pool=pool,
        device=device, batch_size=batch_size, workers=workers, dtype=dtype,
        store_dtype=store_dtype, limit=limit,
        skip_corrupt=skip_corrupt, sample=sample, sample_seed=sample_seed,
        regions=regions or None, overwrite=overwrite, compile=compile_,
        commit_interval_s=commit_every, task=task, num_tasks=num_tasks)
    if procs is not None or gpus is not None:
        _launch(config, procs, gpus, progress=not no_progress)
        return
    try:
        store = extract(config, progress=not no_progress)
    except ExtractionInterrupted as exc:
        if no_progress:
            # Progress messages are off, but how an interrupted run was left (what is
            # committed, how to resume) is its outcome, like an error: say it anyway.
            typer.echo(str(exc), err=True)
        raise
    _say_extracted(store, out if config.task is not None else None)


def _say_extracted(store, parted: Path | None) -> None:
    """The summary line; after a task, how far its STORE (``parted``) is."""
    line = (f"{store.path}: {store.n} examples, layers {', '.join(store.layers)}"
            + (f", {store.meta['skipped']['count']} corrupt records skipped"
               if (store.meta.get("skipped") or {}).get("count") else ""))
    if parted is not None:
        from probing.store import Store

        parts = Store(parted, partial_parts=True).parts
        done = sum(p.complete for p in parts)
        line += (f"; all {len(parts)} parts of {parted} are complete" if done == len(parts)
                 else f"; {done} of {len(parts)} parts of {parted} are complete")
    typer.echo(line)


def _launch(config, procs: int | None, gpus: str | None, *, progress: bool) -> None:
    """``--procs`` / ``--gpus``: the tasks as local processes (:mod:`probing.launch`)."""
    from probing.extract import ExtractionInterrupted
    from probing.launch import LaunchConfig, launch

    try:
        store = launch(LaunchConfig(config, procs=procs, gpus=gpus), progress=progress)
    except ExtractionInterrupted as exc:
        # the children's own messages are captured: what is committed and how to resume
        # is the launcher's to say, with or without a progress bar
        typer.echo(str(exc), err=True)
        raise
    typer.echo(f"{store.path}: {store.n} examples in {len(store.parts)} parts, layers "
               f"{', '.join(store.layers)}")


def info_command(
    store: Annotated[Path, typer.Argument(help="STORE directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the same as JSON.")] = False,
) -> None:
    """What a STORE holds: model, examples, extraction, layers, obs columns, runs, probes
    (metadata only: never reads a row, so the same few seconds on any size)."""
    import json

    from probing.info import format_info, store_info

    info = store_info(store)
    typer.echo(json.dumps(info, indent=2) if as_json else format_info(info))


def register(app: typer.Typer) -> None:
    """Attach ``extract`` and ``info`` to the ``dvprobe`` app."""
    app.command("extract")(extract_command)
    app.command("info")(info_command)
