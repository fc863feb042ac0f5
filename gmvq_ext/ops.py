"""Typed wrappers, fake kernels and autograd wiring for ``torch.ops.gmvq``.

The schemas live in ``csrc/registration.cpp``; the kernels in ``csrc/cpu`` and
``csrc/cuda``; the math in ``docs/math.md``. Every forward op's gradient is
another custom op (``<op>_backward``), so backward passes are kernels of their
own that can be tested, benchmarked and traced by ``torch.compile``.

The ops take the temperature as a 0-dim float tensor and the noise key as an
int64 tensor ``[seed, offset]`` (each on the CPU or on the inputs' device), so
a training step is traced once and captured in a CUDA graph without a host
sync. The wrappers here also accept Python numbers for both.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import _checks as checks
from ._library import _C  # noqa: F401  (loads the kernels and the schemas)

__all__ = [
    "noise_state",
    "philox_noise",
    "codebook_distance",
    "weighted_softmax",
    "gumbel_argmax",
    "aggregated_posterior_entropy",
    "quantize",
]

_ops = torch.ops.gmvq
_acc = checks.accumulation_dtype

Temperature = Union[float, Tensor]
NoiseState = Union[Tensor, Sequence[int]]


# --------------------------------------------------------------------------
# Public wrappers (keyword-friendly; the ops themselves take positional args)
# --------------------------------------------------------------------------
def noise_state(seed: int, offset: int = 0, device=None) -> Tensor:
    """The ops' noise key: an int64 tensor [seed, offset] (both any int64)."""
    return torch.tensor([int(seed), int(offset)], dtype=torch.int64, device=device)


def _noise_state(value: NoiseState) -> Tensor:
    if isinstance(value, Tensor):
        return value
    seed, offset = value
    return noise_state(seed, offset)


def _temperature(value: Temperature, name: str = "temperature") -> Tensor:
    if isinstance(value, Tensor):
        return value
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise RuntimeError(f"{name} must be finite and > 0, got {value}")
    return torch.tensor(value, dtype=torch.float64)  # float64 keeps the Python number exactly


def philox_noise(like: Tensor, noise_state: NoiseState, distribution: str = "gumbel") -> Tensor:
    """The kernels' noise for a (R, C) tensor, float32: "uniform" in (0, 1),
    "gumbel" Gumbel(0, 1) or "gaussian" N(0, 1); element r * C + c.

    Bit-identical to ``reference.philox_noise``."""
    return _ops.philox_noise(like, _noise_state(noise_state), distribution)


def codebook_distance(z: Tensor, weight: Optional[Tensor], codebook: Tensor) -> Tensor:
    """d[n, k] = sum_d w[n, d] (z[n, d] - codebook[k, d])^2, shape (N, K)."""
    return _ops.codebook_distance(z, weight, codebook)


def weighted_softmax(z: Tensor, weight: Optional[Tensor], codebook: Tensor, temperature: Temperature = 1.0):
    """(softmax(-d / temperature) over K, its row log-sum-exp)."""
    return _ops.weighted_softmax(z, weight, codebook, _temperature(temperature))


def gumbel_argmax(logits: Tensor, temperature: Temperature = 1.0, hard: bool = True,
                  noise_state: NoiseState = (0, 0), noise: Optional[Tensor] = None):
    """(Gumbel-softmax sample, argmax indices); hard gives a straight-through one-hot."""
    return _ops.gumbel_argmax(logits, _temperature(temperature), hard, _noise_state(noise_state), noise)


def aggregated_posterior_entropy(logits: Tensor):
    """(H(q_bar), q_bar) with q_bar the mean over rows of softmax(logits)."""
    return _ops.aggregated_posterior_entropy(logits)


