"""Stop a run at the first NaN or inf in a loss or a reward, before anything bad is written.

`FiniteGuard.observe(name, value, step)` records, on the device and without synchronising, the first
step at which each quantity was not finite. `FiniteGuard.check()` (called before every metrics line and
every checkpoint, so cheaply) raises `NonFiniteError` naming the quantity and the step, and where the
last good checkpoint is. Across processes the check agrees on every rank (a min-reduce of the first bad
step), so all ranks stop together instead of one waiting forever for the others at a barrier.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor


class NonFiniteError(RuntimeError):
    """A loss or reward became NaN or inf; the run stopped and wrote nothing after it.

    Attributes:
        quantity: what was not finite ("loss", "reward", ...).
        step: the optimiser step (1-based, as in metrics.jsonl) at which it first happened.
        last_checkpoint: the last good checkpoint (None if the run wrote none).
    """

    def __init__(self, quantity: str, step: int, last_checkpoint: Path | None) -> None:
        self.quantity = quantity
        self.step = step
        self.last_checkpoint = last_checkpoint
        where = (
            f"the last good checkpoint is {last_checkpoint} (resume from it with a lower learning rate "
            "or a smaller beta)"
            if last_checkpoint is not None
            else "no checkpoint was written before it"
        )
        super().__init__(f"step {step}: the {quantity} became NaN or inf; the run stopped. {where}")


class FiniteGuard:
    """Records the first non-finite step of each observed quantity (see the module doc)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.names: list[str] = []
        self._first_bad: dict[str, Tensor] = {}

    def observe(self, name: str, value: Tensor | float, step: int) -> None:
        """Note whether every entry of `value` is finite at (1-based) step `step`."""
        if name not in self._first_bad:
            self.names.append(name)
            self._first_bad[name] = torch.tensor(math.inf, device=self.device)
        value = torch.as_tensor(value, device=self.device)
        bad = ~torch.isfinite(value.detach()).all()
        current = self._first_bad[name]
        self._first_bad[name] = torch.where(
            bad, torch.minimum(current, current.new_tensor(float(step))), current
        )

    def first_bad(self) -> tuple[str, int] | None:
        """(quantity, step) of the earliest non-finite value seen on any process, or None."""
        if not self.names:
            return None
        steps = torch.stack([self._first_bad[n] for n in self.names])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            steps = steps.clone()
            torch.distributed.all_reduce(steps, op=torch.distributed.ReduceOp.MIN)
        worst = int(torch.argmin(steps))
        step = float(steps[worst])
        if math.isinf(step):
            return None
        return self.names[worst], int(step)

    def check(self, last_checkpoint: Path | None) -> None:
        """Raise `NonFiniteError` if any observed value was not finite."""
        bad = self.first_bad()
        if bad is not None:
            raise NonFiniteError(bad[0], bad[1], last_checkpoint)
