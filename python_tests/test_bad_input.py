"""Bad input: one table over every op, each row naming the argument the error must name.

Every row runs on each kernel device and on "meta", where the fake kernels
(gmvq_ext/ops.py, gmvq_ext/_checks.py) answer: both must reject the input
with a message that starts with the argument's name."""

import math

import pytest
import torch

from helpers import DEVICES

N, K, D = 4, 5, 3


class Inputs:
    """Tensors of the default (valid) shapes on one device; `other` is a second device."""

    def __init__(self, device):
        self.device = device
        # A mixed cpu/meta call dispatches to the meta (fake) kernel; a cuda/cpu call to the CUDA one.
        self.other = "meta" if device == "cpu" else "cpu"

    def t(self, *shape, dtype=torch.float32, device=None):
        return torch.zeros(shape, dtype=dtype, device=device or self.device)

    @staticmethod
    def temperature(value=1.0):
        """A CPU 0-dim temperature: valid beside inputs on any device."""
        return torch.tensor(value, dtype=torch.float64)

    @staticmethod
    def state(seed=0, offset=0):
        return torch.tensor([seed, offset], dtype=torch.int64)


# Valid arguments of each op, in schema order; a row replaces some of them.
VALID = {
    "philox_noise": lambda m: dict(like=m.t(N, K), noise_state=m.state(), distribution="gumbel"),
    "codebook_distance": lambda m: dict(z=m.t(N, D), weight=m.t(N, D), codebook=m.t(K, D)),
    "codebook_distance_backward": lambda m: dict(grad_distance=m.t(N, K), z=m.t(N, D), weight=m.t(N, D),
                                                 codebook=m.t(K, D)),
    "weighted_softmax": lambda m: dict(z=m.t(N, D), weight=m.t(N, 1), codebook=m.t(K, D),
                                       temperature=m.temperature()),
    "weighted_softmax_backward": lambda m: dict(grad_probs=m.t(N, K), grad_lse=m.t(N), probs=m.t(N, K),
                                                z=m.t(N, D), weight=None, codebook=m.t(K, D),
                                                temperature=m.temperature()),
    "gumbel_argmax": lambda m: dict(logits=m.t(N, K), temperature=m.temperature(), hard=True,
                                    noise_state=m.state(), noise=m.t(N, K)),
    "gumbel_argmax_backward": lambda m: dict(grad_sample=m.t(N, K), logits=m.t(N, K), temperature=m.temperature(),
                                             noise_state=m.state(), noise=m.t(N, K)),
    "aggregated_posterior_entropy": lambda m: dict(logits=m.t(N, K)),
    "aggregated_posterior_entropy_backward": lambda m: dict(grad_entropy=m.t(), grad_q_bar=m.t(K),
                                                            logits=m.t(N, K), q_bar=m.t(K)),
    "quantize": lambda m: dict(z=m.t(N, D), weight=m.t(N, D), codebook=m.t(K, D), temperature=m.temperature(),
                               sigma_z2=0.5, hard=True, training=True, noise_state=m.state(),
                               gumbel_noise=m.t(N, K), eps_noise=m.t(N, D), noise_scale=0.5),
    "quantize_backward": lambda m: dict(grad_z_out=m.t(N, D), grad_q_bar=m.t(K), grad_latent_reg=m.t(N),
                                        z=m.t(N, D), weight=None, codebook=m.t(K, D),
                                        indices=m.t(N, dtype=torch.int64), row_lse=m.t(N, 2), z_soft=m.t(0, D),
                                        temperature=m.temperature(), sigma_z2=0.5, hard=True, training=True,
                                        noise_state=m.state(), gumbel_noise=None, eps_noise=None, noise_scale=0.5),
}


def row(op, argument, why, **changes):
    """op called with VALID[op] updated by `changes` (each a function of Inputs) must fail naming `argument`."""
    return pytest.param(op, changes, argument, id=f"{op}-{argument}-{why}")


