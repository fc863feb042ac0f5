"""GaussianMixtureVQ: the docs/math.md loss, k-means initialisation, the one code
path (kernel, or reference where none exists), torch.compile and torch.distributed.
The interface contract is tested in test_quantizers_contract.py."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from gmvq_ext import reference
from gmvq_ext.quantizers import GaussianMixtureVQ, backend
from gmvq_ext.quantizers.base import entropy
from helpers import GMVQ_PAPER, feature_map, graph_recorder, graphs_call, make_quantizer, run_ranks

# K = 16, D = 4 in the paper's settings (helpers.GMVQ_PAPER): what these tests' expected
# values are written for. The package's defaults (chosen on validation) are tested on their own below.
make = functools.partial(make_quantizer, "gmvq")


def test_defaults_are_the_validation_choice():
    # beta 1 (the ALBO), gamma 0.1, the paper's temperature 2 -> 0.1, no training noise and soft samples:
    # experiments/results/cifar10/ (beta-gmvq.md, levers-gmvq.md, levers-gmvq-defaults.md).
    q = GaussianMixtureVQ(dim=4, codebook_size=16)
    assert (q.sigma_z2, q.noise_scale, q.hard, q.gamma, q.beta, q.weight_mode) == (0.5, 0.0, False, 0.1, 1.0,
                                                                                     "full")
    q.set_progress(0, 10)
    assert float(q.temperature) == pytest.approx(2.0)
    q.set_progress(10, 10)
    assert float(q.temperature) == pytest.approx(0.1)


@pytest.mark.parametrize("weight, channels", [("full", 8), ("scalar", 5), (None, 4)])
def test_input_channels_by_weight_mode(weight, channels):
    assert make(weight=weight).input_channels == channels


def test_loss_matches_the_math():
    """loss = gamma mean(latent_reg) + beta (log K - H(q_bar)), outputs = reference.quantize."""
    q = make(beta=2.0, gamma=0.3, sigma_z2=0.7)
    q.train()
    q(feature_map(q, seed=3))  # k-means
    x = feature_map(q)
    offset = q.step.clone()
    out, idx, loss, info = q(x)
    rows = x.movedim(1, -1).reshape(-1, 8)
    z, w = rows[:, :4], F.softplus(rows[:, 4:])
    ref = reference.quantize(z, w, q.codebook.detach(), 2.0, 0.7, True, True, (0, int(offset)))
    torch.testing.assert_close(out.movedim(1, -1).reshape(-1, 4), ref[0])
    assert torch.equal(idx.reshape(-1), ref[1])
    h = entropy(ref[2])
    torch.testing.assert_close(info["entropy"], h)
    torch.testing.assert_close(loss.detach(), 0.3 * ref[3].mean() + 2.0 * (math.log(16) - h))
    torch.testing.assert_close(info["loss/latent"], 0.3 * ref[3].mean())


def test_eval_is_argmax_without_noise():
    q = make()
    q.train()
    q(feature_map(q, seed=3))
    q.eval()
    x = feature_map(q)
    out, idx, _, _ = q(x)
    rows = x.movedim(1, -1).reshape(-1, 8)
    logits = -reference.codebook_distance(rows[:, :4], F.softplus(rows[:, 4:]), q.codebook.detach())
    assert torch.equal(idx.reshape(-1), logits.argmax(1))
    torch.testing.assert_close(out.movedim(1, -1).reshape(-1, 4), q.codebook.detach()[logits.argmax(1)])


def test_separate_weights_match_the_concatenated_input():
    q = make().eval()
    x = feature_map(q)
    combined = q(x)
    separate = q(x[:, :4], w_raw=x[:, 4:])
    assert torch.equal(combined[0], separate[0]) and torch.equal(combined[1], separate[1])
    # A scalar raw weight broadcasts over the D dimensions.
    scalar = q(x[:, :4], w_raw=x[:, 4:5])
    full = q(x[:, :4], w_raw=x[:, 4:5].expand(-1, 4, -1, -1))
    assert torch.equal(scalar[1], full[1])
    with pytest.raises(ValueError, match="w_raw"):
        q(x[:, :4], w_raw=x[:, 4:7])


def test_noise_offset_counts_training_forwards():
    q = make()
    q.train()
    for expected in range(1, 4):
        q(feature_map(q))
        assert int(q.step) == expected
    q.eval()
    q(feature_map(q))
    assert int(q.step) == 3


# ---------------------------------------------------------------- k-means
def test_kmeans_initialisation_puts_codes_on_the_clusters():
    gen = torch.Generator().manual_seed(1)
    centres = torch.randn(16, 4, generator=gen) * 10
    z = centres.repeat(20, 1) + 0.01 * torch.randn(320, 4, generator=gen)
    q = make(weight=None).train()
    assert not bool(q.initialized)
    q(z)
    assert bool(q.initialized)
    # Each code sits on a cluster centre, each centre has a code (random init would not).
    distance = torch.cdist(q.codebook.detach(), centres)
    assert distance.min(1).values.max() < 0.1
    assert distance.min(0).values.max() < 0.1
    # The second forward does not re-initialise.
    before = q.codebook.detach().clone()
    q(z + 5)
    assert torch.equal(q.codebook.detach(), before)


def test_kmeans_with_fewer_vectors_than_codes():
    z = torch.randn(5, 4)
    q = make(weight=None).train()
    q(z)
    codes = q.codebook.detach()
    assert torch.cdist(codes, z).min(1).values.max() < 0.05  # near the data
    assert torch.unique(codes, dim=0).shape[0] == 16  # but not duplicates


def test_kmeans_is_deterministic_and_seeded():
    z = torch.randn(100, 8)
    a, b, c = make().train(), make().train(), make(seed=7).train()
    for q in (a, b, c):
        q(z)
    assert torch.equal(a.codebook, b.codebook)
    assert not torch.equal(a.codebook, c.codebook)


def test_loaded_state_decides_whether_kmeans_runs():
    trained = make().train()
    trained(torch.randn(50, 8))
    fresh = make()
    fresh.load_state_dict(trained.state_dict())
    fresh.train()
    fresh(torch.randn(50, 8) * 100)
    assert torch.equal(fresh.codebook, trained.codebook)
    # And an uninitialised state re-arms it.
    fresh.load_state_dict(make().state_dict())
    assert fresh._kmeans_pending


def test_kmeans_init_can_be_disabled():
    q = make(kmeans_init=False).train()
    before = q.codebook.detach().clone()
    q(torch.randn(50, 8))
    assert torch.equal(q.codebook.detach(), before)


# ---------------------------------------------------------------- backends (autocast: test_quantizers_contract.py)
def test_training_forward_is_the_reference_keyed_by_the_buffers():
    q = make(weight="scalar").train()
    q(feature_map(q, seed=3))  # k-means, step 0
    q.set_progress(3, 10)
    x = feature_map(q, seed=4)
    rows = x.movedim(1, -1).reshape(-1, q.input_channels)
    out, idx, _, _ = q(x)
    expected = reference.quantize(rows[:, :4], F.softplus(rows[:, 4:]), q.codebook, q.temperature, q.sigma_z2, True,
                                  True, (0, 1))  # seed 0; the second training forward has offset 1
    torch.testing.assert_close(out.movedim(1, -1).reshape(-1, 4), expected[0])
    assert torch.equal(idx.reshape(-1), expected[1])


@pytest.mark.parametrize("train", [True, False])
def test_the_reference_runs_only_where_no_kernel_exists(monkeypatch, train):
    """One code path: on a device without kernels (simulated) the module runs
    gmvq_ext.reference, with the same values and gradients as the kernel."""
    results = []
    for kernels in (True, False):
        if not kernels:
            monkeypatch.setattr(backend, "has_kernel", lambda op, device_type: False)
        q = make()
        q.train()
        q(feature_map(q, seed=3))
        q.train(train)
        x = feature_map(q).requires_grad_(True)
        out, idx, loss, info = q(x)
        target = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
        ((out - target).pow(2).mean() + loss).backward()
        results.append((out.detach(), idx, loss.detach(), x.grad, q.codebook.grad))
    for kernel_value, reference_value in zip(*results):
        torch.testing.assert_close(kernel_value, reference_value)


def test_without_training_noise_the_decoder_sees_the_code():
    q = make(noise_scale=0.0).train()
    q(feature_map(q, seed=3))
    noisy = make()
    noisy.load_state_dict(q.state_dict())  # the same codebook and noise offset
    out, idx, loss, _ = q(feature_map(q, seed=4))
    assert torch.equal(out.movedim(1, -1), q.codebook.detach()[idx])
    noisy_out, noisy_idx, noisy_loss, _ = noisy.train()(feature_map(q, seed=4))
    assert not torch.equal(noisy_out, out)
    # The noise is apart from the objective: the same codes, the same loss.
    assert torch.equal(noisy_idx, idx) and torch.equal(noisy_loss, loss)


@pytest.mark.parametrize("noise_scale", [-0.5, float("nan")])
def test_bad_noise_scale_is_refused(noise_scale):
    with pytest.raises(ValueError, match="noise_scale must be finite and non-negative"):
        make(noise_scale=noise_scale)


def test_posterior_is_the_weighted_softmax():
    q = make().eval()
    x = feature_map(q)
    probs = q.posterior(x)
    rows = x.movedim(1, -1).reshape(-1, q.input_channels)
    expected, _ = reference.weighted_softmax(rows[:, :4], F.softplus(rows[:, 4:]), q.codebook, 1.0)
    assert probs.shape == (*x.movedim(1, -1).shape[:-1], 16)
    torch.testing.assert_close(probs.reshape(-1, 16), expected)
    assert torch.equal(probs.argmax(-1), q(x)[1])


# ---------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("train", [True, False])
def test_compile_fullgraph_matches_eager(train):
    """Dynamo captures the whole forward after initialisation (aot_eager: tracing, not codegen)."""
    torch._dynamo.reset()
    eager, compiled_module = make(), make()
    for q in (eager, compiled_module):
        q.train()
        q(feature_map(q, seed=3))  # k-means runs eagerly
        q.set_progress(5, 10)
        q.train(train)
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    for seed in range(2):  # the second call must reuse the graph with the advanced step
        x = feature_map(eager, seed=seed)
        expected = eager(x)
        got = compiled(x)
        torch.testing.assert_close(got[0], expected[0])
        assert torch.equal(got[1], expected[1])
        torch.testing.assert_close(got[2], expected[2])
    assert torch.equal(compiled_module.step, eager.step)


@pytest.mark.parametrize("train", [True, False])
def test_compiled_module_runs_the_kernel_without_recompiling(train):
    """The temperature and the noise key reach the op as tensors: one graph,
    gmvq.quantize in it, the same values as eager while the temperature anneals."""
    torch._dynamo.reset()
    eager, compiled_module = make(), make()
    for q in (eager, compiled_module):
        q.train()
        q(feature_map(q, seed=3))
        q.train(train)
    graphs = []
    compiled = torch.compile(compiled_module, fullgraph=True, backend=graph_recorder(graphs, then="eager"))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(6):
            for q in (eager, compiled_module):
                q.set_progress(step, 6)  # a new temperature must not need a new graph
            x = feature_map(eager, seed=step)
            expected, got = eager(x), compiled(x)
            torch.testing.assert_close(got[0], expected[0])
            assert torch.equal(got[1], expected[1])
            torch.testing.assert_close(got[2], expected[2])
    assert len(graphs) == 1 and graphs_call(graphs, "gmvq.quantize")


def test_compile_before_initialisation_runs_kmeans_eagerly():
    """Without fullgraph, k-means is a graph break run eagerly once; with it, an error."""
    torch._dynamo.reset()
    eager, compiled_module = make(), make()
    compiled = torch.compile(compiled_module, backend="aot_eager")
    for seed in range(2):
        x = feature_map(eager, seed=seed)
        torch.testing.assert_close(compiled(x)[0], eager(x)[0])
    assert torch.equal(compiled_module.codebook, eager.codebook)
    torch._dynamo.reset()  # the cached graphs above would be reused
    with pytest.raises(Exception, match="initialise_codebook|skip|disable"):
        torch.compile(make(), backend="aot_eager", fullgraph=True)(feature_map(eager))


# ---------------------------------------------------------------- torch.distributed
def _distributed_rows(rank: int) -> torch.Tensor:
    # Different batch sizes per rank: the global mean must weight by count.
    gen = torch.Generator().manual_seed(100 + rank)
    return torch.randn(12 if rank == 0 else 7, 8, generator=gen)


def _distributed_rank(rank: int, world_size: int) -> dict:
    torch.manual_seed(rank)  # different random codebooks: k-means + broadcast must agree
    q = GaussianMixtureVQ(dim=4, codebook_size=16, **{**GMVQ_PAPER, "gamma": 0.0}).train()
    rows = _distributed_rows(rank).requires_grad_(True)
    _, _, loss, info = q(rows)
    loss.backward()
    # The same rows on both ranks: each rank draws its own noise (offset = step * world + rank).
    second, _, _, _ = q(_distributed_rows(0))
    return {"codebook": q.codebook.detach(), "grad": rows.grad, "entropy": info["entropy"], "step": q.step.clone(),
            "second": second.detach()}


def test_distributed_q_bar_is_global_with_gradient():
    world_size = 2
    results = run_ranks(_distributed_rank, world_size)
    codebook = results[0]["codebook"]
    assert torch.equal(results[1]["codebook"], codebook)

    # The same computation on the concatenated batch in one process.
    rows = [_distributed_rows(r).requires_grad_(True) for r in range(world_size)]
    z = torch.cat(rows)
    logits = -reference.codebook_distance(z[:, :4], F.softplus(z[:, 4:]), codebook)
    global_entropy, _ = reference.aggregated_posterior_entropy(logits)
    (math.log(16) - global_entropy).backward()
    for r in range(world_size):
        torch.testing.assert_close(results[r]["entropy"], global_entropy.detach())
        # Every rank's loss is the global KL, so the all-reduce backward sums
        # world_size copies of each rank's share of the global gradient.
        torch.testing.assert_close(results[r]["grad"], world_size * rows[r].grad)
        assert int(results[r]["step"]) == 2
        z0 = _distributed_rows(0)
        offset = 1 * world_size + r
        expected = reference.quantize(z0[:, :4], F.softplus(z0[:, 4:]), codebook, 2.0, 0.5, True, True,
                                      (0, offset))[0]
        torch.testing.assert_close(results[r]["second"], expected)
    assert not torch.equal(results[0]["second"], results[1]["second"])


@pytest.mark.slow
def test_compile_inductor_training_step_matches_eager():
    """Real code generation (inductor), forward and backward, two steps without recompiling."""
    torch._dynamo.reset()
    eager, compiled_module = make(), make()
    for q in (eager, compiled_module):
        q.train()
        q(feature_map(q, seed=3))
    compiled = torch.compile(compiled_module, fullgraph=True)
    for seed in range(2):
        x = feature_map(eager, seed=seed)
        grads = []
        for module, q in ((eager, eager), (compiled, compiled_module)):
            x_q = x.clone().requires_grad_(True)
            q.zero_grad()
            out, idx, loss, _ = module(x_q)
            (out.pow(2).mean() + loss).backward()
            grads.append((out.detach(), idx, loss.detach(), x_q.grad, q.codebook.grad.clone()))
        for a, b in zip(*grads):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
