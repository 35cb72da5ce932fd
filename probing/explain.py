"""Why did the model make this call? Integrated gradients over a pileup (``dvprobe explain``).

For each chosen example, Captum's :class:`~captum.attr.IntegratedGradients` attributes the
predicted genotype's probability (or a chosen genotype's, ``target=``) to every input pixel:
``attr = (x - baseline) * mean gradient along the straight path baseline -> x``. The
attributions sum to ``f(x) - f(baseline)`` up to the integration error (Captum's
*convergence delta*, reported per example: raise ``steps`` when it is large; see
:data:`DEFAULT_STEPS` for how many steps a rough model needs).

Inputs are the **scaled** pileup, ``(pixel - 128) / 128`` in [-1, 1), which is what the
network's first convolution sees; attributions are per scaled pixel. ``output="logit"``
attributes the pre-softmax logit instead: a confident call's probability is saturated (flat
near x, a steep step somewhere on the path), its logit is not.

Baselines (what "no evidence" means is a choice; the answer is relative to it):

* ``"blank-reads"`` (**default**): the same pileup with every read row blanked the way
  make_examples writes a row with no read (raw pixel 0, scaled -1.0 in every channel) and
  the reference rows (the top :data:`~probing.channels.REF_ROWS` = 5 rows of DeepVariant's
  pileup) kept. This is an input the model can really receive (a site with no usable
  reads), so attributions answer "what did *the reads* contribute to this call, given this
  reference context?". The reference rows get exactly zero attribution by construction
  (IG only credits what differs from the baseline). It assumes DeepVariant's default layout,
  one reference band on top; for stacked (alt-aligned) layouts pass an array.
* ``"zeros"``: the zero-signal pileup in scaled units, i.e. 0.0 everywhere (raw pixel 128
  in every channel, reference rows included). Captum's default; it is off the data
  manifold (no pileup is mid-grey everywhere) and attributes to the reference rows too.
* an array: one ``[H, W, C]`` pileup used for every example: raw uint8 pixels (scaled here)
  or float values already scaled.

Selection (:class:`Selection`): by locus (``chr:pos``, 1-based like IGV and the ``locus``
feature), by a file of obs keys, by a seeded sample of a cluster of a STORE run, or else
the first ``n`` examples in file order.

Outputs (``out=``): per example ``<stem>.npz`` (attributions, image, baseline, per-channel
and per-row totals, probabilities, target, delta) and ``<stem>.png`` (the channels laid out
as :mod:`probing.show` lays them out, attribution overlaid: red raises the target, blue
lowers it, one colour scale per example); ``explain.csv`` (one row per example) and
``rows.csv`` (per-row totals). What attributions of the *untrained* reference model mean:
only how that random function responds; they are the Adebayo et al. model-randomisation
control for a trained bundle, not an explanation of DeepVariant.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from dvtorch.errors import DvprobeError
from dvtorch.files import bundle_fingerprint
from probing.channels import REF_ROWS, WGS_CHANNELS
from probing.examples import DVExample, read_example_info, read_examples
from probing.report import ATTRIBUTIONS_DIR
from probing.show import data_uri, describe, parse_locus, png_bytes, read_store_examples
from probing.store import Store, as_store

GENOTYPES = ("hom_ref", "het", "hom_alt")
BASELINES = ("blank-reads", "zeros")
OUTPUTS = ("probability", "logit")
#: Integration steps (Captum's Gauss-Legendre rule). Chosen from bench/bench_explain.py's
#: convergence ladder at DeepVariant's input on the untrained reference model: the smallest
#: count of the ladder at which every measured example's attributions summed to
#: f(x) - f(baseline) within 1 % (the figures, the CPU and the command are in
#: docs/performance.md, "Explaining calls"); Captum's usual 50 left about half of them
#: outside. How many steps completeness needs depends on how rough the model is along the
#: path, so every example's convergence delta is reported and flagged
#: (``Explanation.converged``): raise ``steps`` for the ones that are not.
DEFAULT_STEPS = 100
#: Steps at which the reference architecture's *logit* attributions summed to f(x) -
#: f(baseline) within 1 % for every seeded pileup the completeness test tries (a rough
#: output, changes of tens of logits: tests/test_explain.py).
STEPS_WITHIN_1PC = 800
#: A relative convergence delta above this is flagged (``Explanation.converged``).
DELTA_TOLERANCE = 0.01
#: Empty read rows as make_examples writes them: raw pixel 0, i.e. (0 - 128) / 128.
BLANK_SCALED = -1.0


class ExplainError(DvprobeError):
    """Examples cannot be selected or explained as asked (the message says which and why)."""


# --------------------------------------------------------------------------------------
# Selecting examples
# --------------------------------------------------------------------------------------


@dataclass
class Selection:
    """Which examples: ``loci``, or ``keys_file``, or ``store`` + ``run`` + ``cluster``
    (a sample of ``n`` rows, seeded by ``seed``), or none of them: the first ``n`` examples.
    """

    loci: Sequence[str] = ()
    keys_file: str | os.PathLike | None = None
    store: Store | str | os.PathLike | None = None
    run: str | None = None
    cluster: str | None = None
    n: int = 20
    seed: int = 0

    def check(self) -> None:
        ways = [bool(self.loci), self.keys_file is not None, self.store is not None]
        if sum(ways) > 1:
            raise ExplainError("choose examples one way: loci, a keys file, or a STORE cluster")
        if self.n < 1:
            raise ExplainError(f"n must be at least 1, got {self.n}")
        if self.store is not None and (self.run is None or self.cluster is None):
            raise ExplainError("a STORE selection needs a run and a cluster (--run, --cluster)")
        if self.store is None and (self.run is not None or self.cluster is not None):
            raise ExplainError("--run / --cluster need --store")


def select_examples(examples: str | os.PathLike | None, select: Selection) -> list[DVExample]:
    """The chosen examples, images copied (they outlive the read buffers), in a stable order."""
    select.check()
    if select.store is not None:
        return _from_cluster(examples, select)
    if examples is None:
        raise ExplainError("give EXAMPLES (an examples file, name@N.gz or a glob)")
    if select.loci:
        return _from_loci(examples, list(select.loci))
    if select.keys_file is not None:
        return _from_keys(examples, Path(select.keys_file))
    out = []
    for ex in read_examples(examples, limit=select.n):
        ex.image = np.array(ex.image)
        out.append(ex)
    return out


def _from_loci(examples: str | os.PathLike, loci: list[str]) -> list[DVExample]:
    """Every example starting at each locus (all alt subsets), in one pass over the files."""
    wanted = {}
    for locus in loci:
        chrom, start0, _end = parse_locus(locus)
        for name in (chrom, chrom[3:] if chrom.startswith("chr") else f"chr{chrom}"):
            wanted[(name, start0)] = locus
    found: dict[str, list[DVExample]] = {locus: [] for locus in loci}
    for ex in read_examples(examples):
        locus = wanted.get((ex.chrom, ex.start))
        if locus is not None:
            ex.image = np.array(ex.image)
            found[locus].append(ex)
    missing = [locus for locus, exs in found.items() if not exs]
    if missing:
        raise ExplainError(f"{examples}: no example at {', '.join(missing)} (positions are "
                           "1-based: the variant's first base, i.e. a STORE's obs 'pos' + 1)")
    return [ex for locus in dict.fromkeys(loci) for ex in found[locus]]


def read_keys(path: Path) -> list[str]:
    """Obs keys, one a line (blank lines and ``#`` comments skipped)."""
    if not path.is_file():
        raise ExplainError(f"{path}: keys file not found")
    keys = [s.strip() for s in path.read_text().splitlines()]
    keys = list(dict.fromkeys(k for k in keys if k and not k.startswith("#")))
    if not keys:
        raise ExplainError(f"{path}: no keys (one obs key a line, chrom:pos:ref>alt:indices)")
    return keys


def _from_keys(examples: str | os.PathLike, path: Path) -> list[DVExample]:
    keys = read_keys(path)
    want = set(keys)
    found: dict[str, DVExample] = {}
    for ex in read_examples(examples):
        if ex.key in want and ex.key not in found:
            ex.image = np.array(ex.image)
            found[ex.key] = ex
            if len(found) == len(want):
                break
    missing = [k for k in keys if k not in found]
    if missing:
        raise ExplainError(f"{path}: {len(missing)} key(s) not in {examples}, e.g. "
                           f"{', '.join(missing[:3])} (keys hold the 0-based Variant.start)")
    return [found[k] for k in keys]


def cluster_rows(store: Store, run: str, cluster: str, n: int, seed: int) -> np.ndarray:
    """A seeded sample of at most ``n`` STORE rows of ``cluster`` in ``run``, sorted."""
    r = store.load_run(run)
    if "cluster" not in r.obs.columns:
        raise ExplainError(f"{store.path}: run {run!r} has no clusters (a reduction only?)")
    labels = r.obs["cluster"].astype(str).to_numpy()
    rows = np.flatnonzero(labels == str(cluster))
    if len(rows) == 0:
        counts = ", ".join(f"{c} (n={k})" for c, k in
                           zip(*np.unique(labels, return_counts=True), strict=True))
        raise ExplainError(f"{store.path}: run {run!r} has no cluster {cluster!r}; its "
                           f"clusters: {counts}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(rows, size=min(n, len(rows)), replace=False))


def _from_cluster(examples: str | os.PathLike | None, select: Selection) -> list[DVExample]:
    store = as_store(select.store)
    rows = cluster_rows(store, str(select.run), str(select.cluster), select.n, select.seed)
    got = read_store_examples(store, rows.tolist(), examples)
    return [got[int(r)] for r in rows]


# --------------------------------------------------------------------------------------
# Model and baselines
# --------------------------------------------------------------------------------------


def load_model(bundle_or_model: Any, device: str = "cpu"):
    """``(model, device)``: a BUNDLE loaded on ``device``, or a given module where it lives.

    Any ``nn.Module`` that takes NHWC scaled floats and returns ``[N, 3]`` probabilities
    will do (a patched or hand-built model in tests and experiments).
    """
    import torch

    if isinstance(bundle_or_model, torch.nn.Module):
        p = next(bundle_or_model.parameters(), None)
        return bundle_or_model.eval(), (p.device if p is not None else torch.device(device))
    import dvtorch

    return dvtorch.load(bundle_or_model, device=device), torch.device(device)


class StoreBundleWarning(UserWarning):
    """The model given is not the one the STORE was extracted with."""


def store_model(store: Store, given: Any) -> tuple[Any, list[str]]:
    """``(model, warnings)``: the model to use with ``store``'s examples and activations.

    ``given`` (a BUNDLE path or a module) wins; a BUNDLE whose bundle.json is not the one
    the STORE recorded (``inputs.bundle_sha256``) is used with a
    :class:`StoreBundleWarning` (clusters, CAVs and probabilities in the STORE are another
    model's). Without ``given``, the STORE's own bundle, refused when it is missing or was
    replaced since extraction. A module cannot be checked (no bundle.json).
    """
    recorded = store.meta.get("bundle")
    sha = (store.meta.get("inputs") or {}).get("bundle_sha256")
    if given is None:
        if not recorded:
            raise ExplainError(f"{store.path}: records no bundle; give the model with --model")
        if not (Path(recorded) / "bundle.json").is_file():
            raise ExplainError(f"{store.path}: its bundle {recorded} is missing (moved or "
                               "deleted?); give it with --model BUNDLE")
        if sha and bundle_fingerprint(recorded) != sha:
            raise ExplainError(f"{store.path}: its bundle {recorded} was replaced since the "
                               "extraction (bundle.json differs); give the bundle it was "
                               "extracted with via --model BUNDLE")
        return recorded, []
    said = []
    if isinstance(given, (str, os.PathLike)) and sha and bundle_fingerprint(given) != sha:
        said.append(f"{given} is not the bundle {store.path} was extracted with ({recorded}): "
                    "the STORE's activations, clusters and probabilities are another model's")
        warnings.warn(said[-1], StoreBundleWarning, stacklevel=3)
    return given, said


def model_channels(model: Any, examples: str | os.PathLike | None, n_channels: int) -> list[int]:
    """Channel enum numbers for labels: the bundle's, else example_info.json's, else WGS."""
    meta = getattr(model, "bundle_meta", None) or {}
    if meta.get("channels"):
        return [int(c) for c in meta["channels"]]
    info = read_example_info(examples) if examples is not None else None
    if info:
        return list(info["channels"])
    return list(WGS_CHANNELS)[:n_channels]


def scaled(images: np.ndarray):
    """uint8 NHWC pixels -> float32 ``(x - 128) / 128`` (DeepVariant's scaling)."""
    import dvtorch

    return dvtorch.preprocess(np.ascontiguousarray(images))


def make_baseline(x, baseline: str | np.ndarray, ref_rows: int = REF_ROWS):
    """The baseline tensor for scaled input ``x`` ``[N, H, W, C]`` (see the module doc)."""
    import torch

    if isinstance(baseline, str):
        if baseline == "zeros":
            return torch.zeros_like(x)
        if baseline == "blank-reads":
            b = x.clone()
            b[:, ref_rows:] = BLANK_SCALED
            return b
        raise ExplainError(f"baseline {baseline!r}: use {' | '.join(BASELINES)} or an array")
    arr = np.asarray(baseline)
    if arr.shape != tuple(x.shape[1:]):
        raise ExplainError(f"baseline array has shape {list(arr.shape)}; the pileups are "
                           f"{list(x.shape[1:])} (H, W, C)")
    b = scaled(arr[None]) if arr.dtype == np.uint8 else torch.from_numpy(
        np.asarray(arr, np.float32)[None])
    if not torch.isfinite(b).all() or b.abs().max() > 1.0:
        raise ExplainError("a float baseline array must hold scaled pixels in [-1, 1] "
                           "((pixel - 128) / 128); pass uint8 for raw pixels")
    return b.to(x.device).expand_as(x).contiguous()


def logit_forward(model):
    """``f(x)`` = the model's pre-softmax ``logits`` layer (needs a layer named so)."""
    from dvtorch.layers import resolve

    try:
        layer = resolve(model, "logits")
    except Exception as e:  # noqa: BLE001 - any model without the layer
        raise ExplainError(f"output='logit' needs a model with a 'logits' layer ({e})") from e
    seen: dict[str, Any] = {}

    def forward(x):
        handle = layer.register_forward_hook(lambda _m, _i, out: seen.__setitem__("y", out))
        try:
            model(x)
        finally:
            handle.remove()
        return seen.pop("y")

    return forward


# --------------------------------------------------------------------------------------
# Attribution
# --------------------------------------------------------------------------------------


@dataclass
class ExplainConfig:
    """How to attribute: ``target`` None = the predicted genotype; ``output``
    ``"probability"`` (softmax, the default: what the call is made from) or ``"logit"``
    (pre-softmax: does not saturate for confident calls); ``batch_size`` = path points per
    forward (Captum's ``internal_batch_size``); ``save_in``: a STORE whose examples these
    are, to save them in as ``attributions/<name>`` for its report; ``sanity``: also
    attribute with a randomised copy of the model (:func:`randomisation_check`)."""

    target: str | None = None
    baseline: str | np.ndarray = "blank-reads"
    steps: int = DEFAULT_STEPS
    output: str = "probability"
    device: str = "cpu"
    batch_size: int = 50
    ref_rows: int = REF_ROWS
    out: str | os.PathLike | None = None
    render: bool = True
    save_in: Store | str | os.PathLike | None = None
    name: str = "explain"
    sanity: bool = False

    def check(self) -> None:
        if self.save_in is not None:
            check_saved_name(self.name)
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ExplainError(f"steps must be an integer >= 1, got {self.steps!r}")
        if self.target is not None and self.target not in GENOTYPES:
            raise ExplainError(f"target {self.target!r}: use {' | '.join(GENOTYPES)} "
                               "(or none for the predicted genotype)")
        if isinstance(self.baseline, str) and self.baseline not in BASELINES:
            raise ExplainError(f"baseline {self.baseline!r}: use {' | '.join(BASELINES)} "
                               "or an array")
        if self.output not in OUTPUTS:
            raise ExplainError(f"output {self.output!r}: use {' | '.join(OUTPUTS)}")
        if self.batch_size < 1:
            raise ExplainError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.ref_rows < 0:
            raise ExplainError(f"ref_rows must be >= 0, got {self.ref_rows}")


@dataclass
class Explanation:
    """One example's attributions ``[H, W, C]`` (scaled-pixel units) and their bookkeeping."""

    example: DVExample
    attributions: np.ndarray
    baseline: np.ndarray
    probs: np.ndarray
    target: int
    f_x: float
    f_baseline: float
    delta: float
    files: dict[str, Path] = field(default_factory=dict)
    #: Spearman correlation with a randomised model's attributions (``sanity=True``)
    randomised_rho: float | None = None

    @property
    def target_name(self) -> str:
        return GENOTYPES[self.target]

    @property
    def channel_totals(self) -> np.ndarray:
        return self.attributions.sum(axis=(0, 1))

    @property
    def row_totals(self) -> np.ndarray:
        return self.attributions.sum(axis=(1, 2))

    @property
    def relative_delta(self) -> float:
        """|delta| / |f(x) - f(baseline)| (inf when the output did not change)."""
        change = abs(self.f_x - self.f_baseline)
        return abs(self.delta) / change if change > 0 else (0.0 if self.delta == 0 else math.inf)

    @property
    def converged(self) -> bool:
        """Within :data:`DELTA_TOLERANCE`, or a delta below 1e-4 in absolute terms (an output
        that barely changed cannot be checked relatively)."""
        return self.relative_delta <= DELTA_TOLERANCE or abs(self.delta) < 1e-4


def attribute(model, device, ex: DVExample, config: ExplainConfig,
              forward: Callable | None = None) -> Explanation:
    """Integrated gradients of one example (Captum), refused if any attribution is not finite."""
    import torch
    from captum.attr import IntegratedGradients

    forward = forward or model
    x = scaled(ex.image[None]).to(device)
    base = make_baseline(x, config.baseline, config.ref_rows)
    with torch.no_grad():
        probs = model(x).float()
        target = int(probs.argmax(1)) if config.target is None else GENOTYPES.index(config.target)
        f = forward(torch.cat([x, base])).float()[:, target]
    attr, delta = IntegratedGradients(forward).attribute(
        x, base, target=target, n_steps=config.steps, internal_batch_size=config.batch_size,
        return_convergence_delta=True)
    if not torch.isfinite(attr).all():
        raise ExplainError(f"{ex.path}, record {ex.record} ({ex.key}): attributions are not "
                           "finite (NaN/inf); the model's output or gradient overflows there")
    return Explanation(ex, attr[0].detach().float().cpu().numpy(),
                       base[0].cpu().numpy(), probs[0].cpu().numpy(), target,
                       float(f[0]), float(f[1]), float(delta[0]))


#: a rank correlation of attributions with the randomised model's at or above this fails
#: Adebayo et al.'s model-randomisation check (the map shows the input, not the model)
RANDOMISATION_RHO = 0.5


def randomised_copy(model, seed: int = 1):
    """A copy of ``model`` with every weight re-drawn (Adebayo et al.'s full randomisation):
    the Inception gets :func:`dvtorch.bundle.random_state_dict` (BN statistics calibrated,
    so its output still depends on the input); any other module each floating tensor drawn
    from a normal with that tensor's mean and spread."""
    import copy

    import torch

    from dvtorch.inception import DeepVariantInceptionV3

    twin = copy.deepcopy(model)
    if isinstance(model, DeepVariantInceptionV3):
        from dvtorch.bundle import random_state_dict

        shape = tuple((getattr(model, "bundle_meta", None) or {}).get("input_shape") or ())
        state = random_state_dict(seed, shape) if shape else None
        if state is not None:
            p = next(model.parameters())
            twin.load_state_dict({k: v.to(p.device) for k, v in state.items()})
            return twin.eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(twin.parameters()) + list(twin.buffers()):
            if t.is_floating_point() and t.numel():
                sd = float(t.float().std()) if t.numel() > 1 else 0.0
                draw = torch.randn(t.shape, generator=gen) * (sd or 1.0) + float(t.float().mean())
                t.copy_(draw.to(t.dtype).to(t.device))
    return twin.eval()


def randomisation_check(model, device, results: list[Explanation], config: ExplainConfig,
                        forward: Callable) -> None:
    """Set each explanation's ``randomised_rho``: the Spearman correlation of its
    attributions with those of a randomised copy of the model (same example, target,
    baseline and steps) over the pixels that differ from the baseline. Attributions that
    explain the model must change when its weights do (Adebayo et al. 2018, "Sanity Checks
    for Saliency Maps").

    Why signed and only where ``x != baseline``: IG multiplies by ``x - baseline``, so
    every pixel equal to the baseline gets 0 from any model; over all pixels the rank
    correlation of ``|attributions|`` is then near 1 for any two models (0.996-0.998 for the
    Inception against its randomised copy on seeded pileups, tests/test_explain.py), the
    effect Adebayo et al. report for gradient x input and IG. Over the pixels that moved,
    signed, the same pairs correlate at about 0 and a model with nothing learned (a fixed
    region read through a bias) at 1."""
    from scipy.stats import spearmanr

    twin = randomised_copy(model)
    twin_forward = logit_forward(twin) if config.output == "logit" else twin
    fixed = [GENOTYPES[e.target] for e in results]
    for e, target in zip(results, fixed, strict=True):
        r = attribute(twin, device, e.example, replace(config, target=target), twin_forward)
        moved = (e.example.image.astype(np.float32) - 128) / 128 != e.baseline
        a, b = e.attributions[moved], r.attributions[moved]
        alike = np.ptp(a) > 0 and np.ptp(b) > 0
        e.randomised_rho = float(spearmanr(a, b)[0]) if alike else float(np.array_equal(a, b))


def sanity_line(results: list[Explanation]) -> str:
    """One line: the model-randomisation check's verdict over ``results``."""
    rhos = np.array([e.randomised_rho for e in results if e.randomised_rho is not None])
    if not len(rhos):
        return "model randomisation: not checked"
    alike = int((rhos >= RANDOMISATION_RHO).sum())
    head = (f"model randomisation (Adebayo et al. 2018): rank correlation of |attributions| "
            f"with a randomised copy of the model (signed, where x != baseline), median {np.median(rhos):.2f} "
            f"(max {rhos.max():.2f}) over {len(rhos)} example(s): ")
    if alike:
        return head + (f"{alike} at or above {RANDOMISATION_RHO}: FAILED there, those maps "
                       "change little when the weights are random, so they show the input "
                       "more than what the model learned")
    return head + "passed (the maps depend on the weights)"


def explain(bundle_or_model: Any, examples: str | os.PathLike | None,
            select: Selection | None = None, config: ExplainConfig | None = None, *,
            progress: bool = True, **options: Any) -> list[Explanation]:
    """Attribute each selected example; write the files when ``out`` is set.

    ``options`` override fields of ``config`` or ``select`` (``explain(b, ex, target="het",
    steps=100, loci=["chr20:1001"])``). Everything is checked before the model is loaded
    or a record read.
    """
    config, select = split_options(config or ExplainConfig(), select or Selection(), options)
    config.check()
    select.check()
    if select.store is not None:
        store_model(as_store(select.store), bundle_or_model)
    model, device = load_model(bundle_or_model, config.device)
    forward = logit_forward(model) if config.output == "logit" else model
    exs = select_examples(examples, select)
    results = [attribute(model, device, ex, config, forward)
               for ex in _bar(exs, progress, "explain")]
    channels = model_channels(model, examples, results[0].attributions.shape[2])
    if config.sanity:
        randomisation_check(model, device, results, config, forward)
    if config.out is not None:
        write_explanations(results, Path(config.out), channels, config)
    if config.save_in is not None:
        save_in_store(as_store(config.save_in), results, channels, config)
    return results


def split_options(config: Any, select: Selection, options: dict[str, Any]) -> tuple[Any, Selection]:
    """``config`` and ``select`` with ``options`` applied, each to the dataclass that has it
    (``config`` first); an option neither has is a TypeError naming it."""
    from dataclasses import fields

    names = {f.name for f in fields(config)}
    picked = {k: v for k, v in options.items() if k in names}
    rest = {k: v for k, v in options.items() if k not in names}
    unknown = set(rest) - {f.name for f in fields(select)}
    if unknown:
        raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
    return replace(config, **picked), replace(select, **rest)


def _bar(items: list, progress: bool, desc: str):
    if not progress:
        return items
    import sys

    from tqdm.auto import tqdm

    return tqdm(items, unit="ex", desc=desc, file=sys.stderr, dynamic_ncols=True)


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------


def stem(i: int, ex: DVExample) -> str:
    """File stem of the ``i``-th explanation: index, contig and 1-based position."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{i:03d}_{ex.chrom}_{ex.start + 1}")


def channel_labels(channels: Sequence[int], n: int) -> list[str]:
    from probing.channels import channel_name

    if len(channels) != n:
        return [f"channel {i}" for i in range(n)]
    return [f"{c} {channel_name(c)}" for c in channels]


def check_saved_name(name: str) -> str:
    if not name or name.startswith(".") or any(c in name for c in "/\\\0") or len(name) > 200:
        raise ExplainError(f"--name {name[:60]!r}: not a valid name (a directory in the STORE: "
                           "at most 200 characters, no '/' or '\\', no leading '.')")
    return name


def check_store_keys(store: Store, keys: Sequence[str], what: str) -> None:
    """Refuse to save results of examples that are not the STORE's (named by key)."""
    import pandas as pd

    missing = [k for k, ok in zip(keys, pd.Index(keys).isin(store.keys), strict=True) if not ok]
    if missing:
        raise ExplainError(f"{len(missing)} {what} example(s) are not in {store.path}, e.g. "
                           f"{', '.join(missing[:3])}: results are saved only in the STORE "
                           "whose examples they are")


def save_in_store(store: Store, results: list[Explanation], channels: Sequence[int],
                  config: ExplainConfig) -> Path:
    """The explanations (npz + csv, no PNG) as ``STORE/attributions/<name>/``, swapped in
    whole (a reader sees the old set or the new one); every example must be the STORE's."""
    from dvtorch.files import swap_in_dir, sweep_dead_writers, writer_dir

    check_store_keys(store, [e.example.key for e in results], "explained")
    parent = store.path / ATTRIBUTIONS_DIR
    parent.mkdir(exist_ok=True)
    sweep_dead_writers(parent)
    tmp = writer_dir(parent, config.name)
    try:
        write_explanations(results, tmp, channels, replace(config, render=False))
        swap_in_dir(tmp, parent / config.name)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return parent / config.name


def write_explanations(results: list[Explanation], out: Path, channels: Sequence[int],
                       config: ExplainConfig) -> Path:
    """npz + png per example, ``explain.csv`` and ``rows.csv`` in ``out`` (created)."""
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    labels = channel_labels(channels, results[0].attributions.shape[2])
    summary, rows = [], []
    for i, e in enumerate(results):
        s = stem(i, e.example)
        e.files["npz"] = out / f"{s}.npz"
        shown = overlay_images(e, labels)
        np.savez_compressed(e.files["npz"], attributions=e.attributions, image=e.example.image,
                            baseline=e.baseline, channel_totals=e.channel_totals,
                            row_totals=e.row_totals, probs=e.probs, target=e.target,
                            delta=e.delta, channels=np.asarray(channels),
                            overlays=np.stack([img for _, img in shown]),
                            overlay_labels=np.array([lbl for lbl, _ in shown]))
        if config.render:
            e.files["png"] = render_panel(e, labels, out / f"{s}.png", config)
        summary.append(_summary_row(e, labels, config))
        rows.extend({"key": e.example.key, "row": r, "read_row": r >= config.ref_rows,
                     "attribution": float(v)} for r, v in enumerate(e.row_totals))
    pd.DataFrame(summary).to_csv(out / "explain.csv", index=False)
    pd.DataFrame(rows).to_csv(out / "rows.csv", index=False)
    return out


def _summary_row(e: Explanation, labels: list[str], config: ExplainConfig) -> dict:
    ex = e.example
    base = config.baseline if isinstance(config.baseline, str) else "array"
    row = {"key": ex.key, "locus": ex.locus, "label": ex.label, "target": e.target_name,
           "p_hom_ref": e.probs[0], "p_het": e.probs[1], "p_hom_alt": e.probs[2],
           "output": config.output, "baseline": base, "steps": config.steps,
           "f_x": e.f_x, "f_baseline": e.f_baseline,
           "attribution_sum": float(e.attributions.sum()), "delta": e.delta,
           "relative_delta": e.relative_delta, "converged": e.converged,
           "randomised_rho": e.randomised_rho}
    row.update({f"channel:{lbl}": float(v) for lbl, v in zip(labels, e.channel_totals,
                                                             strict=True)})
    row.update({k: v.name for k, v in e.files.items()})
    return row


def overlay(gray: np.ndarray, attr: np.ndarray, scale: float) -> np.ndarray:
    """RGB ``[H, W, 3]``: the channel in grey, attribution blended in (red +, blue -)."""
    g = gray.astype(np.float32)[..., None] * np.ones(3, np.float32)
    a = np.clip(attr / scale, -1, 1) if scale > 0 else np.zeros_like(attr)
    alpha = np.sqrt(np.abs(a))[..., None]  # faint attributions stay visible
    color = np.where(a[..., None] >= 0, np.array([230, 20, 20], np.float32),
                     np.array([20, 60, 230], np.float32))
    return np.clip(g * (1 - alpha) + color * alpha, 0, 255).astype(np.uint8)


def overlay_images(e: Explanation, labels: list[str]) -> list[tuple[str, np.ndarray]]:
    """Each channel with its attribution overlaid (one colour scale for all channels), then
    the channels' sum on white (its own scale)."""
    h, w, _ = e.attributions.shape
    scale = float(np.abs(e.attributions).max())
    images = [(lbl, overlay(e.example.image[:, :, i], e.attributions[:, :, i], scale))
              for i, lbl in enumerate(labels)]
    total = e.attributions.sum(2)
    images.append(("all channels (sum)", overlay(np.full((h, w), 255, np.uint8), total,
                                                  float(np.abs(total).max()))))
    return images


def panel_spec(e: Explanation, labels: list[str], config: ExplainConfig,
               columns: int = 4) -> dict:
    """Vega-Lite grid as :func:`probing.show.figure_spec` draws it, attribution overlaid."""
    h, w, _ = e.attributions.shape
    images = overlay_images(e, labels)
    panels = [{
        "title": {"text": lbl, "fontSize": 12}, "width": w, "height": h,
        "data": {"values": [{"u": data_uri(png_bytes(img))}]},
        "mark": {"type": "image", "width": w, "height": h, "aspect": False,
                 "align": "left", "baseline": "top"},
        "encoding": {"url": {"field": "u", "type": "nominal"},
                     "x": {"value": 0}, "y": {"value": 0}},
    } for lbl, img in images]
    title = (f"{describe(e.example)}  |  IG of p({e.target_name}) = {e.probs[e.target]:.3f}"
             if config.output == "probability" else
             f"{describe(e.example)}  |  IG of logit({e.target_name})")
    sub = (f"baseline {config.baseline if isinstance(config.baseline, str) else 'array'}, "
           f"{config.steps} steps, sum {e.attributions.sum():+.4g} = f(x) - f(b) "
           f"{e.f_x - e.f_baseline:+.4g} (delta {e.delta:+.2g}); red raises, blue lowers")
    return {
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
        "title": {"text": title, "subtitle": sub, "fontSize": 14, "anchor": "start"},
        "vconcat": [{"hconcat": panels[i:i + columns]}
                    for i in range(0, len(panels), columns)],
        "config": {"view": {"stroke": "#999"}, "background": "white"},
    }


def render_panel(e: Explanation, labels: list[str], path: Path, config: ExplainConfig,
                 scale: float = 2.0) -> Path:
    """Write the panel PNG (vl-convert, as ``dvprobe show`` does)."""
    import vl_convert as vlc

    path.write_bytes(vlc.vegalite_to_png(panel_spec(e, labels, config), scale=scale))
    return path
