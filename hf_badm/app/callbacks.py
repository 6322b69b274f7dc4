"""Trainer callbacks of a CLI run: the wall clock in the logs, a clean stop on SIGTERM/SIGINT, a stop when the
optimizer can no longer take a step, no step past max_steps on resume, and the whole run's totals.

The stops only ask the Trainer's own loop to end (``control``); ``hf_badm.app.run`` turns them into one line and
an exit code after ``train`` returns.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from transformers import TrainerCallback

from hf_badm.app import RunEnded
from hf_badm.app.faults import fault
from hf_badm.trainer import find_badm

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Clock(TrainerCallback):
    """Wall-clock seconds since training began, stamped on every log entry (for loss-vs-time plots)."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and state.log_history:
            state.log_history[-1]["wall_time"] = time.perf_counter() - self.start


class Stopped(BaseException):
    """A stop by signal that cannot wait for the step's end. A BaseException, as KeyboardInterrupt is, so that no
    ``except Exception`` on its way (data loaders, the Trainer) swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopOnSignal(TrainerCallback):
    """SIGTERM (what schedulers and preemptible clusters send before a kill) or SIGINT. While training, the
    optimizer step in progress finishes, a checkpoint is saved and the loop ends, on every rank at the same
    step. Before training, after it (``phase`` "final": evaluation and final files) or on a second signal,
    ``Stopped`` is raised at once, and ``hf_badm.app.run`` keeps what is complete. Several ranks finish their
    final files instead (one rank leaving alone would leave the others waiting in a collective). A context
    manager around the run: the process's own handlers come back on exit."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.phase, self.step, self.world_size, self.signals = "setup", 0, 1, 0
        self.quiet = False  # once the run reports its stop, later signals change nothing
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.quiet:
            return
        self.signals += 1
        first, self.received = self.received is None, self.received or signum
        if first and (self.phase == "training" or (self.phase == "final" and self.world_size > 1)):
            return  # at the step's end, or once the final files are written
        raise Stopped(self.received)

    def on_train_begin(self, args, state, control, **kwargs):
        self.phase, self.step, self.world_size = "training", state.global_step, args.world_size

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            fault("first_step")

    def on_step_end(self, args, state, control, **kwargs):
        self.step = state.global_step
        if state.global_step == max(1, state.max_steps // 2):
            fault("mid_run")
        if _any_rank(self.received is not None, args):
            self.received = self.received or signal.SIGTERM  # another rank's signal
            control.should_save = control.should_training_stop = True

    def on_prediction_step(self, args, state, control, **kwargs):
        if self.phase == "final":
            fault("final_eval")


class NothingToTrain(Exception):
    """Raised before the first step of a run resumed at its max_steps: the Trainer would train one step more."""


class AtMaxSteps(TrainerCallback):
    """Ends ``train`` before any step when the resumed state already holds max_steps (the model and state are
    loaded by then); the run then writes its final files from that state."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            raise NothingToTrain


class RunTotals(TrainerCallback):
    """The whole run's sum of step losses, steps and the steps' own seconds. Saved in every checkpoint
    (``FILE``) and restored on resume, so that a resumed run's train_loss and tokens per second cover the run
    it continues (the Trainer's cover only the steps of its own ``train`` call)."""

    FILE = "hf_badm_totals.json"

    def __init__(self) -> None:
        self.loss: float | torch.Tensor = 0.0
        self.steps, self.seconds, self._began = 0, 0.0, 0.0

    def add_loss(self, loss: torch.Tensor) -> None:
        """One micro-batch's loss (its share of the step's mean), kept on its device: no sync per step."""
        loss = loss.detach().double()
        self.loss = self.loss + torch.where(torch.isfinite(loss), loss, torch.zeros_like(loss))

    def on_step_begin(self, args, state, control, **kwargs):
        self._began = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1
        self.seconds += time.perf_counter() - self._began

    def save(self, folder: Path) -> None:
        (folder / self.FILE).write_text(json.dumps({"loss_sum": float(self.loss), "steps": self.steps,
                                                    "seconds": self.seconds}))

    def restore(self, folder: Path) -> bool:
        """The totals of the run a checkpoint continues; False when it has none (a checkpoint of another tool)."""
        try:
            saved = json.loads((folder / self.FILE).read_text())
            self.loss, self.steps, self.seconds = float(saved["loss_sum"]), int(saved["steps"]), float(saved["seconds"])
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return True

    def summary(self, tokens: int | None) -> dict[str, float | None]:
        seconds = self.seconds or None
        return {"train_loss": float(self.loss) / self.steps if self.steps else None, "train_steps_seconds": self.seconds,
                "tokens_per_second": tokens / seconds if tokens and seconds else None}


class StopWhenStuck(TrainerCallback):
    """Ends training after ``limit`` consecutive optimizer steps that BADM skipped for a non-finite gradient
    (weights or loss no longer finite: every later step would be skipped too), without saving."""

    def __init__(self, limit: int) -> None:
        self.limit, self.run, self.seen = limit, 0, 0
        self.stuck_at: int | None = None

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        badm = find_badm(optimizer)
        if badm is None:
            return
        self.run = self.run + 1 if badm.skipped_steps > self.seen else 0
        self.seen = badm.skipped_steps
        if self.run >= self.limit:
            self.stuck_at = state.global_step
            control.should_training_stop, control.should_save = True, False

    def ended(self) -> RunEnded | None:
        if self.stuck_at is None:
            return None
        return RunEnded(f"stopped at step {self.stuck_at}: the last {self.limit} optimizer steps were all skipped for "
                        "NaN/Inf gradients (learning rate or weight decay too large?); no model written", 1)


def _any_rank(flag: bool, args: Any) -> bool:
    """True on every rank when it is True on one (all ranks must stop at the same step)."""
    if args.world_size <= 1 or not torch.distributed.is_initialized():
        return flag
    t = torch.tensor([float(flag)], device=args.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())
