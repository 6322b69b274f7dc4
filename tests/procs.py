"""Run a launcher (torchrun, accelerate) in its own process group and kill the whole group on any exit."""

from __future__ import annotations

import os
import signal
import socket
import subprocess


def free_port() -> int:
    """A TCP port free on this machine now, so that two test runs at once do not collide on a launcher's default."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(**extra: str) -> dict[str, str]:
    """This process's environment for a launched one, without what earlier in-process Trainer runs left behind:
    TrainingArguments export ACCELERATE_* variables (mixed precision among them) that a launched Trainer would
    read as its own settings (transformers 4.x does: a leaked bf16 turned DeepSpeed's "auto" bf16 on)."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}, **extra}


def run_process_group(cmd: list[str], timeout: int, **popen_kwargs) -> tuple[int, str]:
    """Return (exit code, combined output); children never outlive the call, even on timeout or error."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            **popen_kwargs)
    try:
        log, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, log
