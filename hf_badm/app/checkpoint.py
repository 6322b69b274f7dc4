"""Checkpoints written whole and resumed exactly, checked before anything is loaded or written.

A checkpoint is written into a staging folder and renamed into place once complete, with a manifest of every
file's sha256: a stop or a full disk mid-save leaves the earlier checkpoints as they were, and a file changed
or damaged since it was saved is seen before resuming. The Trainer resumes without complaint from a checkpoint
that lacks ``scheduler.pt`` (it then loads neither the optimizer nor the schedule) or ``rng_state*.pth``
(another data order and dropout): here every file the Trainer and BADM read is present, readable and as
saved, or the run is refused naming it; ``--allow_partial_resume true`` resumes without the missing ones that
a resume can do without, saying so.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_badm.app import RecipeError, RunEnded
from hf_badm.app.callbacks import SIGNALS, RunTotals
from hf_badm.app.faults import fault
from hf_badm.parallel.reshard import zero_state_world

if TYPE_CHECKING:
    from transformers import TrainingArguments

MANIFEST = "manifest.json"
STAGING = ".hf-badm-staging"  # inside output_dir (one filesystem: the rename that publishes is atomic)

SLOT_PATTERN = re.compile(r"badm_slots_rank(\d+)-of-(\d+)\.pt$")  # hf_badm.trainer.SLOT_FILE
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "adapter_model.safetensors")
# why each file matters, for the message that names a missing one
WHY = {"scheduler.pt": "the learning-rate schedule (and the optimizer state with it) would restart",
       "optimizer.pt": "the optimizer state (BADM's dual, momentum) would restart",
       "rng_state": "the data order and dropout would differ from the run it continues",
       "badm_slots": "per-sub-batch slots of the other ranks would be lost",
       "latest": "DeepSpeed would not find its optimizer state",
       "weights": "there are no model weights to resume",
       "manifest": "its files cannot be checked against what was saved (a checkpoint of another tool, or of an "
                   "older hf-badm)",
       "listed": "it was part of the checkpoint when it was saved"}
NEEDED = ("weights", "badm_slots")  # a resume cannot go on without them, even a partial one


def verify_checkpoint(checkpoint: str, args: TrainingArguments, allow_partial: bool = False) -> None:
    """Refuse (``RecipeError`` naming the file) a checkpoint with a missing or unreadable file; with
    ``allow_partial`` missing files are reported on stderr and the resume goes on. Unreadable ones never pass."""
    ckpt = Path(checkpoint)
    _read_state(ckpt / "trainer_state.json")
    if problem := resume_problem(ckpt, args):
        raise RecipeError(f"resume_from_checkpoint: {problem}")
    missing: list[tuple[str, str]] = []
    if args.deepspeed:  # DeepSpeed keeps optimizer and schedule in the folder its `latest` file names
        tag = (ckpt / "latest").read_text().strip() if (ckpt / "latest").is_file() else None
        missing += [] if tag and (ckpt / tag).is_dir() else [(f"{tag}/" if tag else "latest", "latest")]
    else:
        missing += _need(ckpt, "scheduler.pt", "scheduler.pt")
    if not (args.deepspeed or args.fsdp):  # FSDP and DeepSpeed save sharded optimizer and weights their own way
        # a ZeRO checkpoint resumed without DeepSpeed: BADM's state files stand in for optimizer.pt
        missing += [] if zero_state_world(ckpt) else _need(ckpt, "optimizer.pt", "optimizer.pt")
        if not any((ckpt / w).is_file() for w in WEIGHTS):
            missing.append((WEIGHTS[0], "weights"))
    missing += _rng_files(ckpt, args.world_size)
    missing += _slot_files(ckpt)
    for path in sorted(ckpt.iterdir()):
        _check_readable(path)
    missing += _unlike_manifest(ckpt, {name for name, _ in missing})
    if not missing:
        return
    named = "; ".join(f"{ckpt / name} is missing: {WHY[why]}" for name, why in missing)
    if not allow_partial:
        raise RecipeError(f"resume_from_checkpoint: {named} (--allow_partial_resume true resumes anyway)")
    if needed := [name for name, why in missing if why in NEEDED]:
        raise RecipeError(f"resume_from_checkpoint: {ckpt / needed[0]} is missing: {WHY[dict(missing)[needed[0]]]}; "
                          "a partial resume cannot do without it")
    print(f"hf-badm: warning: partial resume (--allow_partial_resume): {named}", file=sys.stderr, flush=True)


def resume_problem(ckpt: Path, args: TrainingArguments) -> str | None:
    """Why a checkpoint cannot resume exactly with these arguments (another world size or engine: the check
    ``BADMTrainerMixin.train`` makes, here before anything is built or written)."""
    from transformers import Trainer

    from hf_badm.parallel.reshard import zero_resume_problem
    from hf_badm.trainer import RESHARD_HOOK, hook_parameters

    mixed = any(getattr(args, name, False) for name in ("bf16", "fp16"))  # TrainingArguments, or a stand-in without them
    engine = "deepspeed" if args.deepspeed else "fsdp" if args.fsdp else None
    return zero_resume_problem(ckpt, args.world_size, engine=engine, mixed_precision=mixed,
                               can_reshard=hook_parameters(Trainer, RESHARD_HOOK[0]) == RESHARD_HOOK[1])


def _unlike_manifest(ckpt: Path, known_missing: set[str]) -> list[tuple[str, str]]:
    """Files of the manifest that are missing; a file whose content differs from what was saved is refused."""
    listed = read_manifest(ckpt)
    if listed is None:
        return [(MANIFEST, "manifest")]
    missing = []
    for name, entry in listed.items():
        path = ckpt / name
        if not path.is_file():
            missing += [] if name in known_missing else [(name, "listed")]
        elif path.stat().st_size != entry["bytes"] or _sha256(path) != entry["sha256"]:
            raise RecipeError(f"resume_from_checkpoint: {path} has changed since it was saved (its sha256 is not the "
                              f"one {ckpt / MANIFEST} records): damaged or edited, refused")
    return missing


def read_manifest(folder: Path) -> dict[str, dict[str, Any]] | None:
    """``{file: {"sha256", "bytes"}}`` of a checkpoint; None when it has no readable manifest."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        return {str(k): {"sha256": str(v["sha256"]), "bytes": int(v["bytes"])} for k, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def write_manifest(folder: Path) -> None:
    """The sha256 and size of every file under ``folder``, each flushed to disk first, so that after a crash
    the manifest never vouches for data still in the page cache."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[str(path.relative_to(folder))] = {"sha256": _sha256(path, sync=True), "bytes": path.stat().st_size}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def _sha256(path: Path, sync: bool = False) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
        if sync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def latest_checkpoint(out: Path, partial: bool = False) -> str | None:
    """The highest ``checkpoint-N`` that is complete: its manifest's files all there at their sizes (their
    content is checked before a resume reads them). ``partial``: any with trainer_state.json (a partial resume
    then says what is missing)."""
    numbered = sorted((int(d.name.split("-")[-1]), d) for d in out.glob("checkpoint-*")
                      if d.name.split("-")[-1].isdigit() and d.is_dir())
    for _, folder in reversed(numbered):
        if incomplete(folder) is None or (partial and (folder / "trainer_state.json").is_file()):
            return str(folder)
    return None


def incomplete(folder: Path) -> str | None:
    """Why ``folder`` is not a complete checkpoint (by its manifest, without reading the files), None if it is."""
    listed = read_manifest(folder)
    if listed is None:
        return f"{folder / MANIFEST} is missing or unreadable"
    for name, entry in listed.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if (size := path.stat().st_size) != entry["bytes"]:
            return f"{path} is not as saved ({size} bytes, {MANIFEST} records {entry['bytes']})"
    return None


@contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGTERM and SIGINT wait until the block is done (a few renames that publish a complete folder)."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def publish(staged: Path, target: Path) -> None:
    """Rename the complete ``staged`` file or folder to ``target``; what it replaces goes only after, and a
    symbolic link in its place is replaced itself, never followed."""
    old = None
    with signals_deferred():
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.exists():
            old = staged.with_name(f"{staged.name}.replaced")
            os.rename(target, old)
        os.rename(staged, target)
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself survives a crash
        finally:
            os.close(fd)
    if old is not None:
        shutil.rmtree(old)


def disk_full(err: BaseException, staged: Path, out: Path, what: str) -> RunEnded | None:
    """One line for a write that failed on a full disk (torch's zip writer says only "unexpected pos"): the
    file being written (the newest one in ``staged``), the space free and needed, the last complete checkpoint.
    None for any other error. Call it before ``staged`` is removed."""
    text = str(err)
    if getattr(err, "errno", None) not in (errno.ENOSPC, errno.EDQUOT) and not any(
            m in text for m in ("No space left", "unexpected pos", "PytorchStreamWriter failed")):
        return None
    files = [p for p in staged.rglob("*") if p.is_file()] if staged.is_dir() else []
    named = getattr(err, "filename", None)  # an open() that failed names its file; a failed write() does not
    newest = Path(named) if named else max(files, key=lambda p: p.stat().st_mtime_ns, default=staged)
    found = latest_checkpoint(out) if out.is_dir() else None
    written = sum(p.stat().st_size for p in files)
    need = sum(e["bytes"] for e in (read_manifest(Path(found)) or {}).values()) if found else 0
    free = shutil.disk_usage(out if out.is_dir() else out.parent).free
    room = (f"{free / 2**20:.0f} MiB free, {what} needs about {max(need, written) / 2**20:.0f} MiB" if need
            else f"{free / 2**20:.0f} MiB free, {what} needs more than the {written / 2**20:.0f} MiB written")
    last = f"{found} is the last complete checkpoint, intact" if found else "no complete checkpoint yet"
    return RunEnded(f"no space left on device while writing {newest} ({room}); {last}; free some space", 1,
                    resume=found is not None)


@contextmanager
def discarded_on_failure(staged: Path, out: Path, what: str, zero: bool) -> Iterator[None]:
    """A write into ``staged`` that fails (a signal, a full disk) leaves nothing there (on the rank that writes,
    ``zero``); a full disk is said in one line."""
    try:
        yield
    except BaseException as err:
        if zero:
            full = disk_full(err, staged, out, what)
            shutil.rmtree(staged, ignore_errors=True)
            if full is not None:
                raise full from None
        raise


class CheckpointMixin:
    """The CLI's Trainer, before BADM's or the stock one in the MRO. Checkpoints go to a staging folder,
    get a manifest and are renamed into place only once complete (then the old ones are rotated); loads that
    fail say why in one line naming the checkpoint; every step's loss goes to the run's ``RunTotals``."""

    _staging: str | None = None

    def _get_output_dir(self, trial: Any) -> str:
        return self._staging or super()._get_output_dir(trial)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        run_dir = Path(super()._get_output_dir(trial))
        name, zero = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}", self.args.should_save
        staged = run_dir / STAGING / name
        if zero:
            shutil.rmtree(staged, ignore_errors=True)
        self._staging = str(staged.parent)
        try:
            with discarded_on_failure(staged, run_dir, "a checkpoint", zero):
                super()._save_checkpoint(model, trial)
                fault("checkpoint_save")
                if zero:
                    self._totals().save(staged)
                    self._point_best_at(run_dir, staged)
                    write_manifest(staged)
                self.accelerator.wait_for_everyone()  # every rank's files are in before it is published
                if zero:
                    publish(staged, run_dir / name)
                    self._rotate(run_dir)
        finally:
            self._staging = None

    def _point_best_at(self, run_dir: Path, staged: Path) -> None:
        """The Trainer recorded the best checkpoint under the staging folder when it is this one."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
        from transformers.trainer import TRAINER_STATE_NAME

        best = self.state.best_global_step
        if best and self.state.best_model_checkpoint and STAGING in self.state.best_model_checkpoint:
            self.state.best_model_checkpoint = str(run_dir / f"{PREFIX_CHECKPOINT_DIR}-{best}")
            self.state.save_to_json(str(staged / TRAINER_STATE_NAME))

    def _rotate(self, run_dir: Path) -> None:
        """save_total_limit, applied to the published checkpoints (the Trainer's own rotation saw the staging)."""
        rotate = getattr(super(), "_rotate_checkpoints", None)  # a method up to transformers 4.x
        if rotate is not None:
            rotate(use_mtime=True, output_dir=str(run_dir))
            return
        from transformers.trainer_utils import rotate_checkpoints

        rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def save_last_state(self) -> None:
        """A checkpoint of the state training ended in (a run stopped before its final files continues from it)."""
        self._save_checkpoint(self.model, trial=None)

    def _totals(self) -> RunTotals:
        return next(cb for cb in self.callback_handler.callbacks if isinstance(cb, RunTotals))

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        loss = super().training_step(*args, **kwargs)
        self._totals().add_loss(loss)
        return loss

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        with _unfit(resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        with _unfit(checkpoint):
            super()._load_optimizer_and_scheduler(checkpoint)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        with _unfit(checkpoint):
            super()._load_rng_state(checkpoint)


@contextmanager
def _unfit(checkpoint: str | None) -> Iterator[None]:
    """A checkpoint from another model size, preconditioner or mode fails inside the Trainer's loaders with a
    clear reason under a long traceback: keep the reason, as the run's one-line refusal. A pickle that is more
    than tensors (code to run on load) is refused by torch's weights_only load: named unsafe."""
    try:
        yield
    except (ValueError, RuntimeError, KeyError, OSError, EOFError, pickle.UnpicklingError) as err:
        if isinstance(err, pickle.UnpicklingError) or "Weights only load failed" in str(err):
            raise RecipeError(f"resume_from_checkpoint: {checkpoint} holds a pickle that is not only tensors: unsafe "
                              f"to load, refused ({_reason(err)})") from None
        raise RecipeError(f"resume_from_checkpoint: {checkpoint} does not fit this run: {_reason(err)}") from None


def _reason(err: BaseException) -> str:
    """The first line, with the next one when the first only introduces it ("Error(s) in loading state_dict:")."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} {lines[1]}"
    return lines[0] if lines else type(err).__name__


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
