#!/usr/bin/env python
"""Check the CUDA quantize kernels' logic on the CPU, through the emulation.

dev/emulate_cuda.sh --build-only compiles csrc/cuda/*.cu as C++ with
GMVQ_CUDA_EMULATION (CUDA threads become CPU threads, the mma.m16n8k8 tf32
fragments are exchanged with the PTX ISA layout, cp.async is deferred to its
wait) and registers the CUDA kernels for CPU tensors. This script loads that
library on its own (not the gmvq_ext package: its Python side follows the
schema separately) and compares, for both tile paths (GMVQ_CUDA_TILES=tensor
and simt) in float32 and the SIMT path in float64:

* quantize forward (z_out, indices, q_bar, latent_reg, row_lse, z_soft) and
  quantize_backward (grad z, weight, codebook, gumbel noise, eps noise) with
  autograd through the specification (gmvq_ext/reference.py) in float64, for hard, soft
  and eval modes, weight (N, D), (N, 1) and None, given and generated noise,
  on shapes that are no multiple of any tile, and D up to the register-tile bound;
* generated noise against the same noise passed explicitly: every output and
  gradient bit for bit, so the in-kernel Philox (philox.h words4, the lanes'
  code mapping, the unaligned path) equals philox.h's host fill functions;
* the emulated cvt.rna.tf32.f32 against exact rounding (ties away from zero);
* philox_noise and gumbel_argmax against philox.h on the host, bit for bit;
* the unfused ops (new schema) and their backward ops against float64 autograd;
* bitwise run-to-run determinism; temperature and noise state read through
  device pointers (GMVQ_EMULATE_DEVICE_SCALARS=1, a subprocess); the
  device-side index check (a subprocess that must abort); N = 0.

Usage: dev/check_emulated_quantize.py [--quick] [--cp-async early|late]
(each CUDA thread is an OS thread: the full run takes minutes on two cores).
"""

from __future__ import annotations

