"""The training step's numbers, kept on the device and read only when asked.

A ``float(loss)`` after every step makes the host wait for the device at
every step (nanoGPT and torchtitan read their metrics every N steps for that
reason). ``StepMetrics.add`` only adds tensors on the device: the sums of
the epoch, the sums since the last read, and which terms went non-finite
(and first at which step). ``read`` brings them all to the host in one
transfer; the training loop calls it every ``--log-every`` steps and at the
end of an epoch, and nowhere else."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# The loss terms whose finiteness the step checks, as a user reads them.
TERM_NAMES = {"mse": "reconstruction", "loss/latent": "latent", "loss/kl_uniform": "KL",
              "loss/commitment": "commitment", "loss": "total loss", "grad_norm": "gradient norm"}


@dataclass
class Reading:
    """What ``StepMetrics.read`` returns: host numbers."""
    epoch_means: dict[str, float]     # mean over the epoch's steps so far
    window_means: dict[str, float]    # mean over the steps since the previous read
    nonfinite_terms: list[str]        # names (TERM_NAMES) of terms that were NaN or inf at some step
    first_nonfinite_step: int | None  # the first such step (1-based, the count after it), or None


class StepMetrics:
    """Running sums of the training step's scalars, on ``device``.

    The set of names is fixed by the first ``add``; every later step must
    give the same names (the quantizer's info always has the same keys)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.names: list[str] | None = None
        self.epoch_sums = self.window_sums = self.nonfinite = None
        self.first_nonfinite_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.epoch_steps = self.window_steps = 0

    def add(self, scalars: dict[str, Tensor], step: int) -> Tensor:
        """Adds one step's 0-dim tensors; returns the device flag "all finite"."""
        if self.names is None:
            self._start(list(scalars))
        values = torch.stack([scalars[name].detach().reshape(()).to(torch.float64) for name in self.names])
        finite = torch.isfinite(values)
        self.epoch_sums += values
        self.window_sums += values
        self.nonfinite |= ~finite
        all_finite = finite.all()
        self.first_nonfinite_step = torch.where(~all_finite & (self.first_nonfinite_step < 0),
                                                torch.full_like(self.first_nonfinite_step, step),
                                                self.first_nonfinite_step)
        self.epoch_steps += 1
        self.window_steps += 1
        return all_finite

    def nonfinite_terms(self, scalars: dict[str, Tensor]) -> list[str]:
        """The names (TERM_NAMES) of the NaN or infinite scalars: a host read."""
        finite = torch.isfinite(torch.stack([value.detach().reshape(()).to(torch.float64)
                                             for value in scalars.values()])).tolist()
        return [TERM_NAMES.get(name, name) for name, ok in zip(scalars, finite) if not ok]

    def read(self) -> Reading:
        """Everything, in one device-to-host transfer; starts a new window."""
        if self.names is None:
            return Reading({}, {}, [], None)
        packed = torch.cat([self.epoch_sums, self.window_sums, self.nonfinite.to(torch.float64),
                            self.first_nonfinite_step.reshape(1).to(torch.float64)]).tolist()
        count = len(self.names)
        epoch, window = packed[:count], packed[count:2 * count]
        bad, first = packed[2 * count:3 * count], packed[3 * count]
        reading = Reading(
            {name: total / max(self.epoch_steps, 1) for name, total in zip(self.names, epoch)},
            {name: total / max(self.window_steps, 1) for name, total in zip(self.names, window)},
            [TERM_NAMES.get(name, name) for name, flag in zip(self.names, bad) if flag],
            None if first < 0 else int(first))
        self.window_sums.zero_()
        self.window_steps = 0
        return reading

    def start_epoch(self) -> None:
        if self.names is not None:
            self.epoch_sums.zero_()
            self.window_sums.zero_()
        self.epoch_steps = self.window_steps = 0

    def state(self) -> dict:
        """The epoch's sums so far, for a checkpoint taken mid-epoch."""
        return {"names": list(self.names or []), "sums": None if self.names is None else self.epoch_sums.cpu(),
                "steps": self.epoch_steps}

    def load_state(self, state: dict) -> None:
        if not state["names"]:
            return
        self._start(list(state["names"]))
        self.epoch_sums.copy_(state["sums"])
        self.epoch_steps = int(state["steps"])

    def _start(self, names: list[str]) -> None:
        self.names = names
        zeros = torch.zeros(len(names), dtype=torch.float64, device=self.device)
        self.epoch_sums, self.window_sums = zeros.clone(), zeros.clone()
        self.nonfinite = torch.zeros(len(names), dtype=torch.bool, device=self.device)
