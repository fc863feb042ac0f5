"""What every quantizer shares: the tensor layout rule, the noise key, the
temperature state and the code-usage statistics.

Layout rule (one for every quantizer):
  * ``channel_first=None`` (default): a 4-D input is a channel-first feature map
    (B, C, H, W); any other rank is channel-last (..., C).
  * ``channel_first=True``: dimension 1 holds the channels for any rank >= 2
    (e.g. (B, C, L) sequences).
  * ``channel_first=False``: the last dimension holds the channels, 4-D included.
``quantized`` comes back in the input's layout; ``indices`` have the input's
shape without the channel dimension.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..reference import LOG_CLAMP
from . import collectives
from .temperature import exponential_temperature


def entropy(probs: Tensor) -> Tensor:
    """H(p) = -sum p log p over the last dimension; 0 log 0 counts as 0."""
    return -(probs * torch.log(probs.clamp_min(LOG_CLAMP))).sum(-1)


def mean_squared_distance(a: Tensor, b: Tensor) -> Tensor:
    """mean_n ||a[n] - b[n]||^2 over (N, D) rows: a squared norm per latent
    vector, the quantizers' loss unit (docs/math.md, "Units of the objective")."""
    return (a - b).pow(2).sum() / max(a.shape[0], 1)


def code_counts(indices: Tensor, codebook_size: int) -> Tensor:
    """How often each code was chosen, (K,) int64.

    index_add_ rather than bincount: bincount's output shape depends on the
    data, which torch.compile(fullgraph=True) cannot trace."""
    counts = torch.zeros(codebook_size, dtype=torch.int64, device=indices.device)
    return counts.index_add_(0, indices.reshape(-1), torch.ones_like(indices.reshape(-1)))


def usage_statistics(mean_probs: Tensor, indices: Tensor, codebook_size: int) -> dict[str, Tensor]:
    """Perplexities and used-code count of one batch (docs/math.md#metrics).

    mean_probs: the batch's aggregated soft posterior q_bar (K,); indices: the
    chosen codes. Returned detached, as float tensors."""
    counts = code_counts(indices.detach(), codebook_size)
    hard = counts.to(torch.float32) / counts.sum().clamp_min(1)
    return {
        "perplexity": torch.exp(entropy(mean_probs.detach().float())),
        "perplexity_hard": torch.exp(entropy(hard)),
        "codes_used": (counts > 0).sum().to(torch.float32),
    }


class Quantizer(nn.Module):
    """Base class: layout handling, noise key, temperature schedule.

    Buffers (all in the state_dict, so a resumed run continues exactly):
      ``seed``        the noise seed (int64);
      ``step``        training forwards done so far; the noise offset of the
                      next one is ``step * world_size + rank``;
      ``temperature`` the current Gumbel-softmax temperature (float32), set
                      by ``set_progress``.
    Subclasses set ``input_channels``, ``code_dim``, ``codebook_size`` and
    implement ``quantize_vectors(flat) -> (quantized_flat, indices, loss, info)``
    on (N, input_channels) rows.
    """

    input_channels: int
    code_dim: int
    codebook_size: int

    def __init__(self, *, channel_first: Optional[bool] = None, seed: int = 0,
                 temperature_start: float = 2.0, temperature_end: float = 0.1):
        super().__init__()
        self.channel_first = channel_first
        self.temperature_start = float(temperature_start)
        self.temperature_end = float(temperature_end)
        self.register_buffer("seed", torch.tensor(int(seed), dtype=torch.int64))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("temperature", torch.tensor(self.temperature_start, dtype=torch.float32))

    # ------------------------------------------------------------------ layout
    def _channel_dim(self, x: Tensor) -> int:
        if self.channel_first is None:
            return 1 if x.dim() == 4 else x.dim() - 1
        if self.channel_first:
            if x.dim() < 2:
                raise ValueError(f"channel_first=True needs an input of rank >= 2, got {tuple(x.shape)}")
            return 1
        return x.dim() - 1

    def _to_rows(self, x: Tensor, channels: int) -> tuple[Tensor, Callable[[Tensor], Tensor], tuple]:
        """(rows (N, C), a function putting (N, C') rows back in x's layout, index shape)."""
        if x.dim() < 1:
            raise ValueError("the input needs a channel dimension")
        channel_dim = self._channel_dim(x)
        if x.shape[channel_dim] != channels:
            raise ValueError(f"{type(self).__name__} expects {channels} channels in dimension {channel_dim} "
                             f"of the input, got shape {tuple(x.shape)}")
        moved = x.movedim(channel_dim, -1)
        index_shape = tuple(moved.shape[:-1])

        def restore(rows: Tensor) -> Tensor:
            return rows.reshape(*index_shape, rows.shape[-1]).movedim(-1, channel_dim)

        return moved.reshape(-1, channels), restore, index_shape

    def forward(self, x: Tensor):
        rows, restore, index_shape = self._to_rows(x, self.input_channels)
        quantized, indices, loss, info = self.quantize_vectors(rows)
        return restore(quantized), indices.reshape(index_shape), loss, info

    def quantize_vectors(self, rows: Tensor):
        raise NotImplementedError

    # ------------------------------------------------------------------ codes
    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """The codebook vectors of ``indices``, channel-last (..., D)."""
        return self.codebook_vectors()[indices]

    def codebook_vectors(self) -> Tensor:
        """The vectors the decoder receives for each code, (K, D)."""
        return self.codebook

    # ------------------------------------------------------------------ schedule and noise
    def set_progress(self, step: int, total_steps: int) -> None:
        """tau_t = max(end, start * exp(-ln(start/end) t / total)) (docs/math.md#temperature-schedule)."""
        self.temperature.fill_(exponential_temperature(step, total_steps, self.temperature_start,
                                                       self.temperature_end))

    def _next_noise_offset(self) -> Tensor:
        """The noise offset of this training forward, as a 0-d int64 tensor, and count it.

        Each rank draws different noise: offset = step * world_size + rank."""
        world_size, rank = collectives.world_size_and_rank()
        offset = self.step * world_size + rank
        self.step.add_(1)
        return offset

    def _noise_state(self) -> Tensor:
        """The ops' noise key [seed, offset] for this forward: a fresh offset in
        training (counted), the current step otherwise (evaluation draws no noise).
        Tensor arithmetic on the buffers: no host sync, nothing for torch.compile to guard on."""
        offset = self._next_noise_offset() if self.training else self.step
        return torch.stack([self.seed, offset])
