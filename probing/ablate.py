"""Which channels does the call depend on? Channel ablation over many examples (``dvprobe ablate``).

For N examples, each channel in turn is replaced by a neutral value and the model is run
again; the change in its output, per channel, says how much the calls lean on it:

* ``neutral="zeros"``: the channel set to 0.0 in scaled units (raw pixel 128), the same
  zero signal as :mod:`probing.explain`'s ``"zeros"`` baseline;
* ``neutral="mean"``: the channel replaced by its per-pixel mean over the N examples (keeps
  the reference band and the typical read layout, removes what is specific to an example);
* ``shuffle=True`` adds a third mode: each example gets the channel of another example of
  the sample (a seeded derangement), i.e. realistic values that do not belong to its reads.

Per channel and mode (``table``): the mean absolute change of each genotype probability,
``importance`` = the mean total-variation distance ``sum |dp| / 2`` (one number to rank by),
the fraction of calls (argmax) that flip, the change in agreement with the label over the
labelled examples, and percentile bootstrap 95 % intervals over examples (seeded).

Why not Captum's ``FeatureAblation``: it returns one number per feature for one target
output, while these statistics need the whole probability vector of every ablated forward
(three genotypes, the argmax for flips and label agreement) and per-example replacement
values (mean image, shuffled partner); that would take three Captum passes plus a fourth
for the argmax. The direct batched loop below is the same computation done once; the tests
check its target column against ``FeatureAblation``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from probing.explain import (
    GENOTYPES,
    ExplainError,
    Selection,
    channel_labels,
    check_saved_name,
    check_store_keys,
    load_model,
    model_channels,
    scaled,
    select_examples,
    split_options,
    store_model,
)
from probing.report import ABLATION_DIR
from probing.store import Store, as_store

NEUTRALS = ("zeros", "mean")


@dataclass
class AblateConfig:
    """``n`` examples (the first ``n`` unless ``select`` says otherwise), ``bootstrap``
    resamples for the intervals (0: none), ``seed`` for the bootstrap and the shuffle;
    ``save_in``: a STORE whose examples these are, to save the table in as
    ``ablation/<name>.csv`` for its report."""

    n: int = 1000
    neutral: str = "zeros"
    shuffle: bool = False
    bootstrap: int = 1000
    seed: int = 0
    batch_size: int = 64
    device: str = "cpu"
    out: str | os.PathLike | None = None
    save_in: Store | str | os.PathLike | None = None
    name: str = "ablation"

    def check(self) -> None:
        if self.save_in is not None:
            check_saved_name(self.name)
        if self.n < 1:
            raise ExplainError(f"n must be at least 1, got {self.n}")
        if self.neutral not in NEUTRALS:
            raise ExplainError(f"neutral {self.neutral!r}: use {' | '.join(NEUTRALS)}")
        if self.bootstrap < 0:
            raise ExplainError(f"bootstrap must be >= 0, got {self.bootstrap}")
        if self.batch_size < 1:
            raise ExplainError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class Ablation:
    """``probs`` ``[N, 3]`` unablated; ``ablated[mode]`` ``[C, N, 3]``; ``table`` as above."""

    keys: list[str]
    labels: np.ndarray
    channels: list[str]
    probs: np.ndarray
    ablated: dict[str, np.ndarray]
    table: pd.DataFrame

    def ranking(self, mode: str | None = None) -> list[str]:
        """Channels by importance, most important first."""
        t = self.table if mode is None else self.table[self.table["mode"] == mode]
        return list(t.sort_values("importance", ascending=False)["channel"])


# --------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------


def predict(model, device, images: np.ndarray, batch_size: int,
            replace_channel: tuple[int, np.ndarray] | None = None) -> np.ndarray:
    """Probabilities ``[N, 3]``; ``replace_channel = (c, values [N or 1, H, W])`` in scaled
    units puts ``values`` into channel ``c`` of each batch before the forward."""
    import torch

    out = []
    with torch.no_grad():
        for s in range(0, len(images), batch_size):
            x = scaled(images[s:s + batch_size])
            if replace_channel is not None:
                c, values = replace_channel
                v = values if len(values) == 1 else values[s:s + batch_size]
                x[..., c] = torch.from_numpy(np.asarray(v, np.float32))
            out.append(model(x.to(device)).float().cpu().numpy())
    return np.concatenate(out)


def replacements(images: np.ndarray, c: int, mode: str, perm: np.ndarray) -> np.ndarray:
    """What channel ``c`` becomes under ``mode``, scaled: ``[1, H, W]`` or ``[N, H, W]``."""
    if mode == "zeros":
        return np.zeros((1, *images.shape[1:3]), np.float32)
    if mode == "mean":
        mean = images[..., c].mean(axis=0, dtype=np.float64)
        return ((mean - 128.0) / 128.0).astype(np.float32)[None]
    if mode == "shuffle":
        return (images[perm, :, :, c].astype(np.float32) - 128.0) / 128.0
    raise ExplainError(f"unknown ablation mode {mode!r}")


def derangement(n: int, seed: int) -> np.ndarray:
    """A seeded permutation with no fixed point (n > 1): example i takes ``perm[i]``'s channel."""
    order = np.random.default_rng(seed).permutation(n)
    perm = np.empty(n, np.int64)
    perm[order] = np.roll(order, -1)
    return perm


