"""GM-VQ + Entropy: GaussianMixtureVQ with 5 times its beta by default (5), trainable by name.
The interface contract is tested in test_quantizers_contract.py."""

import functools
import math

import torch

from gmvq_ext import build_quantizer
from gmvq_ext.quantizers import GaussianMixtureVQ
from helpers import make_quantizer

make = functools.partial(make_quantizer, "gmvq-entropy")


def test_it_is_gmvq_with_five_times_its_beta():
    assert make().beta == 5.0 == 5 * build_quantizer("gmvq", codebook_size=16, dim=4).beta
    x = torch.randn(2, 8, 3, 3, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    gmvq = GaussianMixtureVQ(dim=4, codebook_size=16, beta=5.0).train()
    entropy = make().train()
    a, b = entropy(x), gmvq(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(a[2], b[2])
    # The entropy term carries 5 times the weight it has in plain GM-VQ.
    torch.testing.assert_close(a[3]["loss/kl_uniform"], 5.0 * (math.log(16) - a[3]["entropy"]))


def test_beta_stays_an_option():
    assert build_quantizer("gmvq-entropy", codebook_size=16, dim=4, beta=2.0).beta == 2.0
