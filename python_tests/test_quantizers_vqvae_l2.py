"""VQ-VAE on l2-normalised vectors (ViT-VQGAN style).
The interface contract is tested in test_quantizers_contract.py."""

import functools

import torch
import torch.nn.functional as F

from helpers import make_quantizer

make = functools.partial(make_quantizer, "vqvae-l2")


def test_quantized_vectors_are_unit_codes_chosen_by_cosine():
    q = make().train()
    z = torch.randn(40, 4) * 7  # the scale of z must not matter
    out, idx, _, info = q(z)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(40))
    cosine = F.normalize(z, dim=-1) @ F.normalize(q.codebook.detach(), dim=-1).T
    assert torch.equal(idx, cosine.argmax(1))
    unit = F.normalize(z, dim=-1)
    codes = F.normalize(q.codebook.detach(), dim=-1)[idx]
    torch.testing.assert_close(info["loss/codebook"], ((codes - unit) ** 2).sum(1).mean())
    torch.testing.assert_close(q.get_codes_from_indices(idx).norm(dim=-1), torch.ones(40))


def test_scale_invariant():
    q = make().eval()
    z = torch.randn(30, 4)
    a, b = q(z), q(z * 3.5)
    assert torch.equal(a[1], b[1])
    torch.testing.assert_close(a[0], b[0])
