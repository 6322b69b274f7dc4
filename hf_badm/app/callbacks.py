"""Trainer callbacks of a CLI run: the wall clock in the logs, a clean stop on SIGTERM/SIGINT, and a stop when
the optimizer can no longer take a step.

The stops only ask the Trainer's own loop to end (``control``); ``hf_badm.app.run`` turns them into one line and
an exit code after ``train`` returns.
"""

from __future__ import annotations

import signal
import time
from types import FrameType
from typing import Any

import torch
from transformers import TrainerCallback

from hf_badm.app import RunEnded
from hf_badm.trainer import find_badm

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Clock(TrainerCallback):
    """Wall-clock seconds since training began, stamped on every log entry (for loss-vs-time plots)."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and state.log_history:
            state.log_history[-1]["wall_time"] = time.perf_counter() - self.start


class StopOnSignal(TrainerCallback):
    """SIGTERM (what schedulers and preemptible clusters send before a kill) or SIGINT while training: the
    optimizer step in progress finishes, a complete checkpoint is saved, and the loop ends. Before training
    the run ends at once (nothing to save); a second signal ends it at once too. Used as a context manager
    around the run: the process's own handlers come back on exit."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.training = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.training or self.received is not None:
            raise RunEnded(f"stopped by {signal.Signals(signum).name} before a checkpoint could be saved", 128 + signum)
        self.received = signum

    def on_train_begin(self, args, state, control, **kwargs):
        self.training = True

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False

    def on_step_end(self, args, state, control, **kwargs):
        if _any_rank(self.received is not None, args):
            self.received = self.received or signal.SIGTERM  # another rank's signal
            control.should_save = control.should_training_stop = True

    def ended(self, output_dir: str, step: int) -> RunEnded | None:
        """What to tell the user after a stop by signal (None when training was not stopped)."""
        if self.received is None:
            return None
        return RunEnded(f"stopped by {signal.Signals(self.received).name} at step {step}: checkpoint saved to "
                        f"{output_dir}/checkpoint-{step}; continue with --resume_from_checkpoint",
                        128 + self.received)


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
