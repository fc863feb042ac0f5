"""Compiled and captured training on the fused kernel (issue "one path through the ops").

torch.compile(fullgraph=True) of a whole autoencoder training step runs
gmvq.quantize, holds no N x K tensor and never recompiles while the
temperature anneals; the module's training step on CUDA makes no host sync
and replays from a CUDA graph with the eager results; on the CPU a compiled
GM-VQ at (4096, 16384, 64) stays far below one N x K tensor of extra memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from gmvq_ext.models import build_autoencoder
from gmvq_ext.quantizers import GaussianMixtureVQ
from helpers import PACKAGE_PARENT, graph_recorder, graphs_call, requires_cuda, subprocess_env

K = 97  # a size no other tensor of the model has, so (N, K) shapes are recognisable


def n_by_k_shapes(graphs, n: int, k: int) -> list:
    shapes = []
    for gm in graphs:
        for node in gm.graph.nodes:
            value = node.meta.get("example_value")
            if isinstance(value, torch.Tensor) and n in value.shape and k in value.shape:
                shapes.append((node.name, tuple(value.shape)))
    return shapes


def make_model(device="cpu"):
    torch.manual_seed(0)
    quantizer = GaussianMixtureVQ(dim=16, codebook_size=K, kmeans_init=False)
    return build_autoencoder("cifar10", quantizer).to(device)


def loss_of(model, images):
    reconstruction, indices, quantizer_loss, _ = model(images)
    return F.mse_loss(reconstruction, images) + quantizer_loss, indices


def test_compiled_autoencoder_step_runs_the_kernel_without_recompiling():
    torch._dynamo.reset()
    eager, compiled_model = make_model(), make_model()
    graphs = []
    step = torch.compile(loss_of, fullgraph=True, backend=graph_recorder(graphs))
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # N = 4 x 8 x 8 latent vectors
    steps = 50
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(steps):
            for model in (eager, compiled_model):
                model.quantizer.set_progress(i, steps)  # the temperature anneals from 2.0 to 0.1
            expected, expected_indices = loss_of(eager, images)
            got, indices = step(compiled_model, images)
            got.backward()
            expected.backward()
            if i < 3 or i == steps - 1:  # the compiled step computes what the eager one does
                torch.testing.assert_close(got, expected)
                assert torch.equal(indices, expected_indices)
                for a, b in zip(compiled_model.parameters(), eager.parameters()):
                    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
            for model in (eager, compiled_model):
                model.zero_grad(set_to_none=True)
    assert len(graphs) == 1, f"{len(graphs)} graphs captured"
    assert graphs_call(graphs, "gmvq.quantize")
    assert n_by_k_shapes(graphs, 4 * 8 * 8, K) == []
    assert compiled_model.quantizer.step.item() == eager.quantizer.step.item() == steps


_LARGE_COMPILED_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from gmvq_ext.quantizers import GaussianMixtureVQ

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    n, k, d = 4096, 16384, 64
    torch.manual_seed(0)
    q = GaussianMixtureVQ(dim=d, codebook_size=k, weight="full", kmeans_init=False).train()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, example_inputs)

    compiled = torch.compile(q, fullgraph=True, backend=record)
    x = torch.randn(n, 2 * d, generator=torch.Generator().manual_seed(1)).requires_grad_()
    peaks = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(4):
            q.set_progress(step, 4)  # a new temperature every step
            if step == 1:  # after the first step (compilation, one-time buffers)
                base = status("VmRSS")
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset the peak resident set (VmHWM)
            out, _, loss, _ = compiled(x)
            (out.square().mean() + loss).backward()
    peak = status("VmHWM") - base
    ops = sorted({str(node.target) for gm in graphs for node in gm.graph.nodes if "gmvq" in str(node.target)})
    print(json.dumps({"graphs": len(graphs), "gmvq_ops": ops, "extra_peak_bytes": peak,
                      "finite": bool(torch.isfinite(x.grad).all() and torch.isfinite(q.codebook.grad).all())}))
""")


@pytest.mark.slow
def test_compiled_gmvq_at_scale_uses_far_less_than_one_n_by_k_tensor():
    done = subprocess.run([sys.executable, "-c", _LARGE_COMPILED_SCRIPT], cwd=PACKAGE_PARENT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["graphs"] == 1 and any("gmvq.quantize" in op for op in result["gmvq_ops"]), result
    assert result["finite"]
    # One (4096, 16384) float32 tensor is 256 MiB; the fused op's blocks and partials stay far below.
    assert result["extra_peak_bytes"] < 160 * 2**20, f"{result['extra_peak_bytes'] / 2**20:.0f} MiB"


# ---------------------------------------------------------------------------- CUDA
def cuda_module():
    torch.manual_seed(0)
    return GaussianMixtureVQ(dim=16, codebook_size=K, kmeans_init=False).cuda().train()


@requires_cuda
def test_cuda_training_step_makes_no_host_sync():
    q = cuda_module()
    x = torch.randn(256, 32, device="cuda")
    target = torch.randn(256, 16, device="cuda")
    for step in range(3):
        q.set_progress(step, 3)  # a fill_ from a Python number: no sync either
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out, _, loss, _ = q(x.requires_grad_())
            (F.mse_loss(out, target) + loss).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(q.codebook.grad).all()


@requires_cuda
def test_cuda_graph_of_a_training_step_replays_the_eager_results():
    eager, captured = cuda_module(), cuda_module()
    static_x = torch.randn(256, 32, device="cuda", requires_grad=True)
    target = torch.randn(256, 16, device="cuda")

    def step(q, x):
        out, indices, loss, _ = q(x)
        (F.mse_loss(out, target) + loss).backward()
        return out.detach(), indices

    # Warm up on a side stream (as torch.cuda.graphs asks), with the same calls on the eager twin.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for q in (captured, eager):
            q.set_progress(0, 10)
            step(q, static_x)
            q.zero_grad(set_to_none=False)
            static_x.grad = None
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    captured.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        static_out, static_indices = step(captured, static_x)
    # The capture ran nothing; each replay is one training step (the step buffer advances in it).
    for i in range(1, 4):
        for q in (captured, eager):
            q.set_progress(i, 10)  # the graph reads the temperature buffer's memory
        captured.codebook.grad.zero_()
        graph.replay()
        eager.zero_grad(set_to_none=True)
        expected_out, expected_indices = step(eager, static_x.detach().requires_grad_())
        torch.testing.assert_close(static_out, expected_out)
        assert torch.equal(static_indices, expected_indices)
        torch.testing.assert_close(captured.codebook.grad, eager.codebook.grad, rtol=1e-4, atol=1e-5)
    assert captured.step.item() == eager.step.item()
