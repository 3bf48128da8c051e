"""How long a run trains: a number of optimizer steps, given outright or derived once from a time budget.

Budgeted training (Li, Yumer and Ramanan, "Budgeted Training", ICLR 2020): a schedule whose decay reaches zero
where the budget ends beats a longer schedule stopped early. So `--time-budget 45m` is turned into a step count
once, early: the trainer times a few steps after the first ones (which pay for allocations and the DataLoader's
start) and one validation batch, and takes the most steps whose training, the validations of their epochs and
the export's predictions fit in what is left of the budget. From then on the run is a run of that many steps:
the learning-rate schedule's warm-up and decay end on that step, the count is checkpointed (a resumed run ends on
the same step, whatever the machine does after a restart) and recorded in the exported model. `epochs` stays a
ceiling.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field

from bincount.errors import ConfigError

DURATION_RE = re.compile(r"^(?:(?P<h>\d+(?:\.\d+)?)h)?(?:(?P<m>\d+(?:\.\d+)?)m)?(?:(?P<s>\d+(?:\.\d+)?)s)?$")
WARM_STEPS = 2          # not timed: the first steps allocate buffers and wait for the DataLoader's workers
TIMED_STEPS = 10        # timed: the rate the budget is spent at
RESERVE = 0.02          # of the budget left unplanned: checkpoints, the report, a machine that slows a little


def parse_duration(text: str) -> float:
    """Seconds of `45m`, `2h`, `1h30m`, `90s` or a plain number of seconds."""
    value = text.strip().lower().replace(" ", "")
    try:
        seconds = float(value)
    except ValueError:
        match = DURATION_RE.match(value)
        if not value or not match:
            raise ConfigError(f"time budget {text!r} is not a duration; write e.g. 45m, 2h, 1h30m or 900s") from None
        seconds = sum(float(match[unit] or 0) * scale for unit, scale in (("h", 3600), ("m", 60), ("s", 1)))
    if not seconds > 0 or math.isinf(seconds):
        raise ConfigError(f"time budget {text!r} must be a positive duration")
    return seconds


@dataclass
class Plan:
    """The run's length in optimizer steps. `total` is the ceiling until a budget decides it (`decided`)."""

    total: int
    steps_per_epoch: int
    budget_s: float = 0.0
    started: float = field(default_factory=time.monotonic)
    decided: bool = True
    taken: int = 0
    step_times: list[float] = field(default_factory=list)
    estimate: dict = field(default_factory=dict)

    @classmethod
    def make(cls, steps: int, epochs: int, steps_per_epoch: int, time_budget: str, started: float) -> "Plan":
        ceiling = epochs * steps_per_epoch
        total = min(steps, ceiling) if steps else ceiling
        budget = parse_duration(time_budget) if time_budget else 0.0
        return cls(max(1, total), steps_per_epoch, budget, started, decided=not budget)

    @property
    def epochs(self) -> int:
        return math.ceil(self.total / self.steps_per_epoch)

    def epoch_steps(self, epoch: int) -> int:
        """Optimizer steps that epoch `epoch` (from 1) takes: all of an epoch, or what is left of the total."""
        return max(0, min(self.steps_per_epoch, self.total - (epoch - 1) * self.steps_per_epoch))

    def resume(self, total: int, taken: int) -> None:
        """Continues a checkpoint's run. A budget's total was decided before any checkpoint was written and stays;
        a run of epochs or steps follows the config it resumes with (`--epochs` may extend it)."""
        if self.budget_s and total:
            self.total, self.decided = total, True
        self.taken = taken

    def timing_done(self) -> bool:
        """Whether a budget that is still open has timed enough steps to be decided now (or this epoch ends)."""
        return not self.decided and (len(self.step_times) >= WARM_STEPS + TIMED_STEPS
                                     or self.taken >= self.steps_per_epoch)

    def step_taken(self) -> None:
        self.taken += 1
        if not self.decided:
            self.step_times.append(time.monotonic())

    def decide(self, eval_batch_s: float, batch_size: int, val_images: int, export_views: int) -> int:
        """The most steps (up to the ceiling) whose training, per-epoch validation and the export's predictions of
        the validation split (`export_views` passes, 0 without test-time augmentation or calibration) end within
        the budget; raises when not even the steps already taken fit."""
        marks = self.step_times
        timed = marks[WARM_STEPS:] if len(marks) > WARM_STEPS + 1 else marks
        step_s = (timed[-1] - timed[0]) / (len(timed) - 1) if len(timed) > 1 else timed[0] - self.started
        val_s = math.ceil(val_images / batch_size) * eval_batch_s
        export_s = export_views * val_s
        left = self.budget_s * (1 - RESERVE) - (time.monotonic() - self.started) - export_s

        def needed(total: int) -> float:
            return (total - self.taken) * step_s + math.ceil(total / self.steps_per_epoch) * val_s

        fitting = self.taken + int(max(0.0, left - needed(self.taken)) / step_s) if step_s > 0 else self.total
        while fitting > self.taken and needed(fitting) > left:
            fitting -= 1
        self.estimate = {"step_s": round(step_s, 4), "validation_s": round(val_s, 2), "export_s": round(export_s, 2),
                         "setup_and_timing_s": round(time.monotonic() - self.started, 2)}
        if needed(self.taken) > left:
            raise ConfigError(
                f"time budget of {self.budget_s:g} s is too small: setup and the first {self.taken} step(s) took "
                f"{time.monotonic() - self.started:.1f} s, a step takes {step_s:.3f} s, a validation {val_s:.1f} s "
                f"and the export {export_s:.1f} s; give it more time")
        self.total, self.decided = min(self.total, max(fitting, self.taken)), True
        return self.total

    def record(self) -> dict:
        """What the checkpoint and the exported model say of the run's length."""
        return {"steps": self.total, "steps_per_epoch": self.steps_per_epoch,
                **({"time_budget_s": self.budget_s, **self.estimate} if self.budget_s else {})}
