"""Test-only fault injection, read from ``HF_BADM_FAULT`` here and nowhere else; unset, nothing changes.

``HF_BADM_FAULT=<point>[:SIGINT]`` sends this process SIGTERM (or the signal named) when a run reaches a named
point (``twice``: at ``mid_run``, and again 20 ms later); ``HF_BADM_FAULT=enospc:<file name>[@n]`` makes the
n-th write (default 1st) of a file of that name fail as on a full disk, after a partial write. The
fault-injection tests drive the CLI with these.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
from pathlib import Path
from typing import Any, Callable

POINTS = ("start", "first_step", "mid_run", "checkpoint_save", "final_eval", "final_save", "twice")
_FAULT, _, _ARG = os.environ.get("HF_BADM_FAULT", "").partition(":")
_fired: set[str] = set()
_writes: list[str] = []


def fault(point: str) -> None:
    """Send the signal ``HF_BADM_FAULT`` names when the run reaches ``point`` (once per process)."""
    if point not in (_FAULT, "mid_run" if _FAULT == "twice" else None) or point in _fired:
        return
    _fired.add(point)
    signum = signal.Signals[_ARG or "SIGTERM"]
    os.kill(os.getpid(), signum)
    if _FAULT == "twice":
        threading.Timer(0.02, os.kill, (os.getpid(), signum)).start()


def install() -> None:
    """Make the writers of model, optimizer, state and text files fail on the write ``enospc:<name>[@n]`` names."""
    if _FAULT != "enospc":
        return
    import builtins
    import io

    import safetensors.torch
    import torch
    import transformers.modeling_utils as modeling

    def failing(write: Callable[..., Any], at: int) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            target = args[at] if len(args) > at else kwargs.get("filename", kwargs.get("f", kwargs.get("file")))
            mode = args[1] if write is _open and len(args) > 1 else kwargs.get("mode", "r")
            name, _, nth = _ARG.partition("@")
            if isinstance(target, (str, os.PathLike)) and Path(target).name == name and (write is not _open or
                                                                                      set(mode) & set("wax+")):
                _writes.append(name)
                if len(_writes) == int(nth or 1):
                    if write is not _open:
                        with _open(target, "wb") as partial:  # the partial file a full disk leaves behind
                            partial.write(b"\0" * 8)
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
            return write(*args, **kwargs)
        return wrapped

    _open = builtins.open
    builtins.open = io.open = failing(_open, 0)
    torch.save = failing(torch.save, 1)
    safetensors.torch.save_file = failing(safetensors.torch.save_file, 1)
    modeling.safe_save_file = failing(modeling.safe_save_file, 1)
