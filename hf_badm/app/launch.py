"""Run-time notes about how a run was launched: a multi-process launch that trains alone, and DeepSpeed's
first build of its CPU communication extension (minutes, otherwise silent); and the notices of the libraries
that a user of the command line cannot act on, silenced."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import TrainingArguments

_TRUE = ("1", "true", "yes", "on")


def single_process_note(world_size: int, env: Mapping[str, str] = os.environ) -> str | None:
    """Why a launch that asked for several processes trains in one, or None.

    torchrun-style launchers set WORLD_SIZE for every worker; on a CPU machine the workers form one group
    only with ``use_cpu``. Accelerate's ``--cpu`` launcher starts ONE process (several only under mpirun)
    and sets MASTER_ADDR only when more were asked for."""
    if world_size > 1:
        return None
    launched = env.get("WORLD_SIZE", "1")
    if launched.isdigit() and int(launched) > 1:
        return (f"the launcher started {launched} processes, but this one trains alone (world size 1): on a CPU "
                "machine add --use_cpu true so they form one process group")
    if env.get("ACCELERATE_USE_CPU", "").lower() in _TRUE and "MASTER_ADDR" in env:
        return ("accelerate launch --cpu asked for several processes but started one (its CPU launcher starts "
                "several only under mpirun): this run trains alone. For N CPU processes use `torchrun "
                "--nproc_per_node N -m hf_badm train ... --use_cpu true` or `accelerate launch --config_file "
                "recipes/launch/ddp-cpu.yaml -m hf_badm train ... --use_cpu true`")
    return None


def warn_single_process(world_size: int) -> None:
    if note := single_process_note(world_size):
        print(f"hf-badm: warning: {note}", file=sys.stderr, flush=True)


def unbuilt_deepspeed_op() -> str | None:
    """The DeepSpeed communication op that its first initialisation on this machine would compile, if any."""
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        return None
    import deepspeed.ops
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import get_default_build_root

    if not deepspeed.ops.__compatible_ops__.get(builder.NAME, False) or installed_ops.get(builder.NAME, False):
        return None
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    built = [*root.glob(f"{builder.NAME}/{builder.NAME}*.so"), *root.glob(f"*/{builder.NAME}/{builder.NAME}*.so")]
    return None if built else builder.NAME


def announce_deepspeed_build() -> None:
    """Say (once, on the first process) that DeepSpeed is about to compile, before it starts."""
    if os.environ.get("RANK", "0") == "0" and (name := unbuilt_deepspeed_op()):
        print(f"hf-badm: DeepSpeed builds its {name} extension on its first run on this machine (a few minutes, "
              "once; later runs reuse it)", file=sys.stderr, flush=True)


class _Unactionable(logging.Filter):
    """transformers' "`loss_type=None` was set in the config but it is unrecognized" on every GPT-2 run: the
    default it falls back to is the right loss, and the config is the model's, not the user's."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "loss_type=None" not in record.getMessage()


def quiet_environment() -> None:
    """On a machine without an accelerator, name the CPU for DeepSpeed (before it loads), so it does not announce
    on every run that it guessed it."""
    if "DS_ACCELERATOR" not in os.environ and not _has_accelerator():
        os.environ["DS_ACCELERATOR"] = "cpu"


def quiet_run(args: TrainingArguments) -> None:
    """Once the model and data are loaded (their downloads keep their progress bars): no pin_memory warning where
    there is no accelerator to pin for, no loss_type notice, no progress bar per saved model shard."""
    from transformers.utils import logging as hf_logging

    if args.dataloader_pin_memory and not _has_accelerator():
        args.dataloader_pin_memory = False
    logging.getLogger("transformers.modeling_utils").addFilter(_Unactionable())
    hf_logging.disable_progress_bar()


def _has_accelerator() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