BAD_VALUES = [("zero", 0.0), ("negative", -1.0), ("nan", math.nan), ("inf", math.inf)]


def bad_sigma(op):
    return [row(op, "sigma_z2", label, sigma_z2=lambda m, v=value: v) for label, value in BAD_VALUES]


def bad_temperature(op):
    """A CPU temperature's value is checked on every device; its form always."""
    return [
        *[row(op, "temperature", label, temperature=lambda m, v=value: m.temperature(v)) for label, value in BAD_VALUES],
        row(op, "temperature", "1d", temperature=lambda m: torch.ones(1)),
        row(op, "temperature", "int", temperature=lambda m: torch.tensor(1)),
    ]


def bad_noise_state(op):
    return [
        row(op, "noise_state", "float", noise_state=lambda m: torch.zeros(2)),
        row(op, "noise_state", "three-elements", noise_state=lambda m: torch.zeros(3, dtype=torch.int64)),
    ]


def codebook_rows(op):
    """The (z, weight, codebook) checks shared by every op that takes them."""
    return [
        row(op, "z", "1d", z=lambda m: m.t(N)),
        row(op, "z", "3d", z=lambda m: m.t(N, D, 1)),
        row(op, "z", "int", z=lambda m: m.t(N, D, dtype=torch.int32)),
        row(op, "z", "d0", z=lambda m: m.t(N, 0), codebook=lambda m: m.t(K, 0), weight=lambda m: None),
        row(op, "codebook", "int", codebook=lambda m: m.t(K, D, dtype=torch.int64)),
        row(op, "codebook", "dtype-unlike-z", codebook=lambda m: m.t(K, D, dtype=torch.float64)),
        row(op, "codebook", "other-device", codebook=lambda m: m.t(K, D, device=m.other)),
        row(op, "codebook", "d-mismatch", codebook=lambda m: m.t(K, D + 1)),
        row(op, "codebook", "k0", codebook=lambda m: m.t(0, D)),
        row(op, "weight", "wrong-columns", weight=lambda m: m.t(N, 2)),
        row(op, "weight", "wrong-rows", weight=lambda m: m.t(N + 1, D)),
        row(op, "weight", "1d", weight=lambda m: m.t(N)),
        row(op, "weight", "dtype-unlike-z", weight=lambda m: m.t(N, D, dtype=torch.float16)),
        row(op, "weight", "int", weight=lambda m: m.t(N, D, dtype=torch.int32)),
        row(op, "weight", "other-device", weight=lambda m: m.t(N, D, device=m.other)),
    ]


def logits_rows(op):
    return [
        row(op, "logits", "1d", logits=lambda m: m.t(K)),
        row(op, "logits", "3d", logits=lambda m: m.t(N, K, 1)),
        row(op, "logits", "int", logits=lambda m: m.t(N, K, dtype=torch.int64)),
        row(op, "logits", "k0", logits=lambda m: m.t(N, 0)),
    ]


def noise_rows(op, name, cols):
    return [
        row(op, name, "wrong-columns", **{name: lambda m: m.t(N, cols + 1)}),
        row(op, name, "wrong-rows", **{name: lambda m: m.t(N - 1, cols)}),
        row(op, name, "1d", **{name: lambda m: m.t(N * cols)}),
        row(op, name, "int", **{name: lambda m: m.t(N, cols, dtype=torch.int32)}),
        row(op, name, "other-device", **{name: lambda m: m.t(N, cols, device=m.other)}),
    ]


