"""SQ-VAE Gaussian stochastic quantisation (gaussian_1: one learned variance).
The interface contract is tested in test_quantizers_contract.py."""

import functools
import math

import torch

from gmvq_ext import reference
from helpers import make_quantizer

make = functools.partial(make_quantizer, "sqvae")


def test_loss_terms_follow_the_paper():
    q = make(latent_weight=0.1, log_variance_init=math.log(2.0)).train()
    z = torch.randn(25, 4)
    out, idx, loss, info = q(z)
    logits = -torch.cdist(z, q.codebook.detach()).pow(2) / (2 * 2.0)
    probs = torch.softmax(logits, 1)
    kl_discrete = (probs * (probs.log() + math.log(16))).sum(1).mean()
    sample, expected_idx = reference.gumbel_argmax(logits, 2.0, False, (0, 0))
    assert torch.equal(idx, expected_idx)
    torch.testing.assert_close(out, sample @ q.codebook.detach(), rtol=1e-4, atol=1e-4)
    kl_gaussian = (z - out.detach()).pow(2).sum(1).mean() / (2 * 2.0)
    torch.testing.assert_close(info["loss/kl_discrete"], 0.1 * kl_discrete, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(info["loss/kl_gaussian"], 0.1 * kl_gaussian, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(info["variance"], torch.tensor(2.0))


def test_variance_is_learned():
    q = make().train()
    out, _, loss, _ = q(torch.randn(25, 4))
    (out.pow(2).mean() + loss).backward()
    assert q.log_variance.grad is not None and q.log_variance.grad != 0


def test_small_variance_anneals_to_nearest_code():
    """As the variance shrinks the stochastic code becomes the deterministic nearest one."""
    q = make(log_variance_init=math.log(1e-4)).train()
    q.set_progress(100, 100)
    z = torch.randn(40, 4)
    out, idx, _, _ = q(z)
    nearest = torch.cdist(z, q.codebook.detach()).argmin(1)
    assert torch.equal(idx, nearest)
    torch.testing.assert_close(out, q.codebook.detach()[nearest])