import argparse
import functools
import glob
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_emulation() -> Path:
    out = subprocess.run([str(REPO / "dev" / "emulate_cuda.sh"), "--build-only"], check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return Path(out.strip().splitlines()[-1])


def load_library(pkg: Path):
    import torch
    (library,) = glob.glob(str(pkg / "gmvq_ext" / "_C*.so"))
    torch.ops.load_library(library)
    return torch.ops.gmvq


HOST_PHILOX = r"""
#include <torch/extension.h>
#include "gmvq/philox.h"
// philox.h's host fill functions: what the CPU kernels use.
torch::Tensor host_noise(int64_t rows, int64_t cols, int64_t seed, int64_t offset, int64_t kind) {
  auto out = torch::empty({rows, cols}, torch::kFloat);
  float* data = out.data_ptr<float>();
  const int64_t numel = rows * cols;
  if (kind == 0) {
    for (int64_t i = 0; i < numel; ++i)
      data[i] = gmvq::rng::uniform_from_bits(gmvq::rng::random_word(seed, offset, gmvq::rng::kGumbelStream, i));
  } else if (kind == 1) {
    gmvq::rng::fill_gumbel(seed, offset, 0, numel, data);
  } else {
    gmvq::rng::fill_gaussian(seed, offset, 0, numel, data);
  }
  return out;
}
"""


EMULATION_PROBE = r"""
#include <torch/extension.h>
#define GMVQ_CUDA_EMULATION
#include "cuda_emulation.h"
// The emulation's cvt.rna.tf32.f32, element by element (float32 in, bits out),
// its don't-care bits cleared as the kernels clear them.
torch::Tensor tf32_round(torch::Tensor x) {
  auto in = x.contiguous();
  auto out = torch::empty(in.sizes(), torch::kInt32);
  for (int64_t i = 0; i < in.numel(); ++i) {
    const uint32_t bits = gmvq::emulation::cvt_rna_tf32(in.data_ptr<float>()[i]) & ~0x1fffu;
    out.data_ptr<int32_t>()[i] = static_cast<int32_t>(bits);
  }
  return out;
}
"""


def load_tf32_round():
    from torch.utils.cpp_extension import load_inline
    module = load_inline(name="gmvq_emulation_probe", cpp_sources=[EMULATION_PROBE], functions=["tf32_round"],
                         extra_include_paths=[str(REPO / "csrc" / "include"), str(REPO / "dev" / "emulation")],
                         extra_cflags=["-O2", "-std=c++20"], build_directory=str(_build_dir("emulation_probe")), verbose=False)
    return module.tf32_round


def check_tf32_rounding(fails):
    """cvt.rna.tf32.f32 as emulated: nearest with ties away from zero, 10 mantissa bits, against
    exact rational arithmetic on random bit patterns and on the ties themselves."""
    import torch
    from fractions import Fraction
    tf32_round = load_tf32_round()
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31 - 1, (4000,), generator=gen, dtype=torch.int64).to(torch.int32)
    ties = (torch.randint(0, 2**31 - 1, (1000,), generator=gen, dtype=torch.int64) & ~0x1fff | 0x1000)
    special = torch.tensor([0x3f801000, 0x3f803000, 0xbf801000 - 2**32, 0x3f800fff, 0x7f7fffff, 0x00001000,
                            0x00000fff], dtype=torch.int64)
    bits = torch.cat([bits, ties.to(torch.int32), special.to(torch.int32)])
    x = bits.view(torch.float32)
    finite = torch.isfinite(x)
    got = tf32_round(x[finite])
    want = []
    for value in x[finite].tolist():
        exact = Fraction(value)
        if exact == 0:
            want.append(Fraction(0))
            continue
        exponent = math.floor(math.log2(abs(value)))
        if Fraction(2) ** exponent > abs(exact):  # log2 rounded up
            exponent -= 1
        exponent = max(exponent, -126)  # subnormals share the exponent of 2^-126
        ulp = Fraction(2) ** (exponent - 10)
        steps = abs(exact) / ulp
        rounded = math.floor(steps + Fraction(1, 2)) * ulp  # ties away from zero
        want.append(rounded if exact > 0 else -rounded)
    want_bits = torch.tensor([float(w) if abs(w) < 2**128 else math.copysign(math.inf, w) for w in want],
                             dtype=torch.float32).view(torch.int32)
    fails.equal("emulated cvt.rna.tf32.f32 against exact rounding", got, want_bits)


def load_host_philox():
    from torch.utils.cpp_extension import load_inline
    module = load_inline(name="gmvq_host_philox", cpp_sources=[HOST_PHILOX], functions=["host_noise"],
                         extra_include_paths=[str(REPO / "csrc" / "include")],
                         extra_cflags=["-O2", "-ffp-contract=off"],
                         build_directory=str(_build_dir("host_philox")), verbose=False)
    kinds = {"uniform": 0, "gumbel": 1, "gaussian": 2}
    return lambda rows, cols, seed, offset, kind: module.host_noise(rows, cols, seed, offset, kinds[kind])


def _build_dir(name: str) -> Path:
    path = REPO / "build" / "emulation" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------
