"""Images to code indices and back, with a trained autoencoder.

    tokenizer = gmvq_ext.Tokenizer.from_checkpoint("runs/gmvq/checkpoint.pt", device="cuda")
    codes = tokenizer.encode(images)      # (B, 3, H, W) in [-1, 1] (or uint8) -> (B, H', W') int64
    images = tokenizer.decode(codes)      # -> (B, 3, H, W) float32
    tokenizer.save_pretrained("my-tokenizer")      # model.safetensors + config.json (pretrained.py)
    tokenizer = gmvq_ext.Tokenizer.from_pretrained("my-tokenizer")   # no training code, no pickle

``decode(encode(x))`` is exactly the reconstruction of the model's evaluation
forward (``model.eval(); model(x)[0]``), bit for bit, for every quantizer.
Decoded pixels are not clamped (use ``gmvq_ext.data.to_uint8`` for pictures).
Encoding is per image: a batch gives the codes of its images one by one. The
quantizers never communicate in evaluation, so each rank of a torch.distributed
job may tokenize its own images.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .data import to_signed_unit
from .models import LATENT_DOWNSAMPLING, RESIDUAL_BLOCKS


class Tokenizer:
    """A trained autoencoder as an image tokenizer.

    Attributes: ``codebook_size`` (K; codes are 0 .. K-1), ``code_shape``
    (H', W') of one image's code map, ``image_shape`` (3, H, W), ``device``,
    ``model`` (the autoencoder, in eval mode), ``config`` (what rebuilds it:
    config.json's content; None when built from a bare model) and
    ``run_args`` (the training run's arguments; empty when not read from a
    checkpoint)."""

    def __init__(self, model: torch.nn.Module, image_size: int, run_args: dict | None = None,
                 config: dict | None = None):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.codebook_size = int(model.quantizer.codebook_size)
        self.image_shape = (3, int(image_size), int(image_size))
        downsampling = config["downsampling"] if config else LATENT_DOWNSAMPLING
        self.code_shape = (int(image_size) // downsampling,) * 2
        self.run_args = dict(run_args or {})
        self.config = dict(config) if config else None

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device | None = None) -> "Tokenizer":
        """The model of a ``gmvq_ext.train`` checkpoint (read as plain data; a
        bad file raises ``CheckpointError`` naming it) on ``device`` (default:
        cuda when available, else cpu)."""
        from .pretrained import network_config
        from .training import checkpoint as ckpt
        from .training.config import as_saved, quantizer_options, run_downsampling, run_image_size

        device = resolve_device(device)
        state = ckpt.load(path)
        model, args = ckpt.restore_model(state, path, device)
        config = network_config(image_size=run_image_size(args), downsampling=run_downsampling(args),
                                residual_blocks=RESIDUAL_BLOCKS[args.dataset], quantizer=args.quantizer,
                                codebook_size=args.codebook_size, dim=args.dim,
                                quantizer_options=as_saved(quantizer_options(args), state.get("quantizer_options")),
                                trained_on={"dataset": args.dataset, "epochs": state["epoch"], "steps": state["step"]})
        return cls(model, config["image_size"], vars(args), config)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, device: str | torch.device | None = None) -> "Tokenizer":
        """The tokenizer exported to a folder (``save_pretrained``, gmvq-export):
        model.safetensors and config.json, checked before use (a tampered,
        mismatched or newer folder raises a one-line PretrainedError naming the
        file). With huggingface_hub installed, a Hub repository id "user/name"
        works too. Needs neither the training code nor its checkpoint."""
        from .pretrained import load_network, resolve_folder

        network = load_network(resolve_folder(name_or_path), resolve_device(device))
        return cls(network, network.config["image_size"], config=network.config)

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write model.safetensors (weights and buffers; no optimizer, no pickle)
        and config.json (everything that rebuilds the model) into ``folder``;
        ``from_pretrained(folder)`` loads them. Returns the folder."""
        from .pretrained import save_folder

        if self.config is None:
            raise ValueError("this Tokenizer was built from a bare model, without the config that rebuilds it; "
                             "use Tokenizer.from_checkpoint or Tokenizer.from_pretrained")
        return save_folder(self.model, self.config, folder)

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
