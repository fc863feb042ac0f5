"""philox_noise: the kernels' Philox4x32-10 uniform / Gumbel / Gaussian noise.

Bit-identical to reference.philox_noise on every device, the
generator itself checked on the Random123 known-answer vectors, and the
noise checked against its distribution."""

import math
import subprocess
import sys

import pytest
import scipy.stats
import torch

from gmvq_ext import ops, reference
from helpers import CPU_VECTOR_PATHS, DEVICES, PACKAGE_PARENT, requires_cuda, subprocess_env

# Known answers of Philox4x32-10 (Random123's kat_vectors): counter, key -> output.
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
]

SEEDS_AND_OFFSETS = [
    (0, 0),
    (1, 3),
    (-7, 11),  # negative seed: its two's-complement words
    (2**33 + 5, 2**32 + 1),  # both words of seed and offset in use
    (-(2**40), 2**45 + 17),
    (2**63 - 1, 2**63 - 1),
]
SHAPES = [(5, 7), (1, 1), (3, 13), (17, 3), (0, 4), (4, 0)]  # C not a multiple of 4 on purpose
# Significance of the distribution tests; the seeds are fixed, so they cannot flake.
SIGNIFICANCE = 1e-3


DISTRIBUTIONS = ["uniform", "gumbel", "gaussian"]


def reference_noise(seed, offset, shape, distribution):
    return reference.philox_noise(torch.empty(shape), (seed, offset), distribution)


def assert_same_bits(actual, expected):
    assert actual.dtype == expected.dtype == torch.float32
    assert actual.shape == expected.shape
    assert torch.equal(actual.cpu().view(torch.int32), expected.cpu().view(torch.int32))


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS, ids=["zeros", "ones"])
def test_reference_philox_known_answers(counter, key, expected):
    words = reference.philox4x32_10(tuple(torch.tensor([c], dtype=torch.int64) for c in counter), key)
    assert [int(w) for w in words] == list(expected)


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_noise_comes_from_the_known_answer_block(device):
    # Seed 0, offset 0, elements 0..3 of the Gumbel stream are counter 0 under key 0.
    words = torch.tensor(KNOWN_ANSWERS[0][2], dtype=torch.int64)
    u = reference.uniform_from_bits(words)
    expected = -reference.log_canonical(-reference.log_canonical(u))
    actual = ops.philox_noise(torch.empty(1, 4, device=device), (0, 0), "gumbel")
    assert_same_bits(actual, expected[None, :])
    assert_same_bits(ops.philox_noise(torch.empty(1, 4, device=device), (0, 0), "uniform"), u[None, :])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("seed, offset", SEEDS_AND_OFFSETS)
def test_noise_is_bit_identical_to_reference(device, distribution, seed, offset):
    like = torch.empty(9, 11, device=device)
    assert_same_bits(ops.philox_noise(like, (seed, offset), distribution),
                     reference_noise(seed, offset, (9, 11), distribution))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_noise_shapes(device, distribution, shape):
    like = torch.empty(shape, device=device)
    assert_same_bits(ops.philox_noise(like, (123, 456), distribution), reference_noise(123, 456, shape, distribution))


@pytest.mark.parametrize("device", DEVICES)
def test_noise_state_may_live_on_the_device(device):
    # A device-resident key (what a compiled or CUDA-graph step passes) gives the same bits.
    like = torch.empty(5, 9, device=device)
    for distribution in DISTRIBUTIONS:
        on_device = ops.philox_noise(like, ops.noise_state(31, 2**41 + 3, device=device), distribution)
        assert_same_bits(on_device, ops.philox_noise(like, (31, 2**41 + 3), distribution))


