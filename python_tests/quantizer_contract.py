"""The interface every quantizer promises, as reusable checks.

Each ``test_quantizers_<name>.py`` calls these with a factory for its class
and adds the tests that only its class needs."""

from __future__ import annotations

import copy
import io
from typing import Callable

import pytest
import torch

from gmvq_ext.quantizers import Quantizer

REQUIRED_INFO = ("perplexity", "perplexity_hard", "codes_used")


def feature_map(q: Quantizer, batch=2, height=3, width=4, seed=0, scale=1.0) -> torch.Tensor:
    """A channel-first (B, C, H, W) encoder output for q."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, q.input_channels, height, width, generator=gen) * scale


def run(q: Quantizer, x: torch.Tensor, train: bool):
    q.train(train)
    return q(x)


def check_shapes_and_layouts(make: Callable[..., Quantizer]):
    q = make().eval()
    x = feature_map(q)
    out, idx, loss, info = q(x)
    b, _, h, w = x.shape
    assert out.shape == (b, q.code_dim, h, w)
    assert idx.shape == (b, h, w) and idx.dtype == torch.int64
    assert loss.dim() == 0
    assert int(idx.min()) >= 0 and int(idx.max()) < q.codebook_size

    # The same vectors channel-last, in ranks 2, 3 and 4 (4-D needs channel_first=False).
    rows = x.movedim(1, -1)
    out_rows = out.movedim(1, -1)
    for shape in [(b * h * w,), (b, h * w), (b, h, w)]:
        last = make(channel_first=False) if len(shape) == 3 else make()
        last.load_state_dict(q.state_dict())
        last.eval()
        o, i, l, _ = last(rows.reshape(*shape, q.input_channels))
        assert o.shape == (*shape, q.code_dim) and i.shape == shape
        torch.testing.assert_close(o, out_rows.reshape(*shape, q.code_dim))
        assert torch.equal(i, idx.reshape(shape))
        torch.testing.assert_close(l, loss)

    # channel_first=True: dimension 1 holds the channels in any rank.
    first = make(channel_first=True)
    first.load_state_dict(q.state_dict())
    first.eval()
    seq = x.reshape(b, q.input_channels, h * w)
    o, i, _, _ = first(seq)
    torch.testing.assert_close(o, out.reshape(b, q.code_dim, h * w))
    assert torch.equal(i, idx.reshape(b, h * w))

    with pytest.raises(ValueError, match="channels"):
        q(torch.randn(2, q.input_channels + 1, 3, 3))


def check_gradient_flow(make: Callable[..., Quantizer], codebook_name="codebook"):
    q = make().train()
    x = feature_map(q).requires_grad_(True)
    out, _, loss, _ = q(x)
    target = torch.randn_like(out)
    ((out - target).pow(2).mean() + loss).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    codebook = getattr(q, codebook_name)
    assert codebook.grad is not None and torch.isfinite(codebook.grad).all() and codebook.grad.abs().sum() > 0


def check_eval_determinism(make: Callable[..., Quantizer]):
    q = make()
    run(q, feature_map(q, seed=1), train=True)  # any initialisation happens here
    x = feature_map(q)
    step = q.step.clone()
    a = run(q, x, train=False)
    b = run(q, x, train=False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    assert torch.equal(q.step, step), "evaluation must not advance the noise counter"


def check_loss_and_info(make: Callable[..., Quantizer], extra_keys=()):
    q = make()
    for train in (True, False):
        _, idx, loss, info = run(q, feature_map(q), train)
        assert loss.dim() == 0 and torch.isfinite(loss)
        for key in REQUIRED_INFO + tuple(extra_keys):
            assert key in info, key
        loss_keys = [k for k in info if k.startswith("loss/")]
        assert loss_keys, "every loss term must be in info"
        for key, value in info.items():
            assert isinstance(value, torch.Tensor) and value.dim() == 0 and value.is_floating_point(), key
            assert not value.requires_grad, key
            assert torch.isfinite(value), key
        # The listed terms are the loss.
        torch.testing.assert_close(sum(info[k] for k in loss_keys), loss.detach())
        assert 1.0 <= float(info["perplexity"]) <= q.codebook_size + 1e-3
        assert 1.0 <= float(info["perplexity_hard"]) <= float(info["codes_used"]) + 1e-3
        assert float(info["codes_used"]) == len(torch.unique(idx))


def check_codes_from_indices(make: Callable[..., Quantizer]):
    q = make()
    run(q, feature_map(q, seed=1), train=True)
    out, idx, _, _ = run(q, feature_map(q), train=False)
    codes = q.get_codes_from_indices(idx)
    assert codes.shape == (*idx.shape, q.code_dim)
    torch.testing.assert_close(codes.movedim(-1, 1), out)


def check_state_dict_round_trip(make: Callable[..., Quantizer]):
    """A restored module continues exactly where the saved one stopped."""
    q = make()
    q.set_progress(3, 10)
    for seed in range(2):
        run(q, feature_map(q, seed=10 + seed), train=True)
    buffer = io.BytesIO()
    torch.save(q.state_dict(), buffer)
    expected = run(q, feature_map(q, seed=20), train=True)

    restored = make()
    buffer.seek(0)
    restored.load_state_dict(torch.load(buffer))
    got = run(restored, feature_map(q, seed=20), train=True)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    torch.testing.assert_close(got[2], expected[2], rtol=0, atol=0)
    assert torch.equal(restored.step, q.step)


def check_training_noise_advances(make: Callable[..., Quantizer]):
    """Two training forwards of one batch draw different noise (the step counter moves)."""
    q = make()
    run(q, feature_map(q, seed=1), train=True)
    x = feature_map(q)
    a = run(q, x, train=True)
    b = run(q, x, train=True)
    assert int(q.step) == 3
    assert not torch.equal(a[0], b[0])


def check_set_progress(make: Callable[..., Quantizer], **soft_options):
    """The schedule sets the temperature; a soft sample gets sharper as it falls."""
    q = make(**soft_options)
    q.set_progress(0, 100)
    assert float(q.temperature) == pytest.approx(2.0)
    q.set_progress(50, 100)
    assert float(q.temperature) == pytest.approx(2.0 * 20 ** -0.5, rel=1e-6)
    q.set_progress(100, 100)
    assert float(q.temperature) == pytest.approx(0.1)
    q.set_progress(500, 100)
    assert float(q.temperature) == pytest.approx(0.1)

    x = feature_map(q)
    hot, cold = copy.deepcopy(q), copy.deepcopy(q)
    hot.set_progress(0, 100)
    cold.set_progress(100, 100)
    out_hot, _, _, info_hot = run(hot, x, train=True)
    out_cold, _, _, info_cold = run(cold, x, train=True)
    assert float(info_hot["temperature"]) == pytest.approx(2.0)
    assert float(info_cold["temperature"]) == pytest.approx(0.1)
    # Same noise (same step), different temperature: the soft code mixes differ.
    assert not torch.allclose(out_hot, out_cold)
    return out_hot, out_cold


def check_registry(name: str, cls: type):
    from gmvq_ext import QUANTIZERS, build_quantizer

    assert QUANTIZERS[name] is cls
    q = build_quantizer(name, codebook_size=12, dim=5)
    assert isinstance(q, cls) and q.codebook_size == 12 and q.code_dim == 5


# The checks that take nothing but the factory: every quantizer's test file
# runs them through one parametrized test.
CORE_CHECKS = (check_gradient_flow, check_eval_determinism, check_codes_from_indices,
               check_state_dict_round_trip)
