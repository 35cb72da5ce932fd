"""``dvprobe extract``: the CLI face of :func:`probing.extract.extract`.

Thin by design: options are parsed here, everything else (checks, resume, progress, the
final summary line) happens in the API so that scripts get the same behaviour.
"""

from __future__ import annotations

from pathlib import Path

import typer

from dvtorch.errors import DvprobeError


def _split_layers(value: str) -> list[str]:
    layers = [v.strip() for v in value.split(",") if v.strip()]
    if not layers:
        raise DvprobeError("--layers needs at least one layer name, e.g. mixed5,mixed10")
    return layers


def extract_command(
    bundle: Path = typer.Argument(..., help="BUNDLE directory (dvprobe convert / reference)."),
    examples: str = typer.Argument(
        ..., help="DeepVariant examples: name@N.gz shard spec, glob, comma list or one file."),
    out: Path = typer.Option(..., "--out", "-o", help="STORE directory to create or resume."),
    layers: str = typer.Option("mixed5,mixed10", "--layers",
                               help="Comma-separated layer names (dvprobe layers lists them)."),
    pool: str = typer.Option("max", "--pool",
                             help="max | mean (over H,W -> C values) | flatten (H*W*C, float16)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:N]"),
    batch_size: int = typer.Option(64, "--batch-size", min=1,
                                   help="Examples per batch (one forward each)."),
    workers: int | None = typer.Option(
        None, "--workers", min=0,
        help="Data-loading processes (0 = in the main process). Default: on CPU 1 if a core is "
             "free beyond torch's threads, else 0; on CUDA min(4, cores - 1)."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 | bf16 | fp16 (fp16: cuda only)."),
    limit: int | None = typer.Option(
        None, "--limit", min=1,
        help="Only the first N records of the input (with --sample: the chosen ones among "
             "them)."),
    sample: float | None = typer.Option(
        None, "--sample",
        help="Extract a pseudo-random FRACTION (0-1] of the records, e.g. 0.01 to survey a "
             "whole-genome run on a laptop: chosen by a seeded hash of each record, so the "
             "same ones on every rerun and resume. Every record is still read (gzip), only "
             "the chosen ones are decoded and run through the model."),
    sample_seed: int = typer.Option(0, "--sample-seed", min=0,
                                    help="Seed of --sample: another seed, another subset."),
    regions: list[str] | None = typer.Option(
        None, "--regions", metavar="REGION",
        help="Only examples whose variant overlaps these regions: chr20, "
             "chr20:1,000,001-2,000,000 (1-based, inclusive) or a BED file; repeat the option "
             "for several. chr20 and 20 match either way. Every record is still read (and "
             "parsed), only the chosen ones run through the model."),
    skip_corrupt: bool = typer.Option(
        False, "--skip-corrupt",
        help="Skip records that fail CRC / parsing (counted in store.json) instead of failing; "
             "where a file's framing is lost, skip the rest of that file."),
    engine: str = typer.Option(
        "auto", "--engine",
        help="auto | eager | graph. graph (CPU, fp32/bf16): the forward run as a oneDNN Graph "
             "program, measured on an AMX CPU 6-7% faster in fp32 (1.02-1.04x onnxruntime) and "
             "1.25-1.3x in bf16 once started (2-3 s); checked against eager on its first "
             "batches of each size and falls back to eager (with a warning) if they differ. "
             "auto: graph for a CPU run of an estimated 16000 examples or more (after "
             "--limit and --sample; ~100 MB of gzip shards), eager otherwise."),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Replace an existing STORE at --out."),
    commit_every: float = typer.Option(
        15.0, "--commit-every", min=0,
        help="Seconds between commits (0: after every batch). Ctrl-C always commits; a hard "
             "kill redoes at most the batches since the last commit, never duplicates rows."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar / messages."),
) -> None:
    """Extract layer activations of DeepVariant examples into a STORE (resumable).

    Re-run the same command after a crash or Ctrl-C to continue where it stopped.
    """
    from probing.extract import ExtractionInterrupted, extract

    try:
        store = extract(bundle, examples, out, layers=_split_layers(layers), pool=pool,
                        device=device, batch_size=batch_size, workers=workers, dtype=dtype,
                        limit=limit, skip_corrupt=skip_corrupt, sample=sample,
                        sample_seed=sample_seed, regions=regions or None, overwrite=overwrite,
                        engine=engine, progress=not no_progress,
                        commit_interval_s=commit_every)
    except ExtractionInterrupted as exc:
        if no_progress:
            # Progress messages are off, but how an interrupted run was left (what is
            # committed, how to resume) is its outcome, like an error: say it anyway.
            typer.echo(str(exc), err=True)
        raise
    typer.echo(f"{store.path}: {store.n} examples, layers {', '.join(store.layers)}"
               + (f", {store.meta['skipped']['count']} corrupt records skipped"
                  if (store.meta.get("skipped") or {}).get("count") else ""))


def info_command(
    store: Path = typer.Argument(..., help="STORE directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the same as JSON."),
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
