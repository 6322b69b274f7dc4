"""The output_dir of a run: writable, never a finished run replaced by mistake, owned by one run at a time.

``check_output_dir`` runs before anything is loaded or written and returns the checkpoint to resume from;
``OutputDirLock`` is taken just before the first write and released on any exit of the process that holds it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING

from hf_badm.app import RecipeError, RunEnded
from hf_badm.app.arguments import TaskArguments
from hf_badm.app.checkpoint import STAGING, incomplete, latest_checkpoint

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
        resume = latest_checkpoint(out, partial=task_args.allow_partial_resume)
        if resume is None and not finished_files(out):
            newest = newest_checkpoint(out)
            why = f": {incomplete(newest)}" if newest is not None else " (a checkpoint-N folder)"
            raise RecipeError(f"resume_from_checkpoint: no complete checkpoint in {out}{why}")
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


def newest_checkpoint(out: Path) -> Path | None:
    """The highest-numbered ``checkpoint-N`` folder, complete or not."""
    return max((d for d in out.glob("checkpoint-*") if d.name.split("-")[-1].isdigit() and d.is_dir()),
               key=lambda d: int(d.name.split("-")[-1]), default=None)


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
    """What marks ``out`` as holding a finished run: metrics.json (written last), or a model with no checkpoints
    beside it (a model directory). A model beside checkpoints without metrics.json is a run stopped while
    writing its final files: resuming completes it."""
    if (out / "metrics.json").exists():
        return ["metrics.json"]
    if any(out.glob("checkpoint-*")):
        return []
    return [f for f in MODEL_FILES if (out / f).exists()]


def finished_step(out: Path) -> int | None:
    """The last optimizer step of the finished run in ``out`` (from its metrics.json), None if unknown."""
    try:
        history = json.loads((out / "metrics.json").read_text())["log_history"]
        return max(int(h["step"]) for h in history if "step" in h)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def clear_replaced_run(out: Path) -> None:
    """What ``--overwrite_output_dir`` replaces, before the new run writes: the old run's finished marker
    (metrics.json) and checkpoints, which a later resume must not continue. Links are removed, not followed."""
    for old in [out / "metrics.json", *out.glob("checkpoint-*")]:
        if old.is_symlink() or old.is_file():
            old.unlink()
        elif old.is_dir():
            shutil.rmtree(old)


def clear_staging(out: Path) -> None:
    """What a run killed mid-write left in the staging folder: never complete, never published. A link there is
    removed, not followed."""
    staging = out / STAGING
    if staging.is_symlink() or staging.is_file():
        staging.unlink()
    shutil.rmtree(staging, ignore_errors=True)


class OutputDirLock:
    """An exclusive ``flock`` on ``output_dir/.hf-badm.lock``: the kernel releases it when its holder ends in any
    way (crash, SIGKILL, full disk), so no lock is ever stale; the pid and host written in the file only name
    the holder to a refused run. Removes the directory on release when it created it and nothing else was
    written (a refused run leaves no empty output_dir)."""

    def __init__(self, out: str | Path) -> None:
        self.out, self.fd = Path(out), None
        self.path = self.out / LOCK_FILE
        self.created_dir = not self.out.exists()

    def acquire(self) -> OutputDirLock:
        self.out.mkdir(parents=True, exist_ok=True)
        while self.fd is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as err:
                self.release()
                raise RecipeError(f"output_dir {self.out}: cannot open {self.path} ({err.strerror}"
                                  f"{'; it is a symbolic link: remove it' if err.errno == errno.ELOOP else ''})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self.release()
                raise RecipeError(f"output_dir {self.out} is in use by another run ({self._holder()})") from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
            else:  # its holder removed the file meanwhile: lock the one there now
                os.close(fd)
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()
        try:
            os.ftruncate(self.fd, 0)
            if os.write(self.fd, info) != len(info):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as err:
            free = shutil.disk_usage(self.out).free
            self.release()
            raise RunEnded(f"cannot write {self.path} ({err.strerror}; {free >> 10} KiB free, it needs "
                           f"{len(info)} bytes): free some space and run again", 1) from None
        return self

    def _holder(self) -> str:
        try:
            owner = json.loads(self.path.read_text())
            return f"pid {int(owner['pid'])} on {owner['host']}"
        except (OSError, ValueError, KeyError, TypeError):
            return f"it has not written its pid in {self.path} yet"

    def release(self) -> None:
        if self.fd is not None:
            with suppress(OSError):
                (self.out / STAGING).rmdir()  # when empty: nothing is being written any more
            self.path.unlink(missing_ok=True)  # while still held: a run that opened it meanwhile sees it gone
            os.close(self.fd)
            self.fd = None
        if self.created_dir and self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()

    def __enter__(self) -> OutputDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