# The specification: gmvq_ext/reference.py (float64 autograd, explicit noise)
# --------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def load_reference():
    """gmvq_ext/reference.py on its own: importing the package would load its own kernels."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("gmvq_reference", REPO / "gmvq_ext" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Failures:
    def __init__(self):
        self.items: list[str] = []
        self.checks = 0

    def close(self, name, got, want, rtol, atol):
        import torch
        self.checks += 1
        got, want = got.detach().double(), want.detach().double()
        if got.shape != want.shape:
            self.items.append(f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
            return
        if not torch.allclose(got, want, rtol=rtol, atol=atol):
            err = (got - want).abs()
            worst = int(err.argmax()) if err.numel() else 0
            self.items.append(f"{name}: max |diff| {err.max().item():.3g} at {worst} "
                              f"(got {got.flatten()[worst].item():.9g}, want {want.flatten()[worst].item():.9g})")

    def equal(self, name, got, want):
        import torch
        self.checks += 1
        if got.shape != want.shape or not torch.equal(got, want):
            detail = "" if got.shape != want.shape else f", {(got != want).sum().item()} elements differ"
            self.items.append(f"{name}: not bitwise equal{detail}")


def make_inputs(n, k, d, dtype, weight, seed):
    import torch
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=gen, dtype=torch.float64)
    e = torch.randn(k, d, generator=gen, dtype=torch.float64)
    w = None
    if weight == "full":
        w = torch.nn.functional.softplus(torch.randn(n, d, generator=gen, dtype=torch.float64))
    elif weight == "scalar":
        w = torch.nn.functional.softplus(torch.randn(n, 1, generator=gen, dtype=torch.float64))
    return [t if t is None else t.to(dtype) for t in (z, w, e)]


def run_case(ops, host_noise, fails, shape, dtype, path, weight, mode, given, other_seed=True):
    """One forward + backward against the reference; returns the kernel's outputs and gradients.

    given: the noise is passed explicitly, from the seed after the op's own (other_seed, so that
    using Philox instead would show) or from the op's seed (to compare bits with Philox)."""
    import torch
    n, k, d = shape
    hard, training = {"hard": (True, True), "soft": (False, True), "eval": (True, False)}[mode]
    seed, offset, temperature, sigma_z2 = 2**33 + 7, 2**32 + 5, 0.7, 0.4
    os.environ["GMVQ_CUDA_TILES"] = path
    z, w, e = make_inputs(n, k, d, dtype, weight, seed=n * 7 + k)
    noise_seed = seed + 1 if given and other_seed else seed
    gumbel32 = host_noise(n, k, noise_seed, offset, "gumbel")
    eps32 = host_noise(n, d, noise_seed, offset, "gaussian")
    gumbel = gumbel32.to(dtype) if given else None
    eps = eps32.to(dtype) if given else None
    temp = torch.tensor(temperature, dtype=torch.float32)
    state = torch.tensor([seed, offset], dtype=torch.int64)
    out = ops.quantize(z, w, e, temp, sigma_z2, hard, training, state, gumbel, eps)
    gen = torch.Generator().manual_seed(5)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g_zout = torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype)
    g_qbar = torch.randn(k, generator=gen, dtype=torch.float64).to(acc)
    g_lat = torch.randn(n, generator=gen, dtype=torch.float64).to(acc)
    grads = ops.quantize_backward(g_zout, g_qbar, g_lat, z, w, e, out[1], out[4], out[5], temp, sigma_z2, hard,
                                  training, state, gumbel, eps)

    ref_in = [t if t is None else t.detach().double().requires_grad_() for t in (z, w, e)]
    ref_noise = [gumbel32.double().requires_grad_(), eps32.double().requires_grad_()]
    # The kernels use the temperature tensor's (float32) value.
    ref = load_reference().quantize(*ref_in, temp.item(), sigma_z2, hard, training, (seed, offset), *ref_noise)
    loss = (ref[0] * g_zout.double()).sum() + (ref[2] * g_qbar.double()).sum() + (ref[3] * g_lat.double()).sum()
    leaves = [t for t in ref_in + ref_noise if t is not None]
    ref_grads = dict(zip(map(id, leaves), torch.autograd.grad(loss, leaves, allow_unused=True)))

    tag = f"{tuple(shape)} {str(dtype)[6:]} {path} w={weight} {mode} {'given' if given else 'philox'}"
    base = 1e-9 if dtype == torch.float64 else 1e-4
    scale = max(1.0, d / 8)  # the distance cancels terms of size ~ 2 D
    tol = dict(rtol=base * scale, atol=base * scale)
    fails.equal(f"{tag}: indices", out[1], ref[1])
    names = ["z_out", None, "q_bar", "latent_reg", "row_lse", "z_soft"]
    for name, got, want in zip(names, out, ref):
        if name is not None:
            fails.close(f"{tag}: {name}", got, want, **tol)
    ref_grad_list = [ref_grads.get(id(t)) if t is not None else None for t in ref_in + ref_noise]
    kernel_grads = list(grads[:3]) + [grads[3], grads[4]]
    for name, got, want, present in zip(["grad_z", "grad_weight", "grad_codebook", "grad_gumbel", "grad_eps"],
                                        kernel_grads, ref_grad_list, [True, w is not None, True, given, given]):
        if not present:
            fails.equal(f"{tag}: {name} absent", torch.tensor(got.numel()), torch.tensor(0))
            continue
        want = torch.zeros_like(got, dtype=torch.float64) if want is None else want
        magnitude = max(1.0, want.abs().max().item()) if want.numel() else 1.0
        fails.close(f"{tag}: {name}", got, want.reshape(got.shape), rtol=tol["rtol"] * magnitude,
                    atol=tol["atol"] * magnitude)
    return out, grads


