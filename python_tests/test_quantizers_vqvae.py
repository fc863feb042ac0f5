"""VQ-VAE (van den Oord et al.): nearest code, straight-through, codebook + commitment loss.
The interface contract is tested in test_quantizers_contract.py."""

import functools

import torch

from helpers import feature_map, make_quantizer

# Codes at the data's scale, so that a batch uses several of them.
make = functools.partial(make_quantizer, "vqvae")


def test_nearest_code_and_losses():
    q = make().train()
    z = torch.randn(50, 4, requires_grad=True)
    out, idx, loss, info = q(z)
    distances = torch.cdist(z.detach(), q.codebook.detach())
    assert torch.equal(idx, distances.argmin(1))
    codes = q.codebook.detach()[idx]
    torch.testing.assert_close(out.detach(), codes)
    # Squared norms per latent vector (summed over D), averaged over the 50 vectors.
    squared_norms = ((codes - z.detach()) ** 2).sum(1)
    torch.testing.assert_close(info["loss/codebook"], squared_norms.mean())
    torch.testing.assert_close(info["loss/commitment"], 0.25 * squared_norms.mean())
    torch.testing.assert_close(loss.detach(), 1.25 * squared_norms.mean())
    # Soft and hard perplexity coincide: the posterior is one-hot.
    assert torch.equal(info["perplexity"], info["perplexity_hard"])


def test_straight_through_gradient():
    q = make().train()
    z = torch.randn(20, 4, requires_grad=True)
    out, _, _, _ = q(z)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    torch.testing.assert_close(z.grad, g)  # the decoder's gradient passes unchanged
    assert q.codebook.grad is None or q.codebook.grad.abs().sum() == 0


def test_codebook_loss_moves_codes_commitment_moves_encoder():
    q = make().train()
    z = torch.randn(20, 4, requires_grad=True)
    _, idx, loss, _ = q(z)
    loss.backward()
    codes = q.codebook.detach()[idx]
    n_vectors = z.shape[0]  # squared norms per vector, averaged over the vectors
    torch.testing.assert_close(z.grad, 0.25 * 2 * (z.detach() - codes) / n_vectors)
    expected = torch.zeros_like(q.codebook).index_add_(0, idx, 2 * (codes - z.detach()) / n_vectors)
    torch.testing.assert_close(q.codebook.grad, expected)


def test_set_progress_is_harmless():
    q = make().eval()
    x = feature_map(q)
    before = q(x)[0]
    q.set_progress(5, 10)
    assert torch.equal(q(x)[0], before)
