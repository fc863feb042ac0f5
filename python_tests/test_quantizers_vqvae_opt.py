"""Alternating optimisation and the synchronised update of Huh et al. 2023, with and
without the affine codebook. The interface contract is tested in test_quantizers_contract.py."""

import pytest
import torch

from gmvq_ext.quantizers import AffineAlternatingVQ, AlternatingVQ, VectorQuantizer
from helpers import run_ranks

VARIANTS = [AlternatingVQ, AffineAlternatingVQ]


def make(cls=AlternatingVQ, dim=4, codebook_size=16, **options):
    torch.manual_seed(0)
    q = cls(dim=dim, codebook_size=codebook_size, kmeans_init=False, **options)  # the codes below, kept
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        q.codebook.copy_(torch.randn(codebook_size, dim, generator=gen))
        if cls is AffineAlternatingVQ:  # a map that is not the identity, so that its scale enters the step
            q.affine_weight.copy_(0.2 * torch.randn(dim, generator=gen))
            q.affine_bias.copy_(0.2 * torch.randn(dim, generator=gen))
    return q


def rows(seed, n=30, dim=4):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def expected_step(q, raw, velocity, z):
    """One step of SGD with momentum on J(c) = mean_n ||e(c)_{i_n} - z_n||^2, the gradient by autograd."""
    raw = raw.clone().requires_grad_(True)
    codes = q.codebook_map(raw)
    idx = torch.cdist(z, codes.detach()).argmin(1)
    objective = (codes[idx] - z).pow(2).sum(1).mean()
    (gradient,) = torch.autograd.grad(objective, raw)
    velocity = q.codebook_momentum * velocity + gradient
    return (raw - q.codebook_lr * velocity).detach(), velocity


@pytest.mark.parametrize("cls", VARIANTS)
def test_each_training_forward_takes_one_momentum_step_on_the_codebook(cls):
    q = make(cls).train()
    raw, velocity = q.codebook.detach().clone(), torch.zeros(16, 4)
    for seed in range(3):
        z = rows(seed)
        raw, velocity = expected_step(q, raw, velocity, z)
        q(z)
        torch.testing.assert_close(q.codebook.detach(), raw)
        torch.testing.assert_close(q.codebook_velocity, velocity)


def test_vectors_are_reassigned_to_the_moved_codes():
    # 1-D: codes at 0 and 10; nine rows at 4 and one at 5.5, nearer 10 than 0 before the step.
    q = AlternatingVQ(dim=1, codebook_size=2, commitment=0.0, kmeans_init=False).train()
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[0.0], [10.0]]))
    z = torch.tensor([[4.0]] * 9 + [[5.5]])
    out, idx, _, _ = q(z)
    # The step: c0 <- 0 - 0.8 * (2/10) (9 * 0 - 36) = 5.76, c1 <- 10 - 0.8 * (2/10) (10 - 5.5) = 9.28.
    torch.testing.assert_close(q.codebook.detach(), torch.tensor([[5.76], [9.28]]))
    assert idx.tolist() == [0] * 10  # 5.5 now lies nearer the first code
    torch.testing.assert_close(out, torch.full((10, 1), 5.76))
    plain = VectorQuantizer(dim=1, codebook_size=2, kmeans_init=False)
    with torch.no_grad():
        plain.codebook.copy_(torch.tensor([[0.0], [10.0]]))
    assert plain(z)[1].tolist() == [0] * 9 + [1]


