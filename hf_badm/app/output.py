"""The output_dir of a run: writable, never a finished run replaced by mistake, owned by one run at a time.

``check_output_dir`` runs before anything is loaded or written and returns the checkpoint to resume from;
``OutputDirLock`` is taken just before the first write and released on any exit of the process that holds it.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_badm.app import RecipeError, RunEnded
from hf_badm.app.arguments import TaskArguments

if TYPE_CHECKING:
    from transformers import TrainingArguments

MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "adapter_model.safetensors",
               "metrics.json")
LOCK_FILE = ".hf-badm.lock"
_TRUE = ("1", "true", "yes", "on")


def check_writable(out: Path) -> None:
    """output_dir is a directory (or can become one) that this process can write into; probed with an unnamed
    temporary file, so nothing is left behind."""
    if out.exists() and not out.is_dir():
        raise RecipeError(f"output_dir {out} is a file, not a directory")
    probe = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not probe.is_dir():
        raise RecipeError(f"output_dir {out}: {probe} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        raise RecipeError(f"output_dir {out}: cannot write in {probe} ({err.strerror or err})") from None


def check_output_dir(args: TrainingArguments, task_args: TaskArguments) -> str | None:
    """Refuse to replace a finished run; returns the checkpoint to resume from (latest complete one for `true`).

    Resuming a finished run whose max_steps is reached is nothing to do (``RunEnded`` with code 0): nothing is
    trained or written."""
    out, resume = Path(args.output_dir), args.resume_from_checkpoint
    check_writable(out)
    if resume is not None and str(resume).lower() in ("false", "no", "none", ""):
        resume = None
    if resume is not None and str(resume).lower() in _TRUE + ("latest",):
        resume = latest_checkpoint(out)
        if resume is None and not finished_files(out):
            raise RecipeError(f"resume_from_checkpoint: no complete checkpoint in {out} (a checkpoint-N folder with "
                              "trainer_state.json)")
    elif resume is not None and not (Path(resume) / "trainer_state.json").is_file():
        raise RecipeError(f"resume_from_checkpoint: {resume} is not a complete checkpoint (no trainer_state.json)")
    if task_args.overwrite_output_dir or not out.is_dir():
        return resume
    if finished := finished_files(out):
        if args.resume_from_checkpoint is not None and str(args.resume_from_checkpoint).lower() not in ("false", "no",
                                                                                                      "none", ""):
            _resume_into_finished(out, resume, args.max_steps)
        raise RecipeError(f"output_dir {out} holds a finished run ({finished[0]}): choose another output_dir, or "
                          "--overwrite_output_dir true to replace it")
    if resume is None and any(out.glob("checkpoint-*")):
        raise RecipeError(f"output_dir {out} holds checkpoints of an unfinished run: --resume_from_checkpoint to "
                          "continue it, or --overwrite_output_dir true to start over")
    return resume


def _resume_into_finished(out: Path, resume: str | None, max_steps: int) -> None:
    """A resume into a finished run: nothing to do when it reached max_steps, else refused (it would replace it)."""
    if resume is not None and Path(resume).resolve().parent != out.resolve():
        raise RecipeError(f"resume_from_checkpoint: {resume} is not a checkpoint of output_dir {out}, which holds a "
                          "finished run: resume into another output_dir, or --overwrite_output_dir true to replace it")
    step = finished_step(out)
    if step is not None and (max_steps == -1 or max_steps <= step):
        raise RunEnded(f"output_dir {out} holds a finished run (step {step}, max_steps reached): nothing to resume, "
                       "nothing written", code=0)
    reached = f"stopped at step {step}" if step is not None else "finished"
    raise RecipeError(f"output_dir {out} holds a finished run ({reached}): resuming it to max_steps {max_steps} would "
                      "replace its model and metrics; add --overwrite_output_dir true to do so")


def finished_files(out: Path) -> list[str]:
    return [f for f in MODEL_FILES if (out / f).exists()]


def finished_step(out: Path) -> int | None:
    """The last optimizer step of the finished run in ``out`` (from its metrics.json), None if unknown."""
    try:
        history = json.loads((out / "metrics.json").read_text())["log_history"]
        return max(int(h["step"]) for h in history if "step" in h)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def latest_checkpoint(out: Path) -> str | None:
    """The highest ``checkpoint-N`` whose trainer_state.json (the Trainer writes it last) exists."""
    complete = [d for d in out.glob("checkpoint-*") if d.name.split("-")[-1].isdigit()
                and (d / "trainer_state.json").is_file()]
    return str(max(complete, key=lambda d: int(d.name.split("-")[-1]))) if complete else None


def _start_ticks(pid: int) -> str | None:
    """When the process started (clock ticks since boot, Linux), so a reused pid is not taken for the owner."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(owner: dict[str, Any]) -> bool:
    pid = int(owner.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0
    ticks = owner.get("start_ticks")
    return ticks is None or _start_ticks(pid) in (None, ticks)


class OutputDirLock:
    """``output_dir/.hf-badm.lock`` (pid, host, start time), created atomically: a second run into the same
    output_dir is refused while the first lives. A lock left by a process that died (same host, pid gone or
    reused) is stale: it is replaced, with a note. Removes the directory on release when it created it and
    nothing else was written (a refused run leaves no empty output_dir)."""

    def __init__(self, out: str | Path) -> None:
        self.out, self.held = Path(out), False
        self.path = self.out / LOCK_FILE
        self.created_dir = not self.out.exists()

    def acquire(self) -> OutputDirLock:
        self.out.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "start_ticks": _start_ticks(os.getpid())}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner.get("host") != me["host"] or _alive(owner):
                    self.release()
                    raise RecipeError(f"output_dir {self.out} is in use by another run (pid {owner.get('pid', '?')} on "
                                      f"{owner.get('host', '?')}); if that run is gone, delete {self.path}") from None
                print(f"hf-badm: note: replacing the stale lock of pid {owner.get('pid', '?')} (no longer running) in "
                      f"{self.out}", flush=True)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise RecipeError(f"output_dir {self.out}: could not take {self.path} (another run took it meanwhile)")

    def _owner(self) -> dict[str, Any]:
        try:
            owner = json.loads(self.path.read_text())
            return owner if isinstance(owner, dict) else {}
        except (OSError, ValueError):
            return {}  # unreadable or being written: no host matches, so it counts as alive

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
        if self.created_dir and self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()

    def __enter__(self) -> OutputDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