def example_stats(p0: np.ndarray, p1: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per-example statistics whose means the table reports (NaN: unlabelled example)."""
    dp = np.abs(p1 - p0)
    call0, call1 = p0.argmax(1), p1.argmax(1)
    has = labels >= 0
    agree = np.where(has, (call1 == labels).astype(float) - (call0 == labels), np.nan)
    stats = {f"dp_{g}": dp[:, i] for i, g in enumerate(GENOTYPES)}
    stats.update(importance=dp.sum(1) / 2, flip_fraction=(call0 != call1).astype(float),
                 agreement_change=agree)
    return stats


def bootstrap_ci(values: np.ndarray, resamples: np.ndarray) -> tuple[float, float]:
    """Percentile 95 % interval of the mean (NaNs, i.e. unlabelled rows, left out)."""
    if resamples.size == 0 or np.isnan(values).all():
        return (np.nan, np.nan)
    means = np.nanmean(values[resamples], axis=1) if np.isnan(values).any() \
        else values[resamples].mean(axis=1)
    lo, hi = np.nanpercentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def summarise(p0: np.ndarray, ablated: dict[str, np.ndarray], labels: np.ndarray,
              names: Sequence[str], config: AblateConfig) -> pd.DataFrame:
    """One row per channel and mode: modes in ``ablated``'s order (the neutral value, then
    the shuffle), channels by importance within each."""
    n = len(p0)
    rng = np.random.default_rng(config.seed)
    resamples = rng.integers(0, n, size=(config.bootstrap, n))
    rows = []
    for mode, pc in ablated.items():
        for c, name in enumerate(names):
            row: dict[str, Any] = {"channel": name, "index": c, "mode": mode, "n": n,
                                   "n_labelled": int((labels >= 0).sum())}
            for stat, v in example_stats(p0, pc[c], labels).items():
                row[stat] = float(np.nanmean(v)) if not np.isnan(v).all() else np.nan
                row[f"{stat}_lo"], row[f"{stat}_hi"] = bootstrap_ci(v, resamples)
            rows.append(row)
    t = pd.DataFrame(rows)
    t["order"] = t["mode"].map({m: i for i, m in enumerate(ablated)})
    t = t.sort_values(["order", "importance"], ascending=[True, False], kind="stable")
    t.insert(0, "rank", t.groupby("mode").cumcount() + 1)
    return t.drop(columns="order").reset_index(drop=True)


def ablate(bundle_or_model: Any, examples: str | os.PathLike | None,
           config: AblateConfig | None = None, select: Selection | None = None, *,
           progress: bool = True, **options: Any) -> Ablation:
    """Channel ablation over the selected examples; writes the table and chart if ``out``.

    ``options`` override fields of ``config`` or ``select`` (``ablate(b, ex, n=200,
    neutral="mean")``); ``config.n`` is the sample size of any selection.
    """
    config, select = split_options(config or AblateConfig(), select or Selection(), options)
    config.check()
    select = replace(select, n=config.n)
    select.check()
    if select.store is not None:
        store_model(as_store(select.store), bundle_or_model)
    model, device = load_model(bundle_or_model, config.device)
    exs = select_examples(examples, select)
    images = np.stack([ex.image for ex in exs])
    labels = np.array([-1 if ex.label is None else ex.label for ex in exs])
    names = channel_labels(model_channels(model, examples, images.shape[3]), images.shape[3])
    p0 = predict(model, device, images, config.batch_size)
    modes = [config.neutral] + (["shuffle"] if config.shuffle else [])
    perm = derangement(len(images), config.seed)
    ablated = {m: np.zeros((len(names), *p0.shape), np.float32) for m in modes}
    for m, c in _bar([(m, c) for m in modes for c in range(len(names))], progress):
        ablated[m][c] = predict(model, device, images, config.batch_size,
                                (c, replacements(images, c, m, perm)))
    result = Ablation([ex.key for ex in exs], labels, names, p0, ablated,
                      summarise(p0, ablated, labels, names, config))
    if config.out is not None:
        write_ablation(result, Path(config.out))
    if config.save_in is not None:
        save_in_store(as_store(config.save_in), result, config.name)
    return result


def save_in_store(store: Store, result: Ablation, name: str) -> Path:
    """The table as ``STORE/ablation/<name>.csv``, written atomically; the examples must be
    the STORE's."""
    from dvtorch.files import atomic_write_bytes

    check_store_keys(store, result.keys, "ablated")
    (store.path / ABLATION_DIR).mkdir(exist_ok=True)
    path = store.path / ABLATION_DIR / f"{check_saved_name(name)}.csv"
    atomic_write_bytes(path, result.table.to_csv(index=False).encode("utf-8"))
    return path