@requires_cuda
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (37, 19), (129, 1023)], ids=str)
@pytest.mark.parametrize("state_device", ["cpu", "cuda"])
def test_cuda_noise_is_bitwise_the_cpu_ops_noise(distribution, shape, state_device):
    # The CUDA op against the package's CPU op (not only the reference), with the
    # key on the host or on the device; both words of seed and offset in use.
    state = torch.tensor([2**40 + 17, 2**33 + 5], device=state_device)
    cuda = torch.ops.gmvq.philox_noise(torch.empty(shape, device="cuda"), state, distribution)
    cpu = torch.ops.gmvq.philox_noise(torch.empty(shape), state.cpu(), distribution)
    assert cuda.device.type == "cuda"
    assert_same_bits(cuda, cpu)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("distribution", ["gumbel", "gaussian"])
def test_noise_tails_are_bit_identical_to_reference(device, distribution):
    # 2^20 draws reach |eps| > 4.5 and u within 2^-20 of 0 or 1, where the
    # transforms' rarely taken branches (erfinv's tail, log near 1) run.
    like = torch.empty(1024, 1024, device=device)
    noise = ops.philox_noise(like, (7, 3), distribution)
    assert noise.abs().max() > (4.5 if distribution == "gaussian" else 10.0)
    assert_same_bits(noise, reference_noise(7, 3, (1024, 1024), distribution))


@pytest.mark.parametrize("device", DEVICES)
def test_noise_is_float32_whatever_like_is(device):
    # Only like's shape and device matter: dtype and layout are ignored.
    like = torch.zeros(6, 10, dtype=torch.float16, device=device).t()
    noise = ops.philox_noise(like, (5, 0), "gumbel")
    assert noise.dtype == torch.float32 and noise.shape == (10, 6) and noise.is_contiguous()
    assert noise.device.type == torch.device(device).type
    assert_same_bits(noise, reference.gumbel_noise((5, 0), 10, 6))


@pytest.mark.parametrize("device", DEVICES)
def test_element_index_is_row_major(device):
    # Element r * C + c: the flat stream does not depend on how it is cut into rows.
    flat = ops.philox_noise(torch.empty(1, 60, device=device), (9, 1)).reshape(-1)
    for shape in [(6, 10), (20, 3), (60, 1)]:
        assert_same_bits(ops.philox_noise(torch.empty(shape, device=device), (9, 1)).reshape(-1), flat)


@pytest.mark.parametrize("device", DEVICES)
def test_seed_offset_and_stream_change_the_noise(device):
    like = torch.empty(8, 8, device=device)
    base = ops.philox_noise(like, (1, 0))
    assert torch.equal(base, ops.philox_noise(like, (1, 0)))
    for other in [ops.philox_noise(like, (2, 0)), ops.philox_noise(like, (1, 1)),
                  ops.philox_noise(like, (1, 0), "gaussian"), ops.philox_noise(like, (1 + 2**32, 0)),
                  ops.philox_noise(like, (1, 2**32))]:
        # Independent draws: no element in common (a coincidence has probability ~64 / 2^23).
        assert not torch.eq(base, other).any()


# Rows long enough for the vector paths, with starts off the 4-word Philox blocks
# and lengths that end in a partial group of 8 blocks.
PORTABLE_CASES = [((3, 1023), 5, 7), ((2, 4099), 2**33 + 5, 2**32 + 1), ((1024, 1024), 7, 3)]
PORTABLE_SCRIPT = """
import sys, torch
from gmvq_ext import ops
for shape, seed, offset in eval(sys.argv[1]):
    for distribution in ("uniform", "gumbel", "gaussian"):
        noise = ops.philox_noise(torch.empty(shape), (seed, offset), distribution)
        sys.stdout.buffer.write(noise.view(torch.int32).numpy().tobytes())
"""