@pytest.mark.parametrize("cls", VARIANTS)
def test_synchronised_update_gradients(cls):
    """z_q = z + sg(e - z) + nu (e - sg(e)): value e, the encoder gets g, the code also nu * g."""
    nu = 0.7
    q = make(cls, sync_nu=nu, commitment=0.0).train()
    z = rows(1).requires_grad_(True)
    out, idx, loss, _ = q(z)
    codes = q.codebook_vectors().detach()
    torch.testing.assert_close(out.detach(), codes[idx])
    g = torch.randn_like(out)
    ((out * g).sum() + loss).backward()
    torch.testing.assert_close(z.grad, g)  # plain straight-through: the synchronised term leaves the encoder alone
    gain = q._raw_code_gain().detach() if cls is AffineAlternatingVQ else 1.0
    # The raw codes: only nu * g; their codebook-loss step was taken in the forward.
    expected = torch.zeros_like(q.codebook).index_add_(0, idx, nu * g * gain)
    torch.testing.assert_close(q.codebook.grad, expected)
    if cls is AffineAlternatingVQ:
        # The map's own parameters: nu * g plus the codebook loss, both through e = a c + b.
        grad_e = nu * g + 2 * (codes[idx] - z.detach()) / z.shape[0]
        torch.testing.assert_close(q.affine_bias.grad, q.affine_lr * grad_e.sum(0))
        raw = q.codebook.detach()[idx]
        torch.testing.assert_close(q.affine_weight.grad, q.affine_lr * (grad_e * raw).sum(0))


def test_without_synchronisation_the_outer_loss_leaves_the_raw_codes_alone():
    q = make(AlternatingVQ, sync_nu=0.0).train()
    z = rows(2).requires_grad_(True)
    out, idx, loss, info = q(z)
    (out.sum() + loss).backward()
    assert q.codebook.grad is None or not q.codebook.grad.any()
    # The loss still reports the codebook term (at the moved codes) and trains the encoder by commitment.
    codes = q.codebook.detach()[idx]
    torch.testing.assert_close(info["loss/codebook"], (codes - z.detach()).pow(2).sum(1).mean())
    torch.testing.assert_close(z.grad, 1 + 0.25 * 2 * (z.detach() - codes) / z.shape[0])


@pytest.mark.parametrize("cls", VARIANTS)
def test_evaluation_never_steps(cls):
    q = make(cls).train()
    q(rows(0))
    q.eval()
    codebook, velocity = q.codebook.detach().clone(), q.codebook_velocity.clone()
    for seed in range(2):
        q(rows(seed))
    assert torch.equal(q.codebook.detach(), codebook) and torch.equal(q.codebook_velocity, velocity)


def test_the_step_converges_even_when_one_code_takes_every_vector():
    """The stability bound lr < 1 + mu: just below it, the heavy-ball step still converges."""
    q = AlternatingVQ(dim=2, codebook_size=1, codebook_lr=1.85, codebook_momentum=0.9).train()
    z = rows(3, n=20, dim=2) + 5.0
    for _ in range(400):
        q(z)
    torch.testing.assert_close(q.codebook.detach()[0], z.mean(0), rtol=0, atol=1e-4)


@pytest.mark.parametrize("option, value", [
    ("sync_nu", -0.1), ("codebook_lr", 0.0), ("codebook_lr", 1.9), ("codebook_momentum", 1.0),
    ("codebook_momentum", -0.5), ("affine_lr", 0.0),
])
def test_bad_options_are_refused_by_name(option, value):
    with pytest.raises(ValueError, match=option):
        AffineAlternatingVQ(dim=4, codebook_size=16, **{option: value})


# ---------------------------------------------------------------- torch.distributed
def _rank_rows(rank: int, step: int) -> torch.Tensor:
    # Different batch sizes per rank: the step must weight every vector equally.
    return rows(100 * step + rank, n=12 if rank == 0 else 7)


def _distributed_rank(rank: int, world_size: int) -> dict:
    q = make(AffineAlternatingVQ).train()
    for step in range(2):
        q(_rank_rows(rank, step))
    return {"codebook": q.codebook.detach(), "velocity": q.codebook_velocity}


def test_distributed_codebook_step_is_the_step_on_the_global_batch():
    world_size = 2
    results = run_ranks(_distributed_rank, world_size)
    assert torch.equal(results[0]["codebook"], results[1]["codebook"])
    assert torch.equal(results[0]["velocity"], results[1]["velocity"])
    single = make(AffineAlternatingVQ).train()
    for step in range(2):
        single(torch.cat([_rank_rows(r, step) for r in range(world_size)]))
    torch.testing.assert_close(results[0]["codebook"], single.codebook.detach())
    torch.testing.assert_close(results[0]["velocity"], single.codebook_velocity)
