"""GM-VQ + Entropy (the paper's last Table 1 row) as a quantizer of its own name.

The paper trains "GM-VQ" with the weight beta of KL(q_bar || U) fixed at 1,
tuning gamma, and "GM-VQ + Entropy" with "higher entropy regularization"
(a larger beta) and gamma fixed; it gives neither number
(docs/math.md#beta-and-gamma-gm-vq-vs-gm-vq--entropy). The only difference is
therefore the default of beta: 5, five times GM-VQ's (the ALBO's, in the
units of docs/math.md "Units of the objective"), the largest value of the
sweep proposed there. On CIFAR-10 validation a larger beta buys code usage
with reconstruction (experiments/results/cifar10/beta-gmvq.md, at gamma 0.3: beta 3 gave
perplexity 783 at 23.2e-3 MSE, beta 10 917 at 26.4e-3, against 426 at
21.8e-3 for beta 1). Every option of ``GaussianMixtureVQ`` applies, ``beta``
(``--beta``) included: ``gmvq-entropy --beta 2`` and ``gmvq --beta 2`` build
the same quantizer.
"""

from __future__ import annotations

from .gmvq import GaussianMixtureVQ

ENTROPY_BETA = 5.0


class EntropyRegularizedGMVQ(GaussianMixtureVQ):
    """``GaussianMixtureVQ`` with beta = 5 (5 times GM-VQ's default) by default."""

    def __init__(self, dim: int = 64, codebook_size: int = 1024, *, beta: float = ENTROPY_BETA, **options):
        super().__init__(dim, codebook_size, beta=beta, **options)