def test_cpu_noise_paths_give_the_same_bits():
    # The CPU noise has AVX-512 and AVX2 intrinsics paths and a portable,
    # auto-vectorised one; GMVQ_CPU_NOISE_PATH picks one. Every path this
    # machine runs must give these (reference-checked) bits.
    def run(path):
        done = subprocess.run([sys.executable, "-c", PORTABLE_SCRIPT, repr(PORTABLE_CASES)], capture_output=True,
                              cwd=PACKAGE_PARENT, env=subprocess_env(GMVQ_CPU_NOISE_PATH=path), check=True,
                              timeout=120)
        return done.stdout

    expected = b"".join(
        ops.philox_noise(torch.empty(shape), (seed, offset), distribution).view(torch.int32).numpy().tobytes()
        for shape, seed, offset in PORTABLE_CASES for distribution in DISTRIBUTIONS)
    for path in CPU_VECTOR_PATHS:
        assert run(path) == expected, path
    for shape, seed, offset in PORTABLE_CASES[:2]:
        for distribution in DISTRIBUTIONS:
            assert_same_bits(ops.philox_noise(torch.empty(shape), (seed, offset), distribution),
                             reference_noise(seed, offset, shape, distribution))


def test_an_unsupported_cpu_path_is_refused():
    done = subprocess.run([sys.executable, "-c", PORTABLE_SCRIPT, repr(PORTABLE_CASES[:1])], capture_output=True,
                          text=True, cwd=PACKAGE_PARENT, env=subprocess_env(GMVQ_CPU_NOISE_PATH="sse9"), timeout=120)
    assert done.returncode != 0 and "GMVQ_CPU_NOISE_PATH=sse9: this CPU's noise paths are portable" in done.stderr


def test_uniform_distribution():
    u = ops.philox_noise(torch.empty(400, 500), (2024, 7), "uniform").double().reshape(-1)
    assert (u > 0).all() and (u < 1).all()
    assert scipy.stats.kstest(u.numpy(), "uniform").pvalue > SIGNIFICANCE
    # Exactly the 23-bit grid: ((r >> 9) + 0.5) * 2^-23.
    assert torch.equal(u * 2**23 - 0.5, (u * 2**23 - 0.5).round())


def test_gumbel_distribution():
    g = ops.philox_noise(torch.empty(400, 500), (2024, 7), "gumbel").double().reshape(-1)
    n = g.numel()
    euler_gamma, variance = 0.5772156649015329, math.pi**2 / 6
    assert torch.isfinite(g).all()
    assert abs(g.mean().item() - euler_gamma) < 5 * math.sqrt(variance / n)
    # var of the sample variance ~ (mu4 - sigma^4) / n, Gumbel excess kurtosis 12/5.
    assert abs(g.var().item() - variance) < 5 * variance * math.sqrt((2 + 12 / 5) / n)
    assert scipy.stats.kstest(g.numpy(), "gumbel_r").pvalue > SIGNIFICANCE


def test_gaussian_distribution():
    x = ops.philox_noise(torch.empty(400, 500), (2024, 7), "gaussian").double().reshape(-1)
    n = x.numel()
    assert torch.isfinite(x).all()
    assert abs(x.mean().item()) < 5 / math.sqrt(n)
    assert abs(x.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert scipy.stats.kstest(x.numpy(), "norm").pvalue > SIGNIFICANCE
    # The tails reach past 4 sigma with 2e5 draws (the erfinv tail branch is used).
    assert x.abs().max().item() > 4


def test_gumbel_and_gaussian_streams_are_independent():
    like = torch.empty(300, 300)
    g = ops.philox_noise(like, (3, 0), "gumbel").double().reshape(-1)
    x = ops.philox_noise(like, (3, 0), "gaussian").double().reshape(-1)
    # Pearson correlation of independent draws is ~N(0, 1/n).
    corr = torch.corrcoef(torch.stack([g, x]))[0, 1].item()
    assert abs(corr) < 5 / math.sqrt(g.numel())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_opcheck(device, distribution):
    for state in (ops.noise_state(11, 2**40), ops.noise_state(11, 2**40, device=device)):
        torch.library.opcheck(torch.ops.gmvq.philox_noise.default,
                              (torch.empty(3, 5, device=device), state, distribution))
