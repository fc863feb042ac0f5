"""The interface every registered quantizer promises (gmvq_ext.QUANTIZERS, the paper's
Table 1): one test per promise, parametrized over the registry. Each quantizer is
built by helpers.make_quantizer; its own behaviour is tested in
test_quantizers_<name>.py, the pieces the quantizers share in test_quantizers_common.py."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from gmvq_ext import QUANTIZERS, build_quantizer
from gmvq_ext.quantizers import (AffineAlternatingVQ, AffineVQ, AlternatingVQ, DeadCodeReplacementVQ,
                                 EntropyRegularizedGMVQ, GaussianMixtureVQ, GumbelVQ, NormalizedDeadCodeReplacementVQ,
                                 NormalizedVQ, SQVAEQuantizer, VectorQuantizer)
from helpers import feature_map, make_quantizer

# The registry as the paper's Table 1 names it.
CLASSES = {
    "vqvae": VectorQuantizer,
    "vqvae-l2": NormalizedVQ,
    "vqvae-replace": DeadCodeReplacementVQ,
    "vqvae-l2-replace": NormalizedDeadCodeReplacementVQ,
    "vqvae-affine": AffineVQ,
    "vqvae-opt": AlternatingVQ,
    "vqvae-affine-opt": AffineAlternatingVQ,
    "sqvae": SQVAEQuantizer,
    "gumbel": GumbelVQ,
    "gmvq": GaussianMixtureVQ,
    "gmvq-entropy": EntropyRegularizedGMVQ,
}
NAMES = sorted(QUANTIZERS)
REQUIRED_INFO = ("perplexity", "perplexity_hard", "codes_used")
# What a quantizer's info holds besides REQUIRED_INFO and its "loss/<term>" entries.
EXTRA_INFO = {"gmvq": ("temperature", "entropy"), "gmvq-entropy": ("temperature", "entropy"),
              "gumbel": ("temperature",), "sqvae": ("temperature", "variance")}
# The quantizers whose training forward draws noise keyed by the step counter.
NOISY = ["gmvq", "gmvq-entropy", "gumbel", "sqvae"]
# The quantizers on the temperature schedule 2 -> 0.1, with the options that make their sample soft.
ANNEALED = {"gmvq": dict(hard=False), "gumbel": dict(hard=False), "sqvae": {}}
# Every quantizer with its test options; GM-VQ also with its other weight modes (fewer input channels).
LAYOUTS = ([pytest.param(name, {}, id=name) for name in NAMES] +
           [pytest.param("gmvq", dict(weight=weight), id=f"gmvq-weight={weight}") for weight in ("scalar", None)])


def run(q, x: torch.Tensor, train: bool):
    q.train(train)
    return q(x)


def test_the_registry_is_table_1():
    assert QUANTIZERS == CLASSES
    with pytest.raises(ValueError, match="unknown quantizer"):
        build_quantizer("vq-gan")
    # The VQ-VAE family (make_quantizer spreads their codes) is every registered VectorQuantizer.
    assert ({name for name, cls in QUANTIZERS.items() if issubclass(cls, VectorQuantizer)} ==
            {name for name in CLASSES if name.startswith("vqvae")})


@pytest.mark.parametrize("name", NAMES)
def test_build_by_name(name):
    q = build_quantizer(name, codebook_size=12, dim=5)
    assert isinstance(q, CLASSES[name]) and q.codebook_size == 12 and q.code_dim == 5


@pytest.mark.parametrize("name", NAMES)
def test_interface_attributes(name):
    q = build_quantizer(name, codebook_size=32, dim=8)
    assert (q.codebook_size, q.code_dim) == (32, 8)
    assert q.input_channels == {"gmvq": 16, "gmvq-entropy": 16, "gumbel": 32}.get(name, 8)
    assert {"seed", "step", "temperature"} <= set(dict(q.named_buffers()))


@pytest.mark.parametrize("name, options", LAYOUTS)
def test_shapes_and_layouts(name, options):
    def make(**layout):
        return make_quantizer(name, **options, **layout)

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


@pytest.mark.parametrize("name", NAMES)
def test_gradient_flow(name):
    q = make_quantizer(name).train()
    x = feature_map(q).requires_grad_(True)
    out, _, loss, _ = q(x)
    target = torch.randn_like(out)
    ((out - target).pow(2).mean() + loss).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert q.codebook.grad is not None and torch.isfinite(q.codebook.grad).all() and q.codebook.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_eval_determinism(name):
    q = make_quantizer(name)
    run(q, feature_map(q, seed=1), train=True)  # any initialisation happens here
    x = feature_map(q)
    step = q.step.clone()
    a = run(q, x, train=False)
    b = run(q, x, train=False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    assert torch.equal(q.step, step), "evaluation must not advance the noise counter"


@pytest.mark.parametrize("name", NAMES)
def test_loss_and_info(name):
    q = make_quantizer(name)
    for train in (True, False):
        _, idx, loss, info = run(q, feature_map(q), train)
        assert loss.dim() == 0 and torch.isfinite(loss)
        for key in REQUIRED_INFO + EXTRA_INFO.get(name, ()):
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


@pytest.mark.parametrize("name", NAMES)
def test_codes_from_indices(name):
    q = make_quantizer(name)
    run(q, feature_map(q, seed=1), train=True)
    out, idx, _, _ = run(q, feature_map(q), train=False)
    codes = q.get_codes_from_indices(idx)
    assert codes.shape == (*idx.shape, q.code_dim)
    torch.testing.assert_close(codes.movedim(-1, 1), out)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name):
    """A restored module continues exactly where the saved one stopped."""
    q = make_quantizer(name)
    q.set_progress(3, 10)
    for seed in range(2):
        run(q, feature_map(q, seed=10 + seed), train=True)
    buffer = io.BytesIO()
    torch.save(q.state_dict(), buffer)
    expected = run(q, feature_map(q, seed=20), train=True)

    restored = make_quantizer(name)
    buffer.seek(0)
    restored.load_state_dict(torch.load(buffer))
    got = run(restored, feature_map(q, seed=20), train=True)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    torch.testing.assert_close(got[2], expected[2], rtol=0, atol=0)
    assert torch.equal(restored.step, q.step)


@pytest.mark.parametrize("name", NAMES)
def test_autocast_computes_in_codebook_dtype(name):
    q = make_quantizer(name).eval()
    x = feature_map(q).to(torch.bfloat16)
    expected = q(x.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = q(x)
    assert got[0].dtype == torch.float32
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("name", NOISY)
def test_training_noise_advances(name):
    """Two training forwards of one batch draw different noise (the step counter moves)."""
    q = make_quantizer(name)
    run(q, feature_map(q, seed=1), train=True)
    x = feature_map(q)
    a = run(q, x, train=True)
    b = run(q, x, train=True)
    assert int(q.step) == 3
    assert not torch.equal(a[0], b[0])


@pytest.mark.parametrize("name", ANNEALED)
def test_set_progress(name):
    """The schedule sets the temperature; a soft sample gets sharper as it falls."""
    q = make_quantizer(name, **ANNEALED[name])
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


@pytest.mark.parametrize("name", [name for name in NAMES if not issubclass(QUANTIZERS[name], GaussianMixtureVQ)])
def test_compile_fullgraph_in_training(name):
    """Dynamo captures every baseline's training forward whole (aot_eager: tracing, not codegen),
    including the buffer and parameter updates (step counter, dead-code replacement, the codebook step
    of alternating optimisation). GM-VQ's compiled forward is tested in test_quantizers_gmvq.py."""
    torch._dynamo.reset()
    modules = []
    for _ in range(2):
        torch.manual_seed(0)
        modules.append(build_quantizer(name, codebook_size=16, dim=4).train())
    eager, compiled_module = modules
    first = torch.randn(2, eager.input_channels, 3, 3, generator=torch.Generator().manual_seed(9))
    for module in modules:  # k-means on the first training batch runs eagerly, before compiling (fullgraph)
        module(first)
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    for seed in range(2):
        x = torch.randn(2, eager.input_channels, 3, 3, generator=torch.Generator().manual_seed(seed))
        expected, got = eager(x), compiled(x)
        torch.testing.assert_close(got[0], expected[0])
        assert torch.equal(got[1], expected[1])
        torch.testing.assert_close(got[2], expected[2])
    for (key, a), b in zip(eager.state_dict().items(), compiled_module.state_dict().values()):
        torch.testing.assert_close(a, b, msg=key)
