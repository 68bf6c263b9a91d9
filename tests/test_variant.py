"""A splatting variant through the public API: 3DGS plus a per-Gaussian feature vector."""

import pytest
import torch
from test_engines import H, W, make_params, ring_views

from clm.api import create_engine
from clm.variants.features import feature_spec, render_features

DIM = 4


def variant_params(n: int) -> dict[str, torch.Tensor]:
    params = make_params(n, seed=3)
    params["features"] = torch.zeros(n, DIM)
    return params


def targets(views):
    g = torch.Generator().manual_seed(9)
    rgb = [torch.rand(H, W, 3, generator=g) for _ in views]
    feats = [torch.full((H, W, DIM), 0.5) + 0.1 * torch.rand(H, W, DIM, generator=g) for _ in views]
    return rgb, feats


def train(engine, views, steps=6):
    rgb, feats = targets(views)
    losses = []
    for step in range(steps):
        batch = [(step * 2 + k) % len(views) for k in range(3)]

        def loss_fn(i, out, batch=batch):
            v = batch[i]
            color = (out.image[..., :3] - rgb[v]).abs().mean()
            feature = (out.image[..., 3:] - feats[v]).abs().mean()
            losses.append(float(feature))
            return (color + feature) / len(batch)

        engine.train_step([views[i] for i in batch], loss_fn, lambda *a: None, 1, torch.zeros(3))
    return engine.snapshot(), losses


def make(offload, lr=2.5e-3):
    return create_engine(
        feature_spec(DIM, lr=lr),
        variant_params(300),
        render_features,
        total_steps=30,
        batch_size=3,
        extent=2.0,
        offload=offload,
        device="cpu",
    )


def test_features_are_offloaded_and_match_gpu_resident():
    views = ring_views(6)
    engine = make("clm")
    host_names = [seg.attr.name for seg in engine.host.layout]
    key_names = [seg.attr.name for seg in engine.key.layout]
    assert "features" in host_names and "features" not in key_names
    got, _ = train(engine, views)
    engine.close()
    ref, _ = train(make("none"), views)
    assert ref.params["features"].abs().max() > 0  # the features were trained
    for name in ref.params:
        torch.testing.assert_close(got.params[name], ref.params[name], rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("offload", ["clm", "naive"])
def test_feature_loss_decreases(offload):
    views = ring_views(6)
    engine = make(offload, lr=0.05)
    _, losses = train(engine, views, steps=30)
    engine.close()
    assert sum(losses[-9:]) / 9 < 0.8 * sum(losses[:9]) / 9