def check_quantize(ops, host_noise, fails, shapes, quick):
    import torch
    paths = [(torch.float32, "tensor"), (torch.float32, "simt"), (torch.float64, "simt")]
    for shape in shapes:
        for dtype, path in paths:
            for weight in ["full", "scalar", None]:
                for mode in ["hard", "soft", "eval"]:
                    start = time.time()
                    generated = run_case(ops, host_noise, fails, shape, dtype, path, weight, mode, False)
                    if quick and shape[2] > 8:
                        print(f"  {shape} {str(dtype)[6:]:8} {path:6} w={str(weight):6} {mode:4}: "
                              f"{time.time() - start:.1f}s", flush=True)
                        continue
                    run_case(ops, host_noise, fails, shape, dtype, path, weight, mode, True)
                    given = run_case(ops, host_noise, fails, shape, dtype, path, weight, mode, True, other_seed=False)
                    tag = f"{shape} {str(dtype)[6:]} {path} w={weight} {mode}: generated vs given noise"
                    for i, (a, b) in enumerate(zip(generated[0], given[0])):
                        fails.equal(f"{tag}, output {i}", a, b)
                    for i, (a, b) in enumerate(zip(generated[1][:3], given[1][:3])):
                        fails.equal(f"{tag}, gradient {i}", a, b)
                    print(f"  {shape} {str(dtype)[6:]:8} {path:6} w={str(weight):6} {mode:4}: "
                          f"{time.time() - start:.1f}s", flush=True)


def check_register_bounds(ops, host_noise, fails):
    """D = 128 fills every register slice of the float32 tiles, D = 70 splits them unevenly; one more
    than the bound (float32 128, float64 64) is an error that says so."""
    import torch
    for shape in [(40, 70, 128), (40, 70, 70)]:
        for path in ["tensor", "simt"]:
            for weight in ["full", "scalar"]:
                for mode in ["hard", "soft", "eval"]:
                    run_case(ops, host_noise, fails, shape, torch.float32, path, weight, mode, True)
    for d, dtype in [(129, torch.float32), (65, torch.float64)]:
        z, w, e = make_inputs(4, 5, d, dtype, "full", 0)
        fails.checks += 1
        try:
            ops.quantize(z, w, e, torch.tensor(1.0), 0.5, True, True, torch.tensor([1, 2]), None, None)
            fails.items.append(f"quantize accepted D = {d} ({dtype})")
        except RuntimeError as error:
            if f"D = {d}" not in str(error):
                fails.items.append(f"the D = {d} error does not name D: {error}")


