"""Gumbel-VQ: the encoder emits K logits, a Gumbel-softmax sample picks a code.
The interface contract is tested in test_quantizers_contract.py."""

import functools
import math

import torch

from gmvq_ext import reference
from helpers import make_quantizer

make = functools.partial(make_quantizer, "gumbel")


def test_the_encoder_emits_one_logit_per_code():
    assert make().input_channels == 16 and make().code_dim == 4


def test_training_sample_and_kl():
    q = make(kl_weight=0.5).train()
    q.set_progress(2, 10)
    logits = torch.randn(30, 16) * 3
    out, idx, loss, info = q(logits)
    temperature = float(q.temperature)
    sample, expected_idx = reference.gumbel_argmax(logits, temperature, True, (0, 0))
    assert torch.equal(idx, expected_idx)
    torch.testing.assert_close(out, q.codebook.detach()[idx])  # hard: exactly one code each
    probs = torch.softmax(logits, 1)
    kl = (probs * (torch.log(probs) + math.log(16))).sum(1).mean()
    torch.testing.assert_close(loss, 0.5 * kl)
    torch.testing.assert_close(info["perplexity"], torch.exp(-(probs.mean(0) * probs.mean(0).log()).sum()))


def test_straight_through_gradient_reaches_logits():
    q = make().train()
    logits = torch.randn(10, 16, requires_grad=True)
    out, idx, _, _ = q(logits)
    out.sum().backward()
    assert logits.grad.abs().sum() > 0
    # Only the chosen code's row receives codebook gradient.
    used = torch.zeros(16, dtype=torch.bool)
    used[idx] = True
    assert bool((q.codebook.grad[~used] == 0).all()) and bool((q.codebook.grad[used] != 0).any())


def test_eval_picks_the_argmax():
    q = make().eval()
    logits = torch.randn(20, 16)
    _, idx, _, _ = q(logits)
    assert torch.equal(idx, logits.argmax(1))
