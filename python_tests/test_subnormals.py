"""No subnormal floats on the CPU ops' hot path (csrc/cpu/subnormals.h).

Intel cores take a microcode assist on every subnormal operand or result, so
rows whose terms underflow (a cold temperature) made the CPU backward up to 15x
slower there; AMD cores hide it. The time cannot be seen on every machine, so
these tests look at the values: with GMVQ_DEBUG_SUBNORMALS=1 every GEMM of the
CPU kernels counts the subnormal values of its operands and result, and the
ops' outputs are checked directly. GMVQ_CPU_ALLOW_SUBNORMALS=1 (the ops run in
the thread's own mode, as before the guard) shows the count is live."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gmvq_ext import ops
from helpers import EMULATED, PACKAGE_PARENT, make_codebook_inputs, subprocess_env

pytestmark = [
    pytest.mark.skipif(EMULATED, reason="checks the CPU kernels, which the emulation replaces"),
    pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the guard sets x86's MXCSR"),
]

# Every CPU op, forward and backward, at a cold temperature and at 1, on rows
# that underflow: K codes far from most rows (scale 3), D = 16. Prints one JSON
# line per case: the GEMM counts and the subnormal values in the outputs.
_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from gmvq_ext import _C, ops
    from helpers import make_codebook_inputs, make_logits

    torch.set_num_threads(2)

    def subnormals(tensors):
        found = 0
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                found += int(((t != 0) & (t.abs() < torch.finfo(t.dtype).tiny)).sum())
        return found

    def report(case, outputs):
        checked, in_gemms = _C.take_subnormal_counts()
        print(json.dumps({"case": case, "checked": checked, "in_gemms": in_gemms,
                          "in_outputs": subnormals(outputs)}))

    n, k, d = 1024, 512, 16
    for dtype in (torch.float32, torch.float64):
        z, w, e = make_codebook_inputs(n, k, d, dtype=dtype, weight="full")
        e = e * 3
        for temperature in (0.05, 1.0):
            t = torch.tensor(temperature)
            for hard, training in ((True, True), (False, True), (True, False)):
                args = (t, 0.5, hard, training, ops.noise_state(3, 1), None, None)
                out = torch.ops.gmvq.quantize(z, w, e, *args)
                upstream = (torch.randn(n, d, dtype=dtype), torch.randn(k, dtype=dtype),
                            torch.randn(n, dtype=dtype))
                grads = torch.ops.gmvq.quantize_backward(*upstream, z, w, e, out[1], out[4], out[5], *args)
                report(f"quantize {dtype} T={temperature} hard={hard} training={training}", out + grads)
            probs, lse = torch.ops.gmvq.weighted_softmax(z, w, e, t)
            grads = torch.ops.gmvq.weighted_softmax_backward(torch.randn_like(probs), torch.randn_like(lse), probs,
                                                              z, w, e, t)
            report(f"weighted_softmax {dtype} T={temperature}", (probs, lse) + grads)
            logits = make_logits(n, k, dtype=dtype, scale=30.0 / temperature)
            sample = torch.ops.gmvq.gumbel_argmax(logits, t, False, ops.noise_state(3, 1), None)
            grad = torch.ops.gmvq.gumbel_argmax_backward(torch.randn_like(logits), logits, t,
                                                         ops.noise_state(3, 1), None)
            report(f"gumbel_argmax {dtype} T={temperature}", sample + (grad,))
            entropy, q_bar = torch.ops.gmvq.aggregated_posterior_entropy(logits)
            grad = torch.ops.gmvq.aggregated_posterior_entropy_backward(torch.ones((), dtype=dtype),
                                                                        torch.randn_like(q_bar), logits, q_bar)
            report(f"aggregated_posterior_entropy {dtype} T={temperature}", (entropy, q_bar, grad))
        distance = torch.ops.gmvq.codebook_distance(z, w, e)
        # Upstream gradients near the bottom of the normal range: products and sums underflow.
        upstream = torch.randn_like(distance) * 1e-36
        upstream[upstream.abs() < torch.finfo(dtype).tiny] = 1e-36
        grads = torch.ops.gmvq.codebook_distance_backward(upstream, z, w, e)
        report(f"codebook_distance {dtype}", (distance,) + grads)
""")


def _run_cases(**env) -> list[dict]:
    environment = subprocess_env(GMVQ_DEBUG_SUBNORMALS="1", **env)
    environment["PYTHONPATH"] += os.pathsep + str(Path(__file__).resolve().parent)  # helpers
    done = subprocess.run([sys.executable, "-c", _SCRIPT], env=environment, cwd=PACKAGE_PARENT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_no_subnormal_in_any_gemm_operand_or_output():
    cases = _run_cases()
    assert cases, "no case ran"
    for case in cases:
        assert case["in_gemms"] == 0 and case["in_outputs"] == 0, case
    # Every op with a GEMM had its operands checked.
    for name in ("quantize", "weighted_softmax", "codebook_distance"):
        assert all(c["checked"] > 0 for c in cases if c["case"].startswith(name)), name


def test_without_the_guard_the_check_finds_subnormals():
    # The same cases in the thread's own floating-point mode (what every op did
    # before the guard): the rows underflow, and the count sees it at both
    # temperatures. This is what makes the test above able to fail.
    cases = {c["case"]: c for c in _run_cases(GMVQ_CPU_ALLOW_SUBNORMALS="1")}
    for temperature in (0.05, 1.0):
        found = sum(c["in_gemms"] for name, c in cases.items()
                    if name.startswith("quantize torch.float32") and f"T={temperature} " in name)
        assert found > 0, temperature
    assert sum(c["in_gemms"] + c["in_outputs"] for c in cases.values() if "float64" in c["case"]) > 0


def _subnormal_survives() -> bool:
    """Whether this thread and its pool keep subnormal results (the default mode)."""
    tiny = torch.full((1 << 16,), torch.finfo(torch.float32).tiny, dtype=torch.float32)
    halved = tiny * 0.5  # subnormal, unless flushed; 65536 elements: the pool's threads compute them
    return bool((halved != 0).all())


def test_the_callers_floating_point_mode_is_restored():
    z, w, e = make_codebook_inputs(256, 64, 8)
    assert _subnormal_survives()
    ops.quantize(z, w, e, temperature=0.05, sigma_z2=0.5, hard=True, training=True, noise_state=(1, 0))
    assert _subnormal_survives(), "an op left flush-to-zero set"
    previous = torch.set_flush_denormal(True)
    try:
        if previous:  # the CPU supports it: a mode set by the user stays set
            ops.quantize(z, w, e, temperature=0.05, sigma_z2=0.5, hard=True, training=True, noise_state=(1, 0))
            assert not bool((torch.tensor([torch.finfo(torch.float32).tiny]) * 0.5 != 0).item())
    finally:
        torch.set_flush_denormal(False)
    assert _subnormal_survives()