def check_noise(ops, host_noise, fails):
    import torch
    for shape in [(1, 1), (3, 5), (37, 19), (129, 131)]:
        for seed, offset in [(0, 0), (2**40 + 17, 2**33 + 5), (-3, 7)]:
            state = torch.tensor([seed, offset])
            for kind in ["uniform", "gumbel", "gaussian"]:
                got = ops.philox_noise(torch.empty(shape), state, kind)
                want = host_noise(*shape, seed, offset, kind)
                fails.equal(f"philox_noise {kind} {shape} seed {seed}", got.view(torch.int32),
                            want.view(torch.int32))
    try:
        ops.philox_noise(torch.empty(2, 2), torch.tensor([1, 2]), "cauchy")
        fails.items.append("philox_noise accepted distribution 'cauchy'")
    except RuntimeError as error:
        if "distribution" not in str(error) or "gaussian" not in str(error):
            fails.items.append(f"philox_noise's distribution error does not name the argument: {error}")
    # gumbel_argmax regenerates the noise inside its row kernel.
    for shape in [(5, 3), (37, 130)]:
        logits = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        state, temp = torch.tensor([11, 3]), torch.tensor(0.6)
        noise = host_noise(*shape, 11, 3, "gumbel")
        for hard in [True, False]:
            generated = ops.gumbel_argmax(logits, temp, hard, state, None)
            given = ops.gumbel_argmax(logits, temp, hard, state, noise)
            fails.equal(f"gumbel_argmax {shape} hard={hard}: generated vs given noise", generated[0], given[0])
            fails.equal(f"gumbel_argmax {shape} hard={hard}: indices", generated[1], (logits + noise).argmax(1))
            soft = torch.softmax((logits.double() + noise.double()) / 0.6, 1)
            if not hard:
                fails.close(f"gumbel_argmax {shape}: sample", generated[0], soft, rtol=1e-5, atol=1e-6)


def check_unfused(ops, host_noise, fails):
    """codebook_distance, weighted_softmax, gumbel_argmax, aggregated_posterior_entropy and their
    backward ops against float64 autograd (float32 inputs)."""
    import torch
    n, k, d = 45, 70, 6
    gen = torch.Generator().manual_seed(9)
    temp = torch.tensor(0.6)
    state = torch.tensor([4, 8])
    for weight in ["full", "scalar", None]:
        z, w, e = make_inputs(n, k, d, torch.float32, weight, seed=11)
        ref_in = [t if t is None else t.double().requires_grad_() for t in (z, w, e)]
        zr, wr, er = ref_in
        ww = torch.ones_like(zr[:, :1]) if wr is None else wr
        distance = (ww[:, None, :] * (zr[:, None, :] - er[None, :, :]) ** 2).sum(2)
        present = [t for t in ref_in if t is not None]

        def compare(name, got, want, grads=None, upstream=None):
            fails.close(f"{name} w={weight}", got, want, rtol=1e-4, atol=1e-4)
            if grads is None:
                return
            ref_grads = torch.autograd.grad((want * upstream).sum(), present, retain_graph=True)
            for i, (a, b) in enumerate(zip([g for g in grads if g.numel()], ref_grads)):
                scale = max(1.0, b.abs().max().item())
                fails.close(f"{name} w={weight}: gradient {i}", a, b, rtol=1e-4 * scale, atol=1e-4 * scale)

        g_d = torch.randn(n, k, generator=gen)
        got = ops.codebook_distance(z, w, e)
        compare("codebook_distance", got, distance, ops.codebook_distance_backward(g_d, z, w, e), g_d.double())
        probs, lse = ops.weighted_softmax(z, w, e, temp)
        logits = -distance / temp.item()
        compare("weighted_softmax probs", probs, torch.softmax(logits, 1))
        compare("weighted_softmax lse", lse, torch.logsumexp(logits, 1))
        g_p, g_l = torch.randn(n, k, generator=gen), torch.randn(n, generator=gen)
        want = (torch.softmax(logits, 1) * g_p.double()).sum() + (torch.logsumexp(logits, 1) * g_l.double()).sum()
        ref_grads = torch.autograd.grad(want, present)
        got_grads = ops.weighted_softmax_backward(g_p, g_l, probs, z, w, e, temp)
        for i, (a, b) in enumerate(zip([g for g in got_grads if g.numel()], ref_grads)):
            scale = max(1.0, b.abs().max().item())
            fails.close(f"weighted_softmax_backward w={weight}: gradient {i}", a, b, rtol=1e-4 * scale,
                        atol=1e-4 * scale)
    logits = torch.randn(n, k, generator=gen) * 2
    ref_logits = logits.double().requires_grad_()
    noise = host_noise(n, k, 4, 8, "gumbel")
    y = torch.softmax((ref_logits + noise.double()) / temp.item(), 1)
    g_y = torch.randn(n, k, generator=gen)
    fails.close("gumbel_argmax_backward", ops.gumbel_argmax_backward(g_y, logits, temp, state, None),
                torch.autograd.grad((y * g_y.double()).sum(), ref_logits)[0], rtol=1e-4, atol=1e-5)
    entropy, q_bar = ops.aggregated_posterior_entropy(logits)
    ref_q = torch.softmax(ref_logits, 1).mean(0)
    ref_h = -(ref_q * ref_q.log()).sum()
    fails.close("aggregated_posterior_entropy", entropy, ref_h, rtol=1e-5, atol=1e-6)
    fails.close("aggregated_posterior_entropy q_bar", q_bar, ref_q, rtol=1e-5, atol=1e-7)
    g_q = torch.randn(k, generator=gen)
    got = ops.aggregated_posterior_entropy_backward(torch.tensor(0.5), g_q, logits, q_bar)
    want = torch.autograd.grad(0.5 * ref_h + (ref_q * g_q.double()).sum(), ref_logits)[0]
    fails.close("aggregated_posterior_entropy_backward", got, want, rtol=1e-4, atol=1e-6)


