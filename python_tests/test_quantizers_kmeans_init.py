"""k-means initialisation of every quantizer whose encoder outputs live in the code space
(the paper starts every model of its Table 1 so). GM-VQ's own tests are in test_quantizers_gmvq.py."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gmvq_ext import build_quantizer
from gmvq_ext.quantizers import QUANTIZERS, AffineVQ, GumbelVQ
from gmvq_ext.quantizers.kmeans import kmeans
from helpers import subprocess_env

WITH_KMEANS = sorted(name for name, cls in QUANTIZERS.items() if cls is not GumbelVQ)
# Those whose training forward changes nothing else in the codebook after k-means.
CODEBOOK_IS_THE_CENTROIDS = ["gmvq", "gmvq-entropy", "sqvae", "vqvae", "vqvae-affine", "vqvae-l2"]


def clustered_rows(channels: int, seed: int = 0) -> torch.Tensor:
    """64 rows around 8 far-apart centres, then any extra channels (GM-VQ's weights) as zeros."""
    gen = torch.Generator().manual_seed(seed)
    centres = 10.0 * torch.randn(8, 4, generator=gen)
    rows = centres.repeat(8, 1) + 0.1 * torch.randn(64, 4, generator=gen)
    return torch.cat([rows, torch.zeros(64, channels - 4)], dim=1)


def compared_vectors(name: str, rows: torch.Tensor) -> torch.Tensor:
    """What the codes are compared with: z (the first D channels), l2-normalised for the l2 variants."""
    z = rows[:, :4]
    return F.normalize(z, dim=-1) if "l2" in name else z


@pytest.mark.parametrize("name", WITH_KMEANS)
def test_the_first_training_forward_clusters_once_and_evaluation_never(name):
    q = build_quantizer(name, codebook_size=16, dim=4, seed=3)
    rows = clustered_rows(q.input_channels)
    q.eval()(rows)
    assert not bool(q.initialized), "an evaluation forward must not initialise"
    q.train()(rows)
    assert bool(q.initialized)
    after_first = q.codebook.detach().clone()
    if name in CODEBOOK_IS_THE_CENTROIDS:
        q(clustered_rows(q.input_channels, seed=1))
        assert torch.equal(q.codebook.detach(), after_first), "a second training forward clustered again"


@pytest.mark.parametrize("name", CODEBOOK_IS_THE_CENTROIDS)
def test_the_codes_are_the_centroids_of_the_compared_vectors(name):
    q = build_quantizer(name, codebook_size=16, dim=4, seed=3).train()
    if isinstance(q, AffineVQ):  # a map that is not the identity: the raw codes must invert it
        with torch.no_grad():
            q.affine_weight.fill_(0.3)
            q.affine_bias.fill_(-0.2)
    rows = clustered_rows(q.input_channels)
    q(rows)
    expected = kmeans(compared_vectors(name, rows), 16, q.kmeans_iterations, seed=3)
    torch.testing.assert_close(q.codebook_vectors().detach() if "l2" not in name else q.codebook.detach(),
                               expected)


@pytest.mark.parametrize("name", ["gmvq", "vqvae-l2", "sqvae"])
def test_under_bfloat16_autocast_the_codebook_is_clustered_in_float32(name):
    plain, mixed = (build_quantizer(name, codebook_size=16, dim=4, seed=3).train() for _ in range(2))
    rows = clustered_rows(plain.input_channels) + 0.01 * torch.randn(64, plain.input_channels)
    plain(rows)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed(rows)
    assert torch.equal(mixed.codebook.detach(), plain.codebook.detach())


@pytest.mark.parametrize("name", WITH_KMEANS)
def test_kmeans_init_false_keeps_the_constructed_codebook(name):
    q = build_quantizer(name, codebook_size=16, dim=4, kmeans_init=False).train()
    before = q.codebook.detach().clone()
    assert bool(q.initialized)
    if name in CODEBOOK_IS_THE_CENTROIDS:
        with torch.no_grad():
            q(clustered_rows(q.input_channels))
        assert torch.equal(q.codebook.detach(), before)


@pytest.mark.parametrize("name", ["vqvae", "vqvae-replace", "sqvae"])
def test_a_state_saved_before_the_flag_existed_reads_as_trained(name):
    trained = build_quantizer(name, codebook_size=16, dim=4, kmeans_init=False)
    state = {key: value for key, value in trained.state_dict().items() if key != "initialized"}
    fresh = build_quantizer(name, codebook_size=16, dim=4)
    fresh.load_state_dict(state)
    assert bool(fresh.initialized)
    fresh.train()(clustered_rows(fresh.input_channels))
    if name != "vqvae-replace":  # nothing is dead yet either; the codes stay what was loaded
        assert torch.equal(fresh.codebook.detach(), trained.codebook.detach())


def test_a_loaded_state_that_was_not_initialised_still_clusters():
    untrained = build_quantizer("vqvae", codebook_size=16, dim=4)
    fresh = build_quantizer("vqvae", codebook_size=16, dim=4, kmeans_init=False)
    fresh.load_state_dict(untrained.state_dict())
    assert fresh._kmeans_pending
    fresh.train()(clustered_rows(4))
    assert bool(fresh.initialized)


def test_gumbel_vq_has_no_vectors_to_cluster():
    with pytest.raises(TypeError, match="kmeans_init"):
        build_quantizer("gumbel", codebook_size=16, dim=4, kmeans_init=True)


def test_negative_iterations_are_refused():
    with pytest.raises(ValueError, match="kmeans_iterations"):
        build_quantizer("vqvae", codebook_size=16, dim=4, kmeans_iterations=-1)


@pytest.mark.parametrize("name", ["vqvae-replace", "vqvae-l2-replace"])
def test_replaced_codes_are_counted_per_training_forward(name):
    q = build_quantizer(name, codebook_size=16, dim=4, replace_after=1, kmeans_init=False).train()
    with torch.no_grad():
        q.codebook.fill_(0.0)
        q.codebook[0].fill_(50.0)
    far = 50.0 + 0.01 * torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    counts = [float(q(far)[3]["codes_replaced"]) for _ in range(2)]
    assert counts == [0, 15], "nothing is dead at the first forward; then the 15 codes it left unused"
    assert "codes_replaced" not in q.eval()(far)[3]


WARM_CACHE_SCRIPT = """
import torch, gmvq_ext
torch.manual_seed(0)
for name in ("gmvq", "vqvae-l2"):
    quantizer = gmvq_ext.build_quantizer(name, codebook_size=16, dim=4)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, quantizer.input_channels, 1), quantizer)
    step = torch.compile(lambda images: (lambda out: out[0].square().mean() + out[2])(model(images)))
    for _ in range(2):  # the first call clusters (a graph break), the second is compiled without it
        step(torch.randn(2, 3, 4, 4)).backward()
print("trained")
"""


def test_a_compiled_first_forward_runs_again_from_a_warm_compile_cache(tmp_path):
    # k-means is a graph break of a compiled first forward. Views handed across it came back from a warm
    # AOTAutograd cache with garbage shapes ("shape '[93873346349544, ...]' is invalid"): the second
    # process, which reads the first one's cache, failed.
    env = subprocess_env(TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), OMP_NUM_THREADS="1")
    for run in ("cold cache", "warm cache"):
        done = subprocess.run([sys.executable, "-c", WARM_CACHE_SCRIPT], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0 and "trained" in done.stdout, f"{run}:\n{done.stderr[-3000:]}"