def quantize(z: Tensor, weight: Optional[Tensor], codebook: Tensor, temperature: Temperature = 1.0,
             sigma_z2: float = 0.5, hard: bool = True, training: bool = True, noise_state: NoiseState = (0, 0),
             gumbel_noise: Optional[Tensor] = None, eps_noise: Optional[Tensor] = None, noise_scale: float = 1.0):
    """The fused GM-VQ bottleneck: (z_out, indices, q_bar, latent_reg).

    See ``gmvq_ext.reference.quantize`` for the exact semantics; the op itself
    also returns the row statistics its backward reuses. ``noise_scale`` 0
    draws no Gaussian noise at all (z_out = z_q in training too)."""
    outputs = _ops.quantize(z, weight, codebook, _temperature(temperature), sigma_z2, hard, training,
                            _noise_state(noise_state), gumbel_noise, eps_noise, noise_scale)
    return outputs[:4]


# --------------------------------------------------------------------------
# Fake kernels: shapes, dtypes and the same checks as the C++ kernels
# --------------------------------------------------------------------------
def _like_or_absent(t: Optional[Tensor], ref: Tensor) -> Tensor:
    if t is None:
        return ref.new_empty((0,))
    return torch.empty_like(t, memory_format=torch.contiguous_format)


@torch.library.register_fake("gmvq::philox_noise")
def _(like, noise_state, distribution):
    torch._check(like.dim() == 2, lambda: f"like must be a 2-D tensor (R, C), got {like.dim()}-D")
    checks.check_noise_state(noise_state, like)
    checks.check_distribution(distribution)
    return like.new_empty(like.shape, dtype=torch.float32)


@torch.library.register_fake("gmvq::codebook_distance")
def _(z, weight, codebook):
    checks.check_codebook_inputs(z, weight, codebook)
    return z.new_empty((z.shape[0], codebook.shape[0]), dtype=_acc(z.dtype))


@torch.library.register_fake("gmvq::codebook_distance_backward")
def _(grad_distance, z, weight, codebook):
    checks.check_codebook_inputs(z, weight, codebook)
    checks.check_grad(grad_distance, "grad_distance", (z.shape[0], codebook.shape[0]), z)
    return (_like_or_absent(z, z), _like_or_absent(weight, z), _like_or_absent(codebook, z))


@torch.library.register_fake("gmvq::weighted_softmax")
def _(z, weight, codebook, temperature):
    checks.check_codebook_inputs(z, weight, codebook)
    checks.check_temperature(temperature, z)
    acc = _acc(z.dtype)
    return (z.new_empty((z.shape[0], codebook.shape[0]), dtype=acc), z.new_empty((z.shape[0],), dtype=acc))


@torch.library.register_fake("gmvq::weighted_softmax_backward")
def _(grad_probs, grad_lse, probs, z, weight, codebook, temperature):
    checks.check_codebook_inputs(z, weight, codebook)
    checks.check_temperature(temperature, z)
    n, k = z.shape[0], codebook.shape[0]
    checks.check_grad(grad_probs, "grad_probs", (n, k), z)
    checks.check_grad(grad_lse, "grad_lse", (n,), z)
    checks.check_grad(probs, "probs", (n, k), z)
    return (_like_or_absent(z, z), _like_or_absent(weight, z), _like_or_absent(codebook, z))


def _check_gumbel_inputs(logits, temperature, noise_state, noise):
    checks.check_logits(logits)
    checks.check_temperature(temperature, logits)
    checks.check_noise_state(noise_state, logits)
    checks.check_noise(noise, "noise", logits.shape[0], logits.shape[1], logits)


@torch.library.register_fake("gmvq::gumbel_argmax")
def _(logits, temperature, hard, noise_state, noise):
    _check_gumbel_inputs(logits, temperature, noise_state, noise)
    return (logits.new_empty(logits.shape, dtype=_acc(logits.dtype)),
            logits.new_empty((logits.shape[0],), dtype=torch.int64))


@torch.library.register_fake("gmvq::gumbel_argmax_backward")
def _(grad_sample, logits, temperature, noise_state, noise):
    _check_gumbel_inputs(logits, temperature, noise_state, noise)
    checks.check_grad(grad_sample, "grad_sample", tuple(logits.shape), logits)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("gmvq::aggregated_posterior_entropy")