def check_determinism(ops, fails, shape):
    import torch
    for path in ["tensor", "simt"]:
        os.environ["GMVQ_CUDA_TILES"] = path
        z, w, e = make_inputs(*shape, torch.float32, "full", seed=3)
        temp, state = torch.tensor(0.9), torch.tensor([3, 4])
        gen = torch.Generator().manual_seed(2)
        g = [torch.randn(shape[0], shape[2], generator=gen), torch.randn(shape[1], generator=gen),
             torch.randn(shape[0], generator=gen)]
        for hard, training in [(True, True), (False, True), (True, False)]:
            runs = []
            for _ in range(2):
                out = ops.quantize(z, w, e, temp, 0.5, hard, training, state, None, None)
                grads = ops.quantize_backward(*g, z, w, e, out[1], out[4], out[5], temp, 0.5, hard, training,
                                              state, None, None)
                runs.append(list(out) + list(grads[:3]))
            for i, (a, b) in enumerate(zip(*runs)):
                fails.equal(f"determinism {path} hard={hard} training={training}: tensor {i}", a, b)


def check_empty(ops, fails):
    import torch
    z, w, e = make_inputs(0, 9, 4, torch.float32, "full", seed=0)
    temp, state = torch.tensor(1.0), torch.tensor([0, 0])
    out = ops.quantize(z, w, e, temp, 0.5, True, True, state, None, None)
    fails.equal("N = 0: q_bar", out[2], torch.zeros(9))
    grads = ops.quantize_backward(torch.zeros(0, 4), torch.ones(9), torch.zeros(0), z, w, e, out[1], out[4],
                                  out[5], temp, 0.5, True, True, state, None, None)
    fails.equal("N = 0: grad_codebook", grads[2], torch.zeros(9, 4))


SUBPROCESS_DEVICE_SCALARS = r"""
import os, sys, torch
sys.path.insert(0, {tools!r})
import check_emulated_quantize as c
ops = c.load_library(c.Path({pkg!r}))
z, w, e = c.make_inputs(45, 70, 6, torch.float32, "full", seed=1)
gen = torch.Generator().manual_seed(0)
g = [torch.randn(45, 6, generator=gen), torch.randn(70, generator=gen), torch.randn(45, generator=gen)]
for temp in (torch.tensor(0.8), torch.tensor(0.8, dtype=torch.float64)):
    for hard, training in [(True, True), (False, True), (True, False)]:
        out = ops.quantize(z, w, e, temp, 0.5, hard, training, torch.tensor([[5, 6]]), None, None)
        grads = ops.quantize_backward(*g, z, w, e, out[1], out[4], out[5], temp, 0.5, hard, training,
                                      torch.tensor([5, 6]), None, None)
        torch.save([list(out), list(grads[:3])], sys.argv[1] + f"_{{hard}}_{{training}}_{{temp.dtype}}")
probs = ops.weighted_softmax(z, w, e, torch.tensor(0.7))
sample = ops.gumbel_argmax(probs[0].log(), torch.tensor(0.5), False, torch.tensor([1, 2]), None)
noise = ops.philox_noise(torch.empty(7, 9), torch.tensor([9, 1]), "gaussian")
torch.save([*probs, *sample, noise], sys.argv[1] + "_unfused")
"""