def _bar(items: list, progress: bool):
    if not progress:
        return items
    import sys

    from tqdm.auto import tqdm

    return tqdm(items, unit="channel", desc="ablate", file=sys.stderr, dynamic_ncols=True)


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------

_SHOWN = ["rank", "channel", "mode", "importance", "importance_lo", "importance_hi",
          "dp_hom_ref", "dp_het", "dp_hom_alt", "flip_fraction", "flip_fraction_lo",
          "flip_fraction_hi", "agreement_change", "agreement_change_lo",
          "agreement_change_hi", "n", "n_labelled"]


def markdown(table: pd.DataFrame) -> str:
    """The table's main columns as a Markdown table (numbers to 4 significant digits)."""
    t = table[_SHOWN]
    lines = ["| " + " | ".join(t.columns) + " |", "|" + "---|" * len(t.columns)]
    for _, r in t.iterrows():
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in r]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def chart_spec(table: pd.DataFrame) -> dict:
    """Vega-Lite bars of importance per channel with the bootstrap interval, one row a mode."""
    data = table[["channel", "mode", "importance", "importance_lo", "importance_hi"]]
    enc_y = {"field": "channel", "type": "nominal", "sort": "-x", "title": None}
    return {
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
        "data": {"values": data.fillna(0).to_dict("records")},
        "facet": {"row": {"field": "mode", "type": "nominal", "title": "neutral",
                           "sort": list(dict.fromkeys(table["mode"]))}},
        "spec": {"width": 360, "layer": [
            {"mark": "bar", "encoding": {
                "y": enc_y, "x": {"field": "importance", "type": "quantitative",
                                  "title": "mean total-variation change of p (95% CI)"}}},
            {"mark": {"type": "rule", "color": "black"}, "encoding": {
                "y": enc_y, "x": {"field": "importance_lo", "type": "quantitative"},
                "x2": {"field": "importance_hi"}}},
        ]},
        "resolve": {"scale": {"y": "independent"}},
        "config": {"background": "white"},
    }


def write_ablation(result: Ablation, out: Path) -> Path:
    """``ablation.csv`` (every column), ``ablation.md`` and ``ablation.png`` in ``out``."""
    import vl_convert as vlc

    out.mkdir(parents=True, exist_ok=True)
    result.table.to_csv(out / "ablation.csv", index=False)
    (out / "ablation.md").write_text(markdown(result.table))
    (out / "ablation.png").write_bytes(vlc.vegalite_to_png(chart_spec(result.table), scale=2))
    return out