def _(logits):
    checks.check_logits(logits)
    acc = _acc(logits.dtype)
    return logits.new_empty((), dtype=acc), logits.new_empty((logits.shape[1],), dtype=acc)


@torch.library.register_fake("gmvq::aggregated_posterior_entropy_backward")
def _(grad_entropy, grad_q_bar, logits, q_bar):
    checks.check_logits(logits)
    k = logits.shape[1]
    checks.check_grad(grad_entropy, "grad_entropy", (), logits)
    checks.check_grad(grad_q_bar, "grad_q_bar", (k,), logits)
    checks.check_grad(q_bar, "q_bar", (k,), logits)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("gmvq::quantize")
def _(z, weight, codebook, temperature, sigma_z2, hard, training, noise_state, gumbel_noise, eps_noise,
      noise_scale=1.0):
    checks.check_quantize_inputs(z, weight, codebook, temperature, sigma_z2, noise_state, gumbel_noise, eps_noise,
                                 noise_scale)
    acc = _acc(z.dtype)
    n, d = z.shape
    soft_rows = n if training and not hard else 0
    return (z.new_empty(z.shape), z.new_empty((n,), dtype=torch.int64),
            z.new_empty((codebook.shape[0],), dtype=acc), z.new_empty((n,), dtype=acc),
            z.new_empty((n, 2), dtype=acc), z.new_empty((soft_rows, d), dtype=acc))


@torch.library.register_fake("gmvq::quantize_backward")
def _(grad_z_out, grad_q_bar, grad_latent_reg, z, weight, codebook, indices, row_lse, z_soft, temperature,
      sigma_z2, hard, training, noise_state, gumbel_noise, eps_noise, noise_scale=1.0):
    checks.check_quantize_inputs(z, weight, codebook, temperature, sigma_z2, noise_state, gumbel_noise, eps_noise,
                                 noise_scale)
    checks.check_quantize_backward_state(grad_z_out, grad_q_bar, grad_latent_reg, indices, row_lse, z_soft, z,
                                         codebook, hard, training)
    return (_like_or_absent(z, z), _like_or_absent(weight, z), _like_or_absent(codebook, z),
            _like_or_absent(gumbel_noise, z), _like_or_absent(eps_noise, z))


# --------------------------------------------------------------------------
# Autograd: each forward op's backward is its *_backward op
# --------------------------------------------------------------------------
def _grad_or_zeros(grad: Optional[Tensor], like: Tensor) -> Tensor:
    # Autograd may hand None for an output that did not reach the loss.
    return torch.zeros_like(like) if grad is None else grad


def _present(grad: Tensor, source: Optional[Tensor]) -> Optional[Tensor]:
    return None if source is None else grad


def _refuse_temperature_gradient(temperature: Tensor) -> None:
    if temperature.requires_grad:
        raise RuntimeError("temperature must not require grad: the gmvq ops do not differentiate with respect to "
                           "it (detach it, or compute the logits' scale outside the op)")


def _setup_distance(ctx, inputs, output):
    z, weight, codebook = inputs
    ctx.save_for_backward(z, weight, codebook)


def _backward_distance(ctx, grad):
    z, weight, codebook = ctx.saved_tensors
    grad_z, grad_weight, grad_codebook = _ops.codebook_distance_backward(grad, z, weight, codebook)
    return grad_z, _present(grad_weight, weight), grad_codebook


torch.library.register_autograd("gmvq::codebook_distance", _backward_distance, setup_context=_setup_distance)


def _setup_softmax(ctx, inputs, output):
    z, weight, codebook, temperature = inputs
    _refuse_temperature_gradient(temperature)
    probs, _ = output
    ctx.save_for_backward(probs, z, weight, codebook, temperature)


def _backward_softmax(ctx, grad_probs, grad_lse):
    probs, z, weight, codebook, temperature = ctx.saved_tensors
    grad_probs = _grad_or_zeros(grad_probs, probs)
    grad_lse = _grad_or_zeros(grad_lse, probs[:, 0])
    grad_z, grad_weight, grad_codebook = _ops.weighted_softmax_backward(
        grad_probs, grad_lse, probs, z, weight, codebook, temperature)
    return grad_z, _present(grad_weight, weight), grad_codebook, None


