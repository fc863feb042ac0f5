"""Images to code indices and back, with a trained autoencoder.

    tokenizer = gmvq_ext.Tokenizer.from_checkpoint("runs/gmvq/checkpoint.pt", device="cuda")
    codes = tokenizer.encode(images)      # (B, 3, H, W) in [-1, 1] (or uint8) -> (B, H', W') int64
    images = tokenizer.decode(codes)      # -> (B, 3, H, W) float32

``decode(encode(x))`` is exactly the reconstruction of the model's evaluation
forward (``model.eval(); model(x)[0]``), bit for bit, for every quantizer.
Decoded pixels are not clamped (use ``gmvq_ext.data.to_uint8`` for pictures).
Encoding is per image: a batch gives the codes of its images one by one. The
quantizers never communicate in evaluation, so each rank of a torch.distributed
job may tokenize its own images.
"""

from __future__ import annotations

import os

import torch

from .data import IMAGE_SIZE, to_signed_unit
from .models import LATENT_DOWNSAMPLING
from .training import checkpoint as ckpt


class Tokenizer:
    """A trained autoencoder as an image tokenizer.

    Attributes: ``codebook_size`` (K; codes are 0 .. K-1), ``code_shape``
    (H', W') of one image's code map, ``image_shape`` (3, H, W), ``device``,
    ``model`` (the autoencoder, in eval mode) and ``run_args`` (the training
    run's arguments; empty when built from a model)."""

    def __init__(self, model: torch.nn.Module, image_size: int, run_args: dict | None = None):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.codebook_size = int(model.quantizer.codebook_size)
        self.image_shape = (3, int(image_size), int(image_size))
        self.code_shape = (int(image_size) // LATENT_DOWNSAMPLING,) * 2
        self.run_args = dict(run_args or {})

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device | None = None) -> "Tokenizer":
        """The model of a ``gmvq_ext.train`` checkpoint (read as plain data; a
        bad file raises ``CheckpointError`` naming it) on ``device`` (default:
        cuda when available, else cpu)."""
        device = resolve_device(device)
        state = ckpt.load(path)
        model, args = ckpt.restore_model(state, path, device)
        return cls(model, IMAGE_SIZE[args.dataset], vars(args))

    # ------------------------------------------------------------------ images -> codes
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Code indices (B, H', W') int64 on ``device`` of ``images`` (B, 3, H, W):
        float with pixels in [-1, 1], or uint8 in [0, 255]; on any device."""
        x = self._check_images(images)
        if x.shape[0] == 0:
            return torch.empty((0, *self.code_shape), dtype=torch.int64, device=self.device)
        _, indices, _, _ = self.model.quantizer(self.model.encoder(x))
        return indices.to(torch.int64)

    # ------------------------------------------------------------------ codes -> images
    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) float32 on ``device``, pixels nominally in [-1, 1]
        (not clamped), of code indices (B, H', W') of any integer dtype and device."""
        codes = self._check_indices(indices)
        if codes.shape[0] == 0:
            return torch.empty((0, *self.image_shape), dtype=torch.float32, device=self.device)
        return self.model.decode_indices(codes)

    # ------------------------------------------------------------------ argument checks
    def _check_images(self, images) -> torch.Tensor:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor of shape (B, {', '.join(map(str, self.image_shape))}), "
                            f"got {type(images).__name__}")
        if images.dim() != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"images must have shape (B, {', '.join(map(str, self.image_shape))}), got "
                             f"{tuple(images.shape)}" + ("; add a batch dimension with images[None]"
                                                         if tuple(images.shape) == self.image_shape else ""))
        if images.dtype == torch.uint8:
            return to_signed_unit(images.to(self.device))
        if not images.is_floating_point():
            raise ValueError(f"images must be float with pixels in [-1, 1] or uint8 in [0, 255], got {images.dtype}")
        x = images.to(self.device, torch.float32)
        if x.numel() and not bool(torch.isfinite(x).all()):
            raise ValueError("images contain NaN or infinite values")
        if x.numel() and (float(x.min()) < -1.0 or float(x.max()) > 1.0):
            raise ValueError(f"images must have pixels in [-1, 1] (float) or [0, 255] (uint8), got values in "
                             f"[{float(x.min()):.4g}, {float(x.max()):.4g}]; from [0, 1] use images * 2 - 1")
        return x

    def _check_indices(self, indices) -> torch.Tensor:
        shape = f"(B, {self.code_shape[0]}, {self.code_shape[1]})"
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"indices must be an integer torch.Tensor of shape {shape}, got {type(indices).__name__}")
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise ValueError(f"indices must have an integer dtype, got {indices.dtype}")
        if indices.dim() != 3 or tuple(indices.shape[1:]) != self.code_shape:
            raise ValueError(f"indices must have shape {shape}, got {tuple(indices.shape)}")
        codes = indices.to(self.device, torch.int64)
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"indices must be in [0, {self.codebook_size}) (the codebook size), got values in "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        return codes


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch.device (None: cuda when available, else cpu); ValueError naming it when unusable."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device {device!r} is not a torch device: {error}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA device is available")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return resolved