TABLE = [
    row("philox_noise", "like", "1d", like=lambda m: m.t(K)),
    row("philox_noise", "like", "3d", like=lambda m: m.t(N, K, 1)),
    *bad_noise_state("philox_noise"),
    row("philox_noise", "distribution", "unknown", distribution=lambda m: "normal"),
    *codebook_rows("codebook_distance"),
    row("codebook_distance_backward", "codebook", "d-mismatch", codebook=lambda m: m.t(K, D + 1)),
    row("codebook_distance_backward", "grad_distance", "wrong-shape",
        grad_distance=lambda m: m.t(N, K + 1)),
    *codebook_rows("weighted_softmax"),
    *bad_temperature("weighted_softmax"),
    *bad_temperature("weighted_softmax_backward"),
    row("weighted_softmax_backward", "z", "3d", z=lambda m: m.t(N, D, 1)),
    row("weighted_softmax_backward", "grad_probs", "wrong-shape",
        grad_probs=lambda m: m.t(N, K + 1)),
    row("weighted_softmax_backward", "grad_lse", "wrong-shape", grad_lse=lambda m: m.t(N, 1)),
    row("weighted_softmax_backward", "probs", "wrong-shape", probs=lambda m: m.t(N + 1, K)),
    *logits_rows("gumbel_argmax"),
    *bad_temperature("gumbel_argmax"),
    *bad_noise_state("gumbel_argmax"),
    *noise_rows("gumbel_argmax", "noise", K),
    *logits_rows("gumbel_argmax_backward"),
    *bad_temperature("gumbel_argmax_backward"),
    row("gumbel_argmax_backward", "noise", "wrong-columns", noise=lambda m: m.t(N, K - 1)),
    row("gumbel_argmax_backward", "grad_sample", "wrong-shape",
        grad_sample=lambda m: m.t(N, K + 1)),
    *logits_rows("aggregated_posterior_entropy"),
    row("aggregated_posterior_entropy_backward", "logits", "k0", logits=lambda m: m.t(N, 0)),
    row("aggregated_posterior_entropy_backward", "grad_entropy", "not-scalar",
        grad_entropy=lambda m: m.t(1)),
    row("aggregated_posterior_entropy_backward", "grad_q_bar", "wrong-shape",
        grad_q_bar=lambda m: m.t(K + 1)),
    row("aggregated_posterior_entropy_backward", "q_bar", "wrong-shape",
        q_bar=lambda m: m.t(N, K)),
    *codebook_rows("quantize"),
    *bad_temperature("quantize"),
    *bad_sigma("quantize"),
    *bad_noise_state("quantize"),
    *noise_rows("quantize", "gumbel_noise", K),
    *noise_rows("quantize", "eps_noise", D),
    row("quantize_backward", "codebook", "d-mismatch", codebook=lambda m: m.t(K, D + 1)),
    *bad_sigma("quantize_backward"),
    *[row(op, "noise_scale", label, noise_scale=lambda m, v=value: v)
      for op in ("quantize", "quantize_backward") for label, value in (("negative", -1.0), ("nan", math.nan),
                                                                      ("inf", math.inf))],
    *bad_temperature("quantize_backward"),
    row("quantize_backward", "row_lse", "wrong-shape", row_lse=lambda m: m.t(N, 1)),
    row("quantize_backward", "row_lse", "float64", row_lse=lambda m: m.t(N, 2, dtype=torch.float64)),
    row("quantize_backward", "z_soft", "hard-needs-none", z_soft=lambda m: m.t(N, D)),
    row("quantize_backward", "indices", "int32", indices=lambda m: m.t(N, dtype=torch.int32)),
]


@pytest.mark.parametrize("device", DEVICES + ["meta"])
@pytest.mark.parametrize("op, changes, argument", TABLE)
def test_bad_input_names_the_argument(device, op, changes, argument):
    inputs = Inputs(device)
    args = VALID[op](inputs)
    args.update({name: make(inputs) for name, make in changes.items()})
    with pytest.raises(RuntimeError, match=f"^{argument} "):
        getattr(torch.ops.gmvq, op)(*args.values())


@pytest.mark.parametrize("device", DEVICES + ["meta"])
@pytest.mark.parametrize("op", sorted(VALID))
def test_valid_table_inputs_are_accepted(device, op):
    # The table's baseline arguments are valid: each failure above is caused by its row's change.
    getattr(torch.ops.gmvq, op)(*VALID[op](Inputs(device)).values())