torch.library.register_autograd("gmvq::weighted_softmax", _backward_softmax, setup_context=_setup_softmax)


def _setup_gumbel(ctx, inputs, output):
    logits, temperature, hard, noise_state, noise = inputs
    _refuse_temperature_gradient(temperature)
    _, indices = output
    ctx.mark_non_differentiable(indices)
    ctx.save_for_backward(logits, temperature, noise_state, noise)


def _backward_gumbel(ctx, grad_sample, grad_indices):
    logits, temperature, noise_state, noise = ctx.saved_tensors
    grad_sample = _grad_or_zeros(grad_sample, logits.to(_acc(logits.dtype)))
    grad_logits = _ops.gumbel_argmax_backward(grad_sample, logits, temperature, noise_state, noise)
    # The sample depends on logits + noise: both receive the same gradient.
    grad_noise = None if noise is None else grad_logits.to(noise.dtype)
    return grad_logits, None, None, None, grad_noise


torch.library.register_autograd("gmvq::gumbel_argmax", _backward_gumbel, setup_context=_setup_gumbel)


def _setup_entropy(ctx, inputs, output):
    (logits,) = inputs
    _, q_bar = output
    ctx.save_for_backward(logits, q_bar)


def _backward_entropy(ctx, grad_entropy, grad_q_bar):
    logits, q_bar = ctx.saved_tensors
    grad_entropy = _grad_or_zeros(grad_entropy, q_bar.sum())
    grad_q_bar = _grad_or_zeros(grad_q_bar, q_bar)
    return _ops.aggregated_posterior_entropy_backward(grad_entropy, grad_q_bar, logits, q_bar)


torch.library.register_autograd(
    "gmvq::aggregated_posterior_entropy", _backward_entropy, setup_context=_setup_entropy)


def _setup_quantize(ctx, inputs, output):
    z, weight, codebook, temperature, sigma_z2, hard, training, noise_state, gumbel_noise, eps_noise, noise_scale = \
        inputs
    _refuse_temperature_gradient(temperature)
    _, indices, _, _, row_lse, z_soft = output
    ctx.mark_non_differentiable(indices, row_lse, z_soft)  # backward state, not results to differentiate
    ctx.flags = (sigma_z2, hard, training, noise_scale)
    ctx.save_for_backward(z, weight, codebook, indices, row_lse, z_soft, temperature, noise_state, gumbel_noise,
                          eps_noise)


def _backward_quantize(ctx, grad_z_out, grad_indices, grad_q_bar, grad_latent_reg, grad_row_lse, grad_z_soft):
    z, weight, codebook, indices, row_lse, z_soft, temperature, noise_state, gumbel_noise, eps_noise = \
        ctx.saved_tensors
    sigma_z2, hard, training, noise_scale = ctx.flags
    acc = _acc(z.dtype)
    grad_z_out = _grad_or_zeros(grad_z_out, z)
    if grad_q_bar is None:
        grad_q_bar = z.new_zeros((codebook.shape[0],), dtype=acc)
    if grad_latent_reg is None:
        grad_latent_reg = z.new_zeros((z.shape[0],), dtype=acc)
    grads = _ops.quantize_backward(grad_z_out, grad_q_bar, grad_latent_reg, z, weight, codebook, indices, row_lse,
                                   z_soft, temperature, sigma_z2, hard, training, noise_state, gumbel_noise,
                                   eps_noise, noise_scale)
    grad_z, grad_weight, grad_codebook, grad_gumbel, grad_eps = grads
    return (grad_z, _present(grad_weight, weight), grad_codebook, None, None, None, None, None,
            _present(grad_gumbel, gumbel_noise), _present(grad_eps, eps_noise), None)


torch.library.register_autograd("gmvq::quantize", _backward_quantize, setup_context=_setup_quantize)
