"""gmvq_ext.Tokenizer and gmvq-tokenize: the round trip is the
evaluation reconstruction, batching changes nothing, bad input is named."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gmvq_ext
from gmvq_ext.cli import tokenize
from gmvq_ext.data import build_dataset
from gmvq_ext.training import checkpoint as ckpt
from gmvq_ext.training.config import build_model, parse_args, quantizer_options
from helpers import DEVICES

from training_runs import DATA, SMALL, run_cli, small_state


def calibrated(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` after three training-mode forwards on the sample (GM-VQ's
    k-means initialisation; BatchNorm statistics averaged over them), so that
    its evaluation forward uses many codes. A few real training steps would
    not: their running statistics are still far from the batches' own, and
    the test images would all map to one or two codes."""
    train_images = build_dataset("cifar10", DATA, "train")
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a cumulative average
    model.train()
    with torch.no_grad():
        for start in range(0, 192, 64):
            model(torch.stack([train_images[i] for i in range(start, start + 64)]))
    return model.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint (exactly as gmvq_ext.train writes one) of a GM-VQ model, K = 64, 8x8 codes."""
    state = small_state()
    args = parse_args([*SMALL, "--out", "unused"])
    torch.manual_seed(3)
    state["model"] = calibrated(build_model(args, quantizer_options(args))).state_dict()
    path = tmp_path_factory.mktemp("tokenizer") / "checkpoint.pt"
    ckpt.save_atomic(state, path)
    return path


@pytest.fixture(scope="module")
def images():
    test = build_dataset("cifar10", DATA, "test")
    return torch.stack([test[i] for i in range(40)])


# One intra-op thread for every test (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def evaluation_forward(model, x):
    model.eval()
    with torch.no_grad():
        reconstruction, indices, _, _ = model(x)
    return reconstruction, indices


@pytest.mark.parametrize("device", DEVICES)
def test_round_trip_is_the_evaluation_reconstruction(trained, images, device):
    tokenizer = gmvq_ext.Tokenizer.from_checkpoint(trained, device=device)
    assert tokenizer.codebook_size == 64 and tokenizer.code_shape == (8, 8) and tokenizer.image_shape == (3, 32, 32)
    assert tokenizer.device.type == device and tokenizer.run_args["quantizer"] == "gmvq"
    codes = tokenizer.encode(images)
    assert codes.shape == (40, 8, 8) and codes.dtype == torch.int64 and codes.device.type == device
    assert 0 <= int(codes.min()) and int(codes.max()) < 64 and codes.unique().numel() > 20

    model, _ = ckpt.restore_model(ckpt.load(trained), trained, torch.device(device))
    reconstruction, indices = evaluation_forward(model, images.to(device))
    assert torch.equal(codes, indices)
    decoded = tokenizer.decode(codes)
    assert decoded.shape == (40, 3, 32, 32) and decoded.dtype == torch.float32
    assert torch.equal(decoded, reconstruction)


@pytest.mark.parametrize("quantizer", ["gumbel", "sqvae", "vqvae"])
def test_round_trip_of_the_baselines(images, quantizer):
    argv = [a for a in SMALL if a not in ("--gamma", "0.1")]
    args = parse_args([*argv, "--quantizer", quantizer, "--out", "unused"])
    torch.manual_seed(3)
    model = calibrated(build_model(args, quantizer_options(args)))
    tokenizer = gmvq_ext.Tokenizer(model, image_size=32)
    reconstruction, indices = evaluation_forward(model, images)
    codes = tokenizer.encode(images)
    assert torch.equal(codes, indices) and codes.unique().numel() > 20
    assert torch.equal(tokenizer.decode(codes), reconstruction)


def test_batches_give_what_the_whole_gives(trained, images):
    tokenizer = gmvq_ext.Tokenizer.from_checkpoint(trained, device="cpu")
    whole = tokenizer.encode(images)
    pieces = torch.cat([tokenizer.encode(images[start:start + 13]) for start in range(0, 40, 13)])
    assert torch.equal(pieces, whole)
    decoded = torch.cat([tokenizer.decode(whole[start:start + 7]) for start in range(0, 40, 7)])
    torch.testing.assert_close(decoded, tokenizer.decode(whole), rtol=0, atol=1e-6)
    assert tokenizer.encode(images[:0]).shape == (0, 8, 8)
    assert tokenizer.decode(whole[:0]).shape == (0, 3, 32, 32)


def test_uint8_images_and_any_integer_indices(trained, images):
    tokenizer = gmvq_ext.Tokenizer.from_checkpoint(trained, device="cpu")
    as_uint8 = ((images + 1) * 127.5).round().to(torch.uint8)
    assert torch.equal(tokenizer.encode(as_uint8), tokenizer.encode(images))
    codes = tokenizer.encode(images)
    assert torch.equal(tokenizer.decode(codes.to(torch.int16)), tokenizer.decode(codes))


@pytest.mark.parametrize("bad,error,message", [
    (lambda x: x[:, :, :16, :16], ValueError, r"images must have shape \(B, 3, 32, 32\), got \(40, 3, 16, 16\)"),
    (lambda x: x[0], ValueError, r"images must have shape .*images\[None\]"),
    (lambda x: x * 2, ValueError, r"images must have pixels in \[-1, 1\]"),
    (lambda x: (x + 1) / 2 * 255, ValueError, r"images must have pixels in \[-1, 1\]"),
    (lambda x: x.masked_fill(x > 0.5, float("nan")), ValueError, "images contain NaN"),
    (lambda x: x.to(torch.int32), ValueError, "images must be float .* or uint8"),
    (lambda x: x.tolist(), TypeError, "images must be a torch.Tensor"),
])
def test_bad_images_are_named(trained, images, bad, error, message):
    tokenizer = gmvq_ext.Tokenizer.from_checkpoint(trained, device="cpu")
    with pytest.raises(error, match=message):
        tokenizer.encode(bad(images))


@pytest.mark.parametrize("bad,error,message", [
    (lambda c: c + 64, ValueError, r"indices must be in \[0, 64\) .*got values in \[6\d, 12\d\]"),
    (lambda c: c - 64, ValueError, r"indices must be in \[0, 64\)"),
    (lambda c: c[:, :4], ValueError, r"indices must have shape \(B, 8, 8\), got \(40, 4, 8\)"),
    (lambda c: c.float(), ValueError, "indices must have an integer dtype, got torch.float32"),
    (lambda c: c.numpy(), TypeError, "indices must be an integer torch.Tensor"),
])
def test_bad_indices_are_named(trained, images, bad, error, message):
    tokenizer = gmvq_ext.Tokenizer.from_checkpoint(trained, device="cpu")
    codes = tokenizer.encode(images)
    with pytest.raises(error, match=message):
        tokenizer.decode(bad(codes))


def test_unusable_devices_and_checkpoints_are_named(tmp_path):
    with pytest.raises(ValueError, match="device 'abacus'"):
        gmvq_ext.Tokenizer.from_checkpoint(tmp_path / "x.pt", device="abacus")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            gmvq_ext.Tokenizer.from_checkpoint(tmp_path / "x.pt", device="cuda")
    (tmp_path / "half.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ckpt.CheckpointError, match="half.pt"):
        gmvq_ext.Tokenizer.from_checkpoint(tmp_path / "half.pt", device="cpu")


def test_cli_writes_every_code_map_and_will_not_overwrite_silently(trained, tmp_path):
    out = tmp_path / "codes" / "test.npy"
    done = run_cli("--checkpoint", str(trained), "--split", "test", "--batch-size", "100", "--device", "cpu",
                   "--out", str(out), module=("-m", "gmvq_ext.cli.tokenize"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tokenizing test" in done.stderr  # the progress bar
    codes = np.load(out)
    test_images = build_dataset("cifar10", DATA, "test")
    assert codes.shape == (len(test_images), 8, 8) and codes.dtype == np.int16
    tokenizer = gmvq_ext.Tokenizer.from_checkpoint(trained, device="cpu")
    expected = tokenizer.encode(torch.stack([test_images[i] for i in range(len(test_images))]))
    assert np.array_equal(codes, expected.numpy())
    assert [p.name for p in out.parent.iterdir()] == ["test.npy"]  # no temporary file left

    before = out.read_bytes()
    with pytest.raises(SystemExit, match="already exists; pass --overwrite"):
        tokenize.main(["--checkpoint", str(trained), "--split", "test", "--out", str(out)])
    assert out.read_bytes() == before
    tokenize.main(["--checkpoint", str(trained), "--split", "train", "--max-images", "10", "--device", "cpu",
                   "--out", str(out), "--overwrite"])
    assert np.load(out).shape == (10, 8, 8)


def test_cli_bad_input(trained, tmp_path):
    with pytest.raises(SystemExit, match="gmvq-tokenize: error: the val split .* without --val-fraction"):
        tokenize.main(["--checkpoint", str(trained), "--split", "val", "--device", "cpu",
                       "--out", str(tmp_path / "v.npy")])
    (tmp_path / "bad.pt").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"gmvq-tokenize: error: cannot load checkpoint .*bad.pt"):
        tokenize.main(["--checkpoint", str(tmp_path / "bad.pt"), "--out", str(tmp_path / "c.npy")])
    with pytest.raises(SystemExit, match="gmvq-tokenize: error: .*does not exist"):
        tokenize.main(["--checkpoint", str(trained), "--data-dir", str(tmp_path / "nowhere"), "--device", "cpu",
                       "--out", str(tmp_path / "c.npy")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt"]
