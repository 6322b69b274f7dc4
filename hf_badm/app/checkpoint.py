"""What an exact resume needs from its checkpoint, checked before anything is loaded or written.

The Trainer resumes without complaint from a checkpoint that lacks ``scheduler.pt`` (it then loads neither
the optimizer nor the schedule) or ``rng_state*.pth`` (another data order and dropout): a run that silently
differs from the one it continues. Here every file the Trainer and BADM read is present and readable, or
the run is refused naming it; ``--allow_partial_resume true`` resumes without the missing ones, saying so.
"""

from __future__ import annotations

import json
import re
import sys
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from hf_badm.app import RecipeError

if TYPE_CHECKING:
    from transformers import TrainingArguments

SLOT_PATTERN = re.compile(r"badm_slots_rank(\d+)-of-(\d+)\.pt$")  # hf_badm.trainer.SLOT_FILE
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "adapter_model.safetensors")
# why each file matters, for the message that names a missing one
WHY = {"scheduler.pt": "the learning-rate schedule (and the optimizer state with it) would restart",
       "optimizer.pt": "the optimizer state (BADM's dual, momentum) would restart",
       "rng_state": "the data order and dropout would differ from the run it continues",
       "badm_slots": "per-sub-batch slots of the other ranks would be lost",
       "latest": "DeepSpeed would not find its optimizer state",
       "weights": "there are no model weights to resume"}


def verify_checkpoint(checkpoint: str, args: TrainingArguments, allow_partial: bool = False) -> None:
    """Refuse (``RecipeError`` naming the file) a checkpoint with a missing or unreadable file; with
    ``allow_partial`` missing files are reported on stderr and the resume goes on. Unreadable ones never pass."""
    ckpt = Path(checkpoint)
    _read_state(ckpt / "trainer_state.json")
    missing: list[tuple[str, str]] = []
    if args.deepspeed:  # DeepSpeed keeps optimizer and schedule in the folder its `latest` file names
        tag = (ckpt / "latest").read_text().strip() if (ckpt / "latest").is_file() else None
        missing += [] if tag and (ckpt / tag).is_dir() else [(f"{tag}/" if tag else "latest", "latest")]
    else:
        missing += _need(ckpt, "scheduler.pt", "scheduler.pt")
    if not (args.deepspeed or args.fsdp):  # FSDP and DeepSpeed save sharded optimizer and weights their own way
        missing += _need(ckpt, "optimizer.pt", "optimizer.pt")
        if not any((ckpt / w).is_file() for w in WEIGHTS):
            missing.append((WEIGHTS[0], "weights"))
    missing += _rng_files(ckpt, args.world_size)
    missing += _slot_files(ckpt)
    for path in sorted(ckpt.iterdir()):
        _check_readable(path)
    if not missing:
        return
    named = "; ".join(f"{ckpt / name} is missing: {WHY[why]}" for name, why in missing)
    if not allow_partial:
        raise RecipeError(f"resume_from_checkpoint: {named} (--allow_partial_resume true resumes anyway)")
    print(f"hf-badm: warning: partial resume (--allow_partial_resume): {named}", file=sys.stderr, flush=True)


def _need(ckpt: Path, name: str, why: str) -> list[tuple[str, str]]:
    return [] if (ckpt / name).is_file() else [(name, why)]


def _rng_files(ckpt: Path, world_size: int) -> list[tuple[str, str]]:
    """This layout's RNG files; a checkpoint saved on another world size needs all of its own ranks' files."""
    ranks = sorted(int(m.group(1)) for p in ckpt.glob("rng_state_*.pth") if (m := re.search(r"_(\d+)\.pth$", p.name)))
    if (ckpt / "rng_state.pth").is_file() and not ranks:
        return []
    if not ranks:
        return [("rng_state.pth" if world_size <= 1 else f"rng_state_{r}.pth", "rng_state") for r in range(world_size)]
    saved = max(ranks[-1] + 1, world_size if world_size > 1 else 0)
    return [(f"rng_state_{r}.pth", "rng_state") for r in range(saved) if r not in ranks]


def _slot_files(ckpt: Path) -> list[tuple[str, str]]:
    """Per-sub-batch slot files come one per rank of the saving world: all of them or none."""
    found = [m for p in ckpt.glob("badm_slots_rank*.pt") if (m := SLOT_PATTERN.search(p.name))]
    worlds = {int(m.group(2)) for m in found}
    ranks = {int(m.group(1)) for m in found}
    return [(f"badm_slots_rank{r}-of-{w}.pt", "badm_slots") for w in sorted(worlds) for r in range(w) if r not in ranks]


def _read_state(path: Path) -> None:
    if not path.is_file():
        raise RecipeError(f"resume_from_checkpoint: {path} is missing (the Trainer writes it last: an incomplete "
                          "checkpoint)")
    try:
        state = json.loads(path.read_text())
        int(state["global_step"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise RecipeError(f"resume_from_checkpoint: {path} is unreadable ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else 'no global_step'})") from None


def _check_readable(path: Path) -> None:
    """Torch files are zip archives whose members carry CRCs: a truncated or damaged one fails here, not mid-load."""
    if not path.is_file():
        return
    try:
        if path.suffix in (".pt", ".pth", ".bin"):
            if not zipfile.is_zipfile(path):
                raise ValueError("not a complete torch file (truncated?)")
            with zipfile.ZipFile(path) as z:
                if (bad := z.testzip()) is not None:
                    raise ValueError(f"member {bad} is damaged")
        elif path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                f.keys()
        elif path.suffix == ".json":
            json.loads(path.read_text())
    except Exception as err:  # noqa: BLE001 (zip, safetensors and json fail with many types)
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RecipeError(f"resume_from_checkpoint: {path} is unreadable ({reason})") from None
