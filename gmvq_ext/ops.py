"""Typed wrappers, fake kernels and autograd wiring for ``torch.ops.gmvq``.

The schemas live in ``csrc/registration.cpp``; the kernels in ``csrc/cpu`` and
``csrc/cuda``. Every forward op's gradient is another custom op
(``<op>_backward``), so backward passes are kernels of their own that can be
tested, benchmarked and traced by ``torch.compile`` like any other op.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _checks as checks
from ._library import _C  # noqa: F401  (loads the kernels and the schemas)

__all__ = [
    "philox_noise",
    "codebook_distance",
    "weighted_softmax",
    "gumbel_argmax",
    "aggregated_posterior_entropy",
    "quantize",
]

_ops = torch.ops.gmvq
_acc = checks.accumulation_dtype


# --------------------------------------------------------------------------
# Public wrappers (keyword-friendly; the ops themselves take positional args)
# --------------------------------------------------------------------------
def philox_noise(like: Tensor, seed: int, offset: int = 0, gaussian: bool = False) -> Tensor:
    """The kernels' noise for a (R, C) tensor: Gumbel(0, 1), or N(0, 1) if gaussian.

    Bit-identical to ``reference.gumbel_noise`` / ``reference.gaussian_noise``."""
    return _ops.philox_noise(like, seed, offset, gaussian)


def codebook_distance(z: Tensor, weight: Optional[Tensor], codebook: Tensor) -> Tensor:
    """d[n, k] = sum_d w[n, d] (z[n, d] - codebook[k, d])^2, shape (N, K)."""
    return _ops.codebook_distance(z, weight, codebook)


def weighted_softmax(z: Tensor, weight: Optional[Tensor], codebook: Tensor, temperature: float):
    """(softmax(-d / temperature) over K, its row log-sum-exp)."""
    return _ops.weighted_softmax(z, weight, codebook, temperature)


def gumbel_argmax(logits: Tensor, temperature: float, hard: bool = True, seed: int = 0,
                  offset: int = 0, noise: Optional[Tensor] = None):
    """(Gumbel-softmax sample, argmax indices); hard gives a straight-through one-hot."""
    return _ops.gumbel_argmax(logits, temperature, hard, seed, offset, noise)


def aggregated_posterior_entropy(logits: Tensor):
    """(H(q_bar), q_bar) with q_bar the mean over rows of softmax(logits)."""
    return _ops.aggregated_posterior_entropy(logits)


def quantize(z: Tensor, weight: Optional[Tensor], codebook: Tensor, temperature: float = 1.0,
             sigma_z2: float = 0.5, hard: bool = True, training: bool = True, seed: int = 0,
             offset: int = 0, gumbel_noise: Optional[Tensor] = None,
             eps_noise: Optional[Tensor] = None):
    """The fused GM-VQ bottleneck: (z_out, indices, q_bar, latent_reg).

    See ``gmvq_ext.reference.quantize`` for the exact semantics."""
    return _ops.quantize(z, weight, codebook, temperature, sigma_z2, hard, training, seed, offset,
                         gumbel_noise, eps_noise)


# --------------------------------------------------------------------------
# Fake kernels: shapes, dtypes and the same checks as the C++ kernels
# --------------------------------------------------------------------------
def _like_or_absent(t: Optional[Tensor], ref: Tensor) -> Tensor:
    if t is None:
        return ref.new_empty((0,))
    return torch.empty_like(t, memory_format=torch.contiguous_format)


@torch.library.register_fake("gmvq::philox_noise")
def _(like, seed, offset, gaussian):
    torch._check(like.dim() == 2, lambda: f"like must be a 2-D tensor (R, C), got {like.dim()}-D")
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
    checks.check_positive_finite(temperature, "temperature")
    acc = _acc(z.dtype)
    return (z.new_empty((z.shape[0], codebook.shape[0]), dtype=acc), z.new_empty((z.shape[0],), dtype=acc))


@torch.library.register_fake("gmvq::weighted_softmax_backward")
def _(grad_probs, grad_lse, probs, z, weight, codebook, temperature):
    checks.check_codebook_inputs(z, weight, codebook)
    n, k = z.shape[0], codebook.shape[0]
    checks.check_grad(grad_probs, "grad_probs", (n, k), z)
    checks.check_grad(grad_lse, "grad_lse", (n,), z)
    checks.check_grad(probs, "probs", (n, k), z)
    checks.check_positive_finite(temperature, "temperature")
    return (_like_or_absent(z, z), _like_or_absent(weight, z), _like_or_absent(codebook, z))


@torch.library.register_fake("gmvq::gumbel_argmax")
def _(logits, temperature, hard, seed, offset, noise):
    checks.check_logits(logits)
    checks.check_positive_finite(temperature, "temperature")
    checks.check_noise(noise, "noise", logits.shape[0], logits.shape[1], logits)
    return (logits.new_empty(logits.shape, dtype=_acc(logits.dtype)),
            logits.new_empty((logits.shape[0],), dtype=torch.int64))


@torch.library.register_fake("gmvq::gumbel_argmax_backward")
def _(grad_sample, logits, temperature, seed, offset, noise):
    checks.check_logits(logits)
    checks.check_grad(grad_sample, "grad_sample", tuple(logits.shape), logits)
    checks.check_positive_finite(temperature, "temperature")
    checks.check_noise(noise, "noise", logits.shape[0], logits.shape[1], logits)
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


def _check_quantize_inputs(z, weight, codebook, temperature, sigma_z2, gumbel_noise, eps_noise):
    checks.check_codebook_inputs(z, weight, codebook)
    checks.check_positive_finite(temperature, "temperature")
    checks.check_positive_finite(sigma_z2, "sigma_z2")
    checks.check_noise(gumbel_noise, "gumbel_noise", z.shape[0], codebook.shape[0], z)
    checks.check_noise(eps_noise, "eps_noise", z.shape[0], z.shape[1], z)


@torch.library.register_fake("gmvq::quantize")
def _(z, weight, codebook, temperature, sigma_z2, hard, training, seed, offset, gumbel_noise, eps_noise):
    _check_quantize_inputs(z, weight, codebook, temperature, sigma_z2, gumbel_noise, eps_noise)
    acc = _acc(z.dtype)
    n = z.shape[0]
    return (z.new_empty(z.shape), z.new_empty((n,), dtype=torch.int64),
            z.new_empty((codebook.shape[0],), dtype=acc), z.new_empty((n,), dtype=acc))


@torch.library.register_fake("gmvq::quantize_backward")
def _(grad_z_out, grad_q_bar, grad_latent_reg, z, weight, codebook, indices, temperature, sigma_z2,
      hard, training, seed, offset, gumbel_noise, eps_noise):
    _check_quantize_inputs(z, weight, codebook, temperature, sigma_z2, gumbel_noise, eps_noise)
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
    probs, _ = output
    ctx.temperature = temperature
    ctx.save_for_backward(probs, z, weight, codebook)


def _backward_softmax(ctx, grad_probs, grad_lse):
    probs, z, weight, codebook = ctx.saved_tensors
    grad_probs = _grad_or_zeros(grad_probs, probs)
    grad_lse = _grad_or_zeros(grad_lse, probs[:, 0])
    grad_z, grad_weight, grad_codebook = _ops.weighted_softmax_backward(
        grad_probs, grad_lse, probs, z, weight, codebook, ctx.temperature)
    return grad_z, _present(grad_weight, weight), grad_codebook, None


torch.library.register_autograd("gmvq::weighted_softmax", _backward_softmax, setup_context=_setup_softmax)


def _setup_gumbel(ctx, inputs, output):
    logits, temperature, hard, seed, offset, noise = inputs
    ctx.temperature, ctx.seed, ctx.offset = temperature, seed, offset
    ctx.save_for_backward(logits, noise)


def _backward_gumbel(ctx, grad_sample, grad_indices):
    logits, noise = ctx.saved_tensors
    grad_sample = _grad_or_zeros(grad_sample, logits.to(_acc(logits.dtype)))
    grad_logits = _ops.gumbel_argmax_backward(grad_sample, logits, ctx.temperature, ctx.seed, ctx.offset, noise)
    # The sample depends on logits + noise: both receive the same gradient.
    grad_noise = None if noise is None else grad_logits.to(noise.dtype)
    return grad_logits, None, None, None, None, grad_noise


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
    z, weight, codebook, temperature, sigma_z2, hard, training, seed, offset, gumbel_noise, eps_noise = inputs
    _, indices, _, _ = output
    ctx.scalars = (temperature, sigma_z2, hard, training, seed, offset)
    ctx.save_for_backward(z, weight, codebook, indices, gumbel_noise, eps_noise)


def _backward_quantize(ctx, grad_z_out, grad_indices, grad_q_bar, grad_latent_reg):
    z, weight, codebook, indices, gumbel_noise, eps_noise = ctx.saved_tensors
    acc = _acc(z.dtype)
    grad_z_out = _grad_or_zeros(grad_z_out, z)
    if grad_q_bar is None:
        grad_q_bar = z.new_zeros((codebook.shape[0],), dtype=acc)
    if grad_latent_reg is None:
        grad_latent_reg = z.new_zeros((z.shape[0],), dtype=acc)
    grads = _ops.quantize_backward(grad_z_out, grad_q_bar, grad_latent_reg, z, weight, codebook, indices,
                                   *ctx.scalars, gumbel_noise, eps_noise)
    grad_z, grad_weight, grad_codebook, grad_gumbel, grad_eps = grads
    return (grad_z, _present(grad_weight, weight), grad_codebook, None, None, None, None, None, None,
            _present(grad_gumbel, gumbel_noise), _present(grad_eps, eps_noise))


torch.library.register_autograd("gmvq::quantize", _backward_quantize, setup_context=_setup_quantize)
