"""Host-decided step schedules: work that runs on some steps only, decided with no device sync per step.

A block whose costly work runs only at some steps t declares a :class:`Periodic` schedule (subspace
momentum's SVD refresh at t = 1 and every multiple of ``gap``). Whether to launch that work is a host
decision, but t lives on the device (``bucket.step``, the number of applied steps) and stands still on a
step skipped for a non-finite gradient, which the host learns only by reading it back: a sync that waits
for every kernel queued so far.

:class:`StepClock` keeps the host's bounds on t instead. Each call of the compiled step advances t by one
or (skipped) by none, so after ``since`` calls since t was last read as ``known``, the coming step's t lies
in ``[known + 1, known + since + 1]``. Only when a schedule has a due step inside that window is the counter
read (a sync); otherwise no schedule is due, whatever was skipped. Without skipping
(``on_nonfinite='propagate'``) the window is one step wide and nothing is ever read. With skipping, a
periodic schedule reads twice per due step: at it, and at the next step to learn whether it was applied
(a skipped due step is due again).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["DueFlag", "Periodic", "StepClock"]


@dataclass(frozen=True)
class Periodic:
    """The steps t = 1 and every positive multiple of ``every`` (t is 1-based)."""

    every: int

    def due(self, t: int) -> bool:
        return t == 1 or t % self.every == 0

    def next_due(self, t: int) -> int:
        """The first due step at or after t."""
        return 1 if t <= 1 else -(-t // self.every) * self.every


class DueFlag:
    """One schedule's decision for the coming step as the step reads it: a (1,) bool on the host, for work
    the host launches or skips, and the same on the parameters' device, for ``torch.where`` (one tensor on
    a CPU). Written only when the decision changes: on an accelerator each write is a kernel launch."""

    def __init__(self, schedule: Periodic, device: torch.device):
        self.schedule = schedule
        self.host = torch.zeros(1, dtype=torch.bool)
        self.device = self.host if device.type == "cpu" else torch.zeros(1, dtype=torch.bool, device=device)
        self.value = False

    def set(self, value: bool) -> None:
        if value != self.value:
            self.host.fill_(value)
            if self.device is not self.host:
                self.device.fill_(value)
            self.value = value


class StepClock:
    """The host's view of one step counter, and the decisions of the schedules that count by it.

    ``counter`` holds the number of applied steps (shape (1,), on the parameters' device); it is read once
    here, where the optimizer is built or loaded, and again only when a due step may have come (above).
    """

    def __init__(self, counter: torch.Tensor, may_skip: bool, flags: Sequence[DueFlag]):
        self.counter = counter
        self.may_skip = may_skip
        self.flags = tuple(flags)
        self.reads = 0
        self.known = self._read()
        self.since = 0

    def _read(self) -> int:
        self.reads += 1
        return int(self.counter.item())

    def decide(self) -> None:
        """Set every flag for the coming step (then launch it and call :meth:`advance`)."""
        lower, upper = self.known + 1, self.known + self.since + 1
        if self.may_skip and lower < upper and any(f.schedule.next_due(lower) <= upper for f in self.flags):
            self.known, self.since = self._read(), 0
            lower = upper = self.known + 1
        exact = lower == upper or not self.may_skip
        for flag in self.flags:
            flag.set(exact and flag.schedule.due(upper))

    def advance(self) -> None:
        self.since += 1
