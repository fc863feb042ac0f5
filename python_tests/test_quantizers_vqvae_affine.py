"""VQ-VAE with the affine codebook of Huh et al. 2023: e_k = a * c_k + b, a and b shared.
The interface contract is tested in test_quantizers_contract.py."""

import pytest
import torch
import torch.nn.functional as F

from gmvq_ext.quantizers import AffineVQ, VectorQuantizer

AFFINE_LR = 2.0


def make(cls=AffineVQ, **options):
    torch.manual_seed(0)
    if cls is AffineVQ:
        options.setdefault("affine_lr", AFFINE_LR)
    q = cls(dim=4, codebook_size=16, kmeans_init=False, **options)  # the codes below, kept
    with torch.no_grad():
        q.codebook.copy_(torch.randn(16, 4, generator=torch.Generator().manual_seed(5)))
    return q


def set_map(q, scale, shift):
    """Parameters giving a = scale, b = shift."""
    with torch.no_grad():
        q.affine_weight.copy_((scale - 1.0) / q.affine_lr)
        q.affine_bias.copy_(shift / q.affine_lr)


def test_the_identity_map_at_initialisation_is_plain_vqvae():
    affine, plain = make().train(), make(VectorQuantizer).train()
    z = torch.randn(30, 4)
    a, b = affine(z), plain(z)
    assert torch.equal(a[1], b[1])
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[2], b[2])


def test_the_decoder_sees_the_mapped_codes():
    q = make().eval()
    scale, shift = torch.tensor([2.0, 0.5, 1.0, 3.0]), torch.tensor([4.0, -1.0, 0.0, 2.0])
    set_map(q, scale, shift)
    z = torch.randn(40, 4) * 2 + shift
    out, idx, _, _ = q(z)
    mapped = q.codebook.detach() * scale + shift
    assert torch.equal(idx, torch.cdist(z, mapped).argmin(1))
    assert not torch.equal(idx, torch.cdist(z, q.codebook.detach()).argmin(1))  # the map changed the choice
    torch.testing.assert_close(out, mapped[idx])
    torch.testing.assert_close(q.get_codes_from_indices(idx), mapped[idx])
    torch.testing.assert_close(q.codebook_vectors(), mapped)


def test_the_codebook_loss_trains_the_map_by_the_chain_rule():
    q = make().train()
    set_map(q, torch.tensor([1.5, 0.8, 1.0, 1.2]), torch.tensor([0.3, -0.2, 0.1, 0.0]))
    z = torch.randn(25, 4, requires_grad=True)
    _, idx, loss, _ = q(z)
    loss.backward()
    codes = q.codebook_vectors().detach()[idx]
    # d(codebook loss)/de_n = 2 (e_n - z_n) / (N D); the decoder's gradient does not reach the codes.
    grad_e = 2 * (codes - z.detach()) / z.shape[0]  # per-vector squared norms, averaged over vectors
    raw = q.codebook.detach()[idx]
    torch.testing.assert_close(q.affine_bias.grad, AFFINE_LR * grad_e.sum(0))
    torch.testing.assert_close(q.affine_weight.grad, AFFINE_LR * (grad_e * raw).sum(0))
    expected_codebook = torch.zeros_like(q.codebook).index_add_(0, idx, grad_e * q.affine_scale().detach())
    torch.testing.assert_close(q.codebook.grad, expected_codebook)


def test_one_step_moves_codes_that_were_not_chosen():
    """The point of the shared map: an unchosen code follows the chosen ones."""
    z = torch.randn(30, 4) + 3.0  # the encoder outputs drifted away from the codebook
    moved = {}
    for cls in (AffineVQ, VectorQuantizer):
        q = make(cls).train()
        optimizer = torch.optim.SGD(q.parameters(), lr=0.5)
        before = q.codebook_vectors().detach().clone()
        _, idx, loss, _ = q(z)
        loss.backward()
        optimizer.step()
        unchosen = torch.ones(16, dtype=torch.bool)
        unchosen[idx] = False
        assert bool(unchosen.any())
        moved[cls] = (q.codebook_vectors().detach() - before)[unchosen].norm(dim=-1)
    assert bool((moved[AffineVQ] > 1e-3).all())
    assert bool((moved[VectorQuantizer] == 0).all())


@pytest.mark.parametrize("affine_lr", [0.0, -1.0])
def test_affine_lr_must_be_positive(affine_lr):
    with pytest.raises(ValueError, match="affine_lr"):
        AffineVQ(dim=4, codebook_size=16, affine_lr=affine_lr)


def test_the_map_is_in_the_state_dict():
    q = make()
    set_map(q, torch.full((4,), 2.0), torch.ones(4))
    restored = make()
    restored.load_state_dict(q.state_dict())
    torch.testing.assert_close(restored.codebook_vectors(), q.codebook_vectors())
    assert F.mse_loss(restored.codebook_vectors(), q.codebook.detach()) > 0
