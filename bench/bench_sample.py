"""What ``dvprobe extract --sample`` costs per record it does not choose.

A sampled run still reads every record (gzip inflate, both CRCs, the sample's hash) but
decodes and forwards only the chosen ones. This times, on the same pileup-like gz shards
as ``bench_extract_cpu.py``, the loader alone (no model) three ways: every record decoded
(an unsampled run's loading), a 1 % sample, and a sample that chooses nothing (pure
reading). Milliseconds per record, one process, best of ``--rounds``. Set it against the
model's forward (``bench_model_cpu.py``: ~6 ms per example in fp32 on 2 cores) to see what a
survey of a whole genome costs. Run::

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_sample.py --n 4096
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def loader_ms_per_record(spec: str, sample, rounds: int) -> tuple[float, int]:
    """Best-of-``rounds`` milliseconds per record read, and examples delivered."""
    from probing.channels import WGS_CHANNELS, WGS_SHAPE
    from probing.loader import ExampleBatches
    from probing.tfrecord import expand_spec

    files = [str(f) for f in expand_spec(spec)]
    best, delivered, n_records = float("inf"), 0, 0
    for _ in range(rounds):
        ds = ExampleBatches(files, batch_size=32, shape=WGS_SHAPE, channels=WGS_CHANNELS,
                            sample=sample)
        t0 = time.perf_counter()
        delivered = sum(b.n for b in ds)
        best = min(best, time.perf_counter() - t0)
    everything = ExampleBatches(files, batch_size=32, shape=WGS_SHAPE, channels=None)
    n_records = sum(b.n for b in everything) if sample is not None else delivered
    return 1e3 * best / n_records, delivered


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=4096, help="records in the synthetic input")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from bench.bench_extract_cpu import synth_examples
    from probing.loader import RecordSample

    work = Path(tempfile.mkdtemp(prefix="bench_sample_"))
    try:
        spec = synth_examples(work / "examples", args.n, shards=4)
        for name, sample in (("every record decoded", None),
                             ("--sample 0.01", RecordSample(0.01)),
                             ("a sample choosing none", RecordSample(1e-12))):
            ms, got = loader_ms_per_record(spec, sample, args.rounds)
            print(f"{name:24s} {ms:6.3f} ms per record read ({got} of {args.n} examples "
                  "delivered)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