def check_device_scalars(ops, fails, pkg):
    """Temperature and noise state read by the kernels through pointers == read on the host."""
    import tempfile
    import torch
    code = SUBPROCESS_DEVICE_SCALARS.format(tools=str(REPO / "dev"), pkg=str(pkg))
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for flag in ["0", "1"]:
            prefix = os.path.join(tmp, f"run{flag}")
            env = dict(os.environ, GMVQ_EMULATE_DEVICE_SCALARS=flag, GMVQ_CUDA_TILES="tensor")
            subprocess.run([sys.executable, "-c", code, prefix], check=True, env=env)
            results[flag] = {name: torch.load(os.path.join(tmp, name)) for name in os.listdir(tmp)
                             if name.startswith(f"run{flag}")}
        for name, host in results["0"].items():
            device = results["1"][name.replace("run0", "run1")]
            flat_host = [t for part in host for t in (part if isinstance(part, list) else [part])]
            flat_device = [t for part in device for t in (part if isinstance(part, list) else [part])]
            for i, (a, b) in enumerate(zip(flat_host, flat_device)):
                fails.equal(f"device-resident scalars {name[5:]}: tensor {i}", b, a)


SUBPROCESS_BAD_INDEX = r"""
import sys, torch
sys.path.insert(0, {tools!r})
import check_emulated_quantize as c
ops = c.load_library(c.Path({pkg!r}))
z, w, e = c.make_inputs(10, 6, 4, torch.float32, "full", seed=1)
temp, state = torch.tensor(1.0), torch.tensor([1, 2])
out = ops.quantize(z, w, e, temp, 0.5, True, False, state, None, None)
index = out[1].clone()
index[3] = 6
ops.quantize_backward(torch.ones(10, 4), torch.ones(6), torch.ones(10), z, w, e, index, out[4], out[5], temp,
                      0.5, True, False, state, None, None)
print("no assertion")
"""


def check_index_assertion(fails, pkg):
    code = SUBPROCESS_BAD_INDEX.format(tools=str(REPO / "dev"), pkg=str(pkg))
    result = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    fails.checks += 1
    if result.returncode == 0 or "indices must lie in [0, K)" not in result.stderr:
        fails.items.append(f"an out-of-range index did not stop the kernel (rc {result.returncode}): "
                           f"{result.stdout[-200:]} {result.stderr[-300:]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="D = 64 cases without the given-noise variants")
    parser.add_argument("--cp-async", choices=["late", "early"], default="late",
                        help="when the emulated cp.async copies land (see dev/emulation/cuda_emulation.h)")
    args = parser.parse_args()
    os.environ["GMVQ_EMULATE_CP_ASYNC"] = args.cp_async
    pkg = build_emulation()
    ops = load_library(pkg)
    host_noise = load_host_philox()
    fails = Failures()
    start = time.time()
    print("tf32 rounding, noise", flush=True)
    check_tf32_rounding(fails)
    check_noise(ops, host_noise, fails)
    print("unfused ops", flush=True)
    check_unfused(ops, host_noise, fails)
    print("quantize against the reference", flush=True)
    check_quantize(ops, host_noise, fails, [(70, 67, 5), (70, 67, 64)], args.quick)
    print("register-tile bounds (D = 128, 70, too large)", flush=True)
    check_register_bounds(ops, host_noise, fails)
    print("determinism, N = 0, device-resident scalars, index assertion", flush=True)
    check_determinism(ops, fails, (70, 67, 24))
    check_empty(ops, fails)
    check_device_scalars(ops, fails, pkg)
    check_index_assertion(fails, pkg)
    print(f"{fails.checks} checks, {len(fails.items)} failures, {time.time() - start:.0f}s "
          f"(cp.async {args.cp_async})")
    for item in fails.items:
        print("FAIL", item)
    sys.exit(1 if fails.items else 0)


if __name__ == "__main__":
    main()
