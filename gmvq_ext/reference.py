"""GM-VQ in plain PyTorch: the specification every kernel is checked against.

Every function here has the signature and semantics of the ``torch.ops.gmvq``
op of the same name (docs/math.md), and its gradients are whatever autograd
makes of it. ``temperature`` may be a number or a 0-dim tensor and
``noise_state`` a tensor [seed, offset] or a (seed, offset) pair. It favours clarity over memory:
it materialises N x K tensors freely, which the fused kernels never do.

Noise comes from Philox4x32-10, written here in int64 tensor arithmetic and
bit-identical to ``csrc/include/gmvq/philox.h`` (see that file for the
counter layout). Its float transforms are spelled operation by operation in
float32 so that they round exactly as the C++ and CUDA code does.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "philox4x32_10",
    "random_words",
    "uniform_from_bits",
    "gumbel_from_words",
    "gaussian_from_words",
    "philox_noise",
    "uniform_noise",
    "gumbel_noise",
    "gaussian_noise",
    "codebook_distance",
    "weighted_softmax",
    "gumbel_argmax",
    "aggregated_posterior_entropy",
    "quantize",
]

GUMBEL_STREAM = 0
GAUSSIAN_STREAM = 1
# Smallest probability whose log is taken: 0 log 0 counts as 0.
LOG_CLAMP = 1e-30

_MASK32 = 0xFFFFFFFF
_PHILOX_MUL = (0xD2511F53, 0xCD9E8D57)
_PHILOX_WEYL = (0x9E3779B9, 0xBB67AE85)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Logits, statistics and entropies: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------
# Philox4x32-10 on int64 tensors holding uint32 values
# --------------------------------------------------------------------------
def _mulhilo32(multiplier: int, x: Tensor) -> tuple[Tensor, Tensor]:
    """High and low 32-bit halves of multiplier * x without leaving int64.

    x is split in 16-bit halves so that no partial product reaches 2^63."""
    partial_low = (x & 0xFFFF) * multiplier  # < 2^48
    partial_high = (x >> 16) * multiplier  # < 2^48
    middle = partial_low + ((partial_high & 0xFFFF) << 16)  # < 2^49
    low = middle & _MASK32
    high = (partial_high >> 16) + (middle >> 32)
    return high, low


def philox4x32_10(counter: tuple[Tensor, Tensor, Tensor, Tensor], key: tuple[int, int]):
    """Philox4x32-10 of int64 counter words (each in [0, 2^32)); returns 4 words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_PHILOX_MUL[0], c0)
        hi1, lo1 = _mulhilo32(_PHILOX_MUL[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _PHILOX_WEYL[0]) & _MASK32
        k1 = (k1 + _PHILOX_WEYL[1]) & _MASK32
    return c0, c1, c2, c3


def random_words(seed, offset, stream: int, numel: int, device=None) -> Tensor:
    """The first ``numel`` 32-bit words of a stream, as int64 in [0, 2^32).

    seed and offset are Python ints or 0-d int64 tensors (tensors let a
    compiled model follow changing values without recompiling)."""
    if isinstance(seed, Tensor):
        seed = seed.to(device=device, dtype=torch.int64)
    if isinstance(offset, Tensor):
        offset = offset.to(device=device, dtype=torch.int64)
    blocks = torch.arange((numel + 3) // 4, dtype=torch.int64, device=device)
    blocks = blocks + (stream << 62)
    zeros = torch.zeros_like(blocks)
    counter = (
        blocks & _MASK32,
        blocks >> 32,
        zeros + (offset & _MASK32),
        zeros + ((offset >> 32) & _MASK32),
    )
    words = philox4x32_10(counter, (seed & _MASK32, (seed >> 32) & _MASK32))
    return torch.stack(words, dim=1).reshape(-1)[:numel]


# --------------------------------------------------------------------------
# Bits to noise, float32, one correctly rounded operation per step
# --------------------------------------------------------------------------
def uniform_from_bits(words: Tensor) -> Tensor:
    return ((words >> 9).to(torch.float32) + 0.5) * 2.0**-23


# Constants are the exact float32 values the C++ header spells in hex.
_LOG_POLY = [float.fromhex(h) for h in (
    "0x1.204376p-4", "-0x1.d7a370p-4", "0x1.de4a34p-4", "-0x1.fcba9ep-4", "0x1.23d37ep-3",
    "-0x1.555ca0p-3", "0x1.999d58p-3", "-0x1.fffff8p-3", "0x1.555554p-2")]
_LOG_Q1 = float.fromhex("-0x1.bd0106p-13")
_LOG_Q2 = float.fromhex("0x1.63p-1")
_SQRT_HALF = float.fromhex("0x1.6a09e6p-1")
_SQRT_TWO = float.fromhex("0x1.6a09e6p+0")
_ERFINV_CENTRAL = [float.fromhex(h) for h in (
    "0x1.e2cb10p-26", "0x1.70966cp-22", "-0x1.d8e6aep-19", "-0x1.26b582p-18", "0x1.ca65b6p-13",
    "-0x1.48a810p-10", "-0x1.11c9dep-8", "0x1.f91ec6p-3", "0x1.805c5ep+0")]
_ERFINV_TAIL = [float.fromhex(h) for h in (
    "-0x1.a3e136p-13", "0x1.a76ad6p-14", "0x1.61b8e4p-10", "-0x1.e17bcep-9", "0x1.7824f6p-8",
    "-0x1.f38baep-8", "0x1.354afcp-7", "0x1.006db6p+0", "0x1.6a9efcp+1")]


def _horner(coefficients: list[float], x: Tensor) -> Tensor:
    y = torch.full_like(x, coefficients[0])
    for c in coefficients[1:]:
        y = y * x + c
    return y


def log_canonical(x: Tensor) -> Tensor:
    """Natural log of positive normal float32 values (Cephes logf), as in philox.h."""
    bits = x.view(torch.int32)
    exponent = (bits >> 23) - 126
    mantissa = ((bits & 0x007FFFFF) | 0x3F000000).view(torch.float32)
    small = mantissa < _SQRT_HALF
    exponent = exponent - small.to(torch.int32)
    t = torch.where(small, (mantissa + mantissa) + -1.0, mantissa + -1.0)
    e = exponent.to(torch.float32)
    t2 = t * t
    y = (_horner(_LOG_POLY, t) * t) * t2
    y = y + e * _LOG_Q1
    y = y + t2 * -0.5
    return (t + y) + e * _LOG_Q2


def erfinv_canonical(x: Tensor) -> Tensor:
    """erfinv on (-1, 1), Giles (2010) single precision, as in philox.h."""
    w = -log_canonical((1.0 + -x) * (1.0 + x))
    central = _horner(_ERFINV_CENTRAL, w + -2.5)
    # torch.sqrt in float32 is not always correctly rounded on CPU (vectorised
    # paths); float64 sqrt rounded to float32 is, like the kernels' sqrt.
    tail = _horner(_ERFINV_TAIL, torch.sqrt(w.double()).float() + -3.0)
    return torch.where(w < 5.0, central, tail) * x


def gumbel_from_words(words: Tensor) -> Tensor:
    """Gumbel(0, 1) from 32-bit words: -log(-log(u)), float32."""
    return -log_canonical(-log_canonical(uniform_from_bits(words)))


def gaussian_from_words(words: Tensor) -> Tensor:
    """N(0, 1) from 32-bit words: sqrt(2) erfinv(2u - 1), float32."""
    u = uniform_from_bits(words)
    return erfinv_canonical((u + u) + -1.0) * _SQRT_TWO


def split_noise_state(noise_state, device=None):
    """(seed, offset) from a tensor [seed, offset] (as 0-d int64 tensors on device) or a pair of ints."""
    if isinstance(noise_state, Tensor):
        seed, offset = noise_state.reshape(2).to(device=device, dtype=torch.int64).unbind()
        return seed, offset
    seed, offset = noise_state
    return int(seed), int(offset)


def uniform_noise(noise_state, n: int, c: int, device=None) -> Tensor:
    """U(0, 1) u[n, c] from the words of stream 0, element n*C + c; float32 (N, C)."""
    seed, offset = split_noise_state(noise_state, device)
    return uniform_from_bits(random_words(seed, offset, GUMBEL_STREAM, n * c, device)).reshape(n, c)


def gumbel_noise(noise_state, n: int, k: int, device=None) -> Tensor:
    """Gumbel(0, 1) noise g[n, k] from stream 0, element n*K + k; float32 (N, K)."""
    seed, offset = split_noise_state(noise_state, device)
    return gumbel_from_words(random_words(seed, offset, GUMBEL_STREAM, n * k, device)).reshape(n, k)


def gaussian_noise(noise_state, n: int, d: int, device=None) -> Tensor:
    """N(0, 1) noise eps[n, d] from stream 1, element n*D + d; float32 (N, D)."""
    seed, offset = split_noise_state(noise_state, device)
    return gaussian_from_words(random_words(seed, offset, GAUSSIAN_STREAM, n * d, device)).reshape(n, d)


_draw_gumbel = gumbel_noise  # quantize's gumbel_noise argument shadows the name
_NOISE = {"uniform": uniform_noise, "gumbel": gumbel_noise, "gaussian": gaussian_noise}


def philox_noise(like: Tensor, noise_state, distribution: str = "gumbel") -> Tensor:
    """The ops' noise for a (R, C) tensor: "uniform", "gumbel" or "gaussian", float32."""
    return _NOISE[distribution](noise_state, like.shape[0], like.shape[1], like.device)


# --------------------------------------------------------------------------
# The five ops
# --------------------------------------------------------------------------
def _broadcast_weight(weight: Optional[Tensor], z: Tensor, dtype: torch.dtype) -> Optional[Tensor]:
    return None if weight is None else weight.to(dtype).expand(z.shape)


def codebook_distance(z: Tensor, weight: Optional[Tensor], codebook: Tensor) -> Tensor:
    """d[n, k] = sum_d w[n, d] (z[n, d] - codebook[k, d])^2, (N, K).

    Computed in the GEMM form of docs/math.md#codebook_distance, clamped at 0 in value only:
    the gradient is that of the unclamped formula (the clamp only removes
    rounding below zero)."""
    acc = accumulation_dtype(z.dtype)
    z_acc, e_acc = z.to(acc), codebook.to(acc)
    w = _broadcast_weight(weight, z_acc, acc)
    if w is None:
        row_term = (z_acc * z_acc).sum(1, keepdim=True)
        cross = z_acc @ e_acc.T
        code_term = (e_acc * e_acc).sum(1)[None, :]
    else:
        wz = w * z_acc
        row_term = (wz * z_acc).sum(1, keepdim=True)
        cross = wz @ e_acc.T
        code_term = w @ (e_acc * e_acc).T
    distance = row_term - 2.0 * cross + code_term
    return distance + (distance.clamp_min(0) - distance).detach()


def weighted_softmax(z: Tensor, weight: Optional[Tensor], codebook: Tensor, temperature):
    """probs = softmax(-d / temperature) over K and its row log-sum-exp."""
    logits = -codebook_distance(z, weight, codebook) / temperature
    lse = torch.logsumexp(logits, dim=1)
    return torch.exp(logits - lse[:, None]), lse


def gumbel_argmax(logits: Tensor, temperature, hard: bool, noise_state, noise: Optional[Tensor] = None):
    """Gumbel-softmax sample (soft, or one-hot with the soft gradient) and argmax."""
    acc = accumulation_dtype(logits.dtype)
    n, k = logits.shape
    g = noise if noise is not None else gumbel_noise(noise_state, n, k, logits.device)
    perturbed = logits.to(acc) + g.to(acc)
    soft = torch.softmax(perturbed / temperature, dim=1)
    indices = perturbed.argmax(dim=1) if n > 0 else torch.empty(0, dtype=torch.long, device=logits.device)
    if not hard:
        return soft, indices
    one_hot = F.one_hot(indices, k).to(acc)
    # (soft - soft.detach()) is exactly 0, so the value is exactly one-hot.
    return one_hot + (soft - soft.detach()), indices


def aggregated_posterior_entropy(logits: Tensor):
    """q_bar = mean_n softmax(logits)[n] and H(q_bar) = -sum q_bar log q_bar.

    With N = 0, q_bar is 0 and so is the entropy."""
    acc = accumulation_dtype(logits.dtype)
    posterior = torch.softmax(logits.to(acc), dim=1)
    q_bar = posterior.sum(0) / max(logits.shape[0], 1)
    entropy = -(q_bar * torch.log(q_bar.clamp_min(LOG_CLAMP))).sum()
    return entropy, q_bar


def quantize(z: Tensor, weight: Optional[Tensor], codebook: Tensor, temperature, sigma_z2: float, hard: bool,
             training: bool, noise_state, gumbel_noise: Optional[Tensor] = None,
             eps_noise: Optional[Tensor] = None, noise_scale: float = 1.0):
    """The whole GM-VQ bottleneck: (z_out, indices, q_bar, latent_reg, row_lse, z_soft).

    training: Gumbel-softmax code c (hard: straight-through one-hot), z_q = c @ E,
              z_out = z_q + s * eps with s = noise_scale ||z - z_q|| / sqrt(2 sigma_z2 D)
              (noise_scale 0: z_out = z_q, no eps drawn or used).
    eval:     argmax code, z_out = z_q = E[idx], no noise.
    q_bar is the mean of softmax(logits) (no temperature, no noise);
    latent_reg[n] = ||z[n] - z_q[n]||^2 / (2 sigma_z2).
    The backward's state: row_lse[n] = (logsumexp_k l, logsumexp_k (l + g) / T)
    (evaluation repeats the first), z_soft = y @ E in soft training, else (0, D)."""
    acc = accumulation_dtype(z.dtype)
    n, d = z.shape
    z_acc, e_acc = z.to(acc), codebook.to(acc)
    logits = -codebook_distance(z, weight, codebook)
    q_bar = torch.softmax(logits, dim=1).sum(0) / max(n, 1)
    lse_logits = torch.logsumexp(logits, dim=1)
    z_soft = z_acc.new_empty((0, d))
    if training:
        g = gumbel_noise if gumbel_noise is not None else _draw_gumbel(noise_state, n, codebook.shape[0], z.device)
        code, indices = gumbel_argmax(logits, temperature, hard, noise_state, g)
        z_q = code @ e_acc
        if not hard:
            z_soft = z_q
        lse_sample = torch.logsumexp((logits + g.to(acc)) / temperature, dim=1)
        if noise_scale > 0:
            eps = eps_noise if eps_noise is not None else gaussian_noise(noise_state, n, d, z.device)
            c0 = math.sqrt(2.0 * sigma_z2 * d) / noise_scale
            z_out = z_q + torch.linalg.vector_norm(z_acc - z_q, dim=1, keepdim=True) / c0 * eps.to(acc)
        else:
            z_out = z_q
    else:
        indices = logits.argmax(dim=1) if n > 0 else torch.empty(0, dtype=torch.long, device=z.device)
        z_q = e_acc[indices]
        z_out = z_q
        lse_sample = lse_logits
    latent_reg = (z_acc - z_q).pow(2).sum(1) / (2.0 * sigma_z2)
    row_lse = torch.stack([lse_logits, lse_sample], dim=1)
    return z_out.to(z.dtype), indices, q_bar, latent_reg, row_lse, z_soft
