"""VQ-VAE with l2-normalised codes and dead-code replacement (both remedies at once).
The interface contract is tested in test_quantizers_contract.py."""

import torch
import torch.nn.functional as F

from helpers import make_quantizer


def make(replace_after=1, **options):
    q = make_quantizer("vqvae-l2-replace", replace_after=replace_after, **options)
    with torch.no_grad():
        # Code 0 points along +e1, every other code roughly along -e1.
        q.codebook.mul_(0.1)
        q.codebook[0, 0] = 3.0
        q.codebook[1:, 0] = -3.0
    return q


def _batch_along_e1(seed, scale):
    # Every row points roughly along +e1 (only code 0 is near in angle), at a scale that must not matter.
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(24, 4, generator=gen) * 0.3
    rows[:, 0] = 1.0
    return rows * scale


def test_dead_codes_take_the_directions_of_encoder_outputs():
    q = make(replace_after=1).train()
    _, idx, _, _ = q(_batch_along_e1(0, scale=5.0))
    assert bool((idx == 0).all())
    assert bool((q.steps_unused[1:] == 1).all())

    batch = _batch_along_e1(1, scale=40.0)
    out, idx, _, info = q(batch)
    # Codes 1..15 now hold rows of this batch; what the quantizer compares and emits are their directions.
    replaced = q.codebook.detach()[1:]
    assert torch.cdist(replaced, batch).min(1).values.max() == 0
    directions = F.normalize(batch, dim=-1)
    codes = q.get_codes_from_indices(torch.arange(16))
    torch.testing.assert_close(codes.norm(dim=-1), torch.ones(16))
    assert torch.cdist(codes[1:], directions).min(1).values.max() < 1e-6
    # The batch is quantized by cosine against the new codes: usage spreads out, outputs are unit vectors.
    assert torch.equal(idx, (directions @ codes.T).argmax(1))
    assert float(info["codes_used"]) > 1
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(24))


def test_replacement_does_not_depend_on_the_scale_of_the_encoder_outputs():
    small, large = make(replace_after=1).train(), make(replace_after=1).train()
    for step in range(3):
        a = small(_batch_along_e1(step, scale=0.5))
        b = large(_batch_along_e1(step, scale=50.0))
        assert torch.equal(a[1], b[1])
        torch.testing.assert_close(a[0], b[0])
