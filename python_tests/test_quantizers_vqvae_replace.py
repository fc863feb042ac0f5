"""VQ-VAE with dead-code replacement.
The interface contract is tested in test_quantizers_contract.py."""

import functools

import pytest
import torch

from helpers import make_quantizer

# Replacement after replace_after = 2 unused steps unless given.
make = functools.partial(make_quantizer, "vqvae-replace")


def _far_batch(seed):
    # Data far from every code but one: codes 1..15 go unused.
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(32, 4, generator=gen) * 0.01 + 50.0


def test_unused_codes_are_counted_and_replaced_by_encoder_outputs():
    q = make(replace_after=2).train()
    with torch.no_grad():
        q.codebook[0].fill_(50.0)  # the only live code
    original = q.codebook.detach().clone()
    q(_far_batch(0))
    assert int(q.steps_unused[0]) == 0 and bool((q.steps_unused[1:] == 1).all())
    q(_far_batch(1))
    assert bool((q.steps_unused[1:] == 2).all())
    assert torch.equal(q.codebook.detach(), original), "nothing is dead before replace_after steps"
    batch = _far_batch(2)
    _, idx, _, info = q(batch)
    # Dead codes now hold rows of the batch, the live one is untouched.
    replaced = q.codebook.detach()[1:]
    assert torch.cdist(replaced, batch).min(1).values.max() == 0
    assert torch.equal(q.codebook.detach()[0], original[0])
    # This very batch was quantized with the new codes: usage spreads out.
    assert float(info["codes_used"]) > 1
    assert int(q.steps_unused[idx].max()) == 0


def test_replacement_is_deterministic_given_the_seed():
    runs = []
    for seed in (0, 0, 3):
        q = make(replace_after=1, seed=seed).train()
        for step in range(3):
            q(_far_batch(step))
        runs.append(q.codebook.detach().clone())
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_eval_never_replaces():
    q = make(replace_after=1).eval()
    before = q.codebook.detach().clone()
    for step in range(3):
        q(_far_batch(step))
    assert torch.equal(q.codebook.detach(), before)
    assert int(q.steps_unused.max()) == 0


def test_replace_after_must_be_positive():
    with pytest.raises(ValueError, match="replace_after"):
        make(replace_after=0)
