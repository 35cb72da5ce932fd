"""Specification of ``dvprobe ablate`` (:mod:`probing.ablate`): a model that provably uses one
channel in a band of rows (tests/test_explain.py's ``RegionModel``), so each property can fail."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_explain import RegionModel, pileups, write_examples

from probing.ablate import AblateConfig, ablate, derangement
from probing.explain import ExplainError, scaled


def test_ablation_ranks_the_used_channel_first_and_the_rest_at_zero(tmp_path):
    images = pileups(60, seed=6)
    labels = RegionModel()(scaled(images)).argmax(1).numpy()
    spec = write_examples(tmp_path / "ex.tfrecord.gz", images, labels=labels)
    res = ablate(RegionModel(), spec, n=60, bootstrap=200, shuffle=True, progress=False,
                 out=tmp_path / "abl")
    for mode in ("zeros", "shuffle"):
        t = res.table[res.table["mode"] == mode].set_index("channel")
        assert res.ranking(mode)[0] == "5 read_supports_variant"
        used = t.loc["5 read_supports_variant"]
        assert used["importance"] > 0.05 and used["importance_lo"] > 0
        rest = t.drop(index="5 read_supports_variant")
        assert (rest[["importance", "flip_fraction", "agreement_change"]].abs() < 1e-6).all().all()
    used = res.table.query("mode == 'zeros' and index == 4").iloc[0]
    assert used["flip_fraction"] > 0 and used["agreement_change"] == -used["flip_fraction"]
    assert used["importance_lo"] <= used["importance"] <= used["importance_hi"]
    assert (tmp_path / "abl" / "ablation.png").read_bytes().startswith(b"\x89PNG")
    md = (tmp_path / "abl" / "ablation.md").read_text()
    assert md.index("| 1 | 5 read_supports_variant | zeros |") < md.index("| 1 | 5 read_supports_variant | shuffle |")


def test_ablation_agrees_with_captums_feature_ablation(tmp_path):
    """Zero ablation of each channel: the target column of our Δp is Captum's
    ``FeatureAblation`` with one feature per channel (its sign: f(x) - f(ablated))."""
    from captum.attr import FeatureAblation

    images = pileups(8, seed=7)
    spec = write_examples(tmp_path / "ex.tfrecord.gz", images)
    model = RegionModel(k=2, r1=5, r2=40)
    res = ablate(model, spec, n=8, bootstrap=0, progress=False)
    mask = torch.arange(7).expand(1, 1, 1, 7)
    theirs = FeatureAblation(model).attribute(scaled(images), target=2, feature_mask=mask)
    ours = res.probs[:, 2][None] - res.ablated["zeros"][:, :, 2]  # [C, N]
    assert np.allclose(ours.T, theirs[:, 0, 0, :].numpy(), atol=1e-6)


def test_mean_ablation_uses_the_sample_mean_and_shuffling_never_keeps_an_example(tmp_path):
    perm = derangement(50, seed=3)
    assert sorted(perm) == list(range(50)) and not np.any(perm == np.arange(50))
    images = pileups(10, seed=8)
    images[..., 4] = 152  # channel 4 identical everywhere: its mean ablation changes nothing
    spec = write_examples(tmp_path / "ex.tfrecord.gz", images)
    res = ablate(RegionModel(), spec, AblateConfig(n=10, neutral="mean", bootstrap=0),
                 progress=False)
    assert np.allclose(res.ablated["mean"][4], res.probs, atol=1e-6)


@pytest.mark.parametrize(("options", "message"), [
    ({"n": 0}, "n must be at least 1, got 0"),
    ({"neutral": "median"}, r"neutral 'median': use zeros \| mean"),
    ({"bootstrap": -1}, "bootstrap must be >= 0, got -1"),
    ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
])
def test_bad_options_are_refused_before_the_model_is_loaded(tmp_path, options, message):
    with pytest.raises(ExplainError, match=message):
        ablate(tmp_path / "no-such-bundle", tmp_path / "no-such-examples", **options)
