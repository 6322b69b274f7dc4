"""Fault injection through the CLI: a signal at each named point of a run, a full disk at each file a run writes,
damaged checkpoints, left and held locks, fuzzed recipes. A faulted run is a fresh `python -m hf_badm train`
process (``HF_BADM_FAULT`` injects the fault, hf_badm.app.faults); the command its one-line message offers runs
in this process and must give the uninterrupted run's model, bit for bit, without losing a saved checkpoint."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from hf_badm.app import RecipeError, RunEnded
from hf_badm.app.checkpoint import verify_checkpoint, write_manifest
from hf_badm.app.cli import main
from hf_badm.app.output import LOCK_FILE, OutputDirLock
from procs import launch_env

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes/pretrain/tiny-gpt.yaml")
# 6 steps, a checkpoint at 3 and 6, evaluation only at the end (so that `final_eval` is a separate phase)
TINY = ["--num_train_examples", "200", "--num_eval_examples", "8", "--block_size", "32", "--per_device_train_batch_size",
        "8", "--per_device_eval_batch_size", "8", "--logging_steps", "1", "--disable_tqdm", "true",
        "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--model_family", "llama", "--max_steps", "6",
        "--save_steps", "3", "--eval_strategy", "no"]


def faulted(out: Path, fault: str, *extra: str) -> subprocess.CompletedProcess:
    env = launch_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_BADM_FAULT=fault)
    return subprocess.run([sys.executable, "-m", "hf_badm", "train", RECIPE, *TINY, *extra, "--output_dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def last_line(done: subprocess.CompletedProcess, code: int) -> str:
    """The run's one-line message (the last line of stderr), with no traceback before it."""
    assert done.returncode == code, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done.stderr.strip().splitlines()[-1]


def hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def checkpoints(out: Path) -> dict[str, dict[str, str]]:
    return {d.name: hashes(d) for d in sorted(out.glob("checkpoint-*"))}


def continue_run(message: str, capsys) -> int:
    """Run the command the message offers (`hf-badm train ...`) in this process."""
    command = shlex.split(message.split("continue with: ")[1])
    assert command[:2] == ["hf-badm", "train"], command
    code = main(command[1:])
    capsys.readouterr()
    return code


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run every faulted one must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    done = faulted(out, "")
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def assert_completes_like(reference: Path, out: Path, message: str, capsys) -> None:
    """What the stopped run saved survives the offered command, which completes the run exactly."""
    saved = checkpoints(out)
    assert continue_run(message, capsys) == 0
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    after = checkpoints(out)
    assert all(after[name] == files for name, files in saved.items())
    metrics, straight = (json.loads((d / "metrics.json").read_text()) for d in (out, reference))
    assert metrics["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-9)
    assert not (out / LOCK_FILE).exists() and not (out / ".hf-badm-staging").exists()


@pytest.mark.parametrize("point, sig, kept", [
    ("start", "SIGTERM", []),
    ("first_step", "SIGINT", ["checkpoint-1"]),
    ("mid_run", "SIGTERM", ["checkpoint-3"]),
    ("checkpoint_save", "SIGINT", ["checkpoint-3", "checkpoint-4"]),
    ("final_eval", "SIGTERM", ["checkpoint-3", "checkpoint-6"]),
    ("final_save", "SIGINT", ["checkpoint-3", "checkpoint-6"]),
    ("twice", "SIGTERM", None),  # the second signal ends checkpoint-3's save, unless that took under 20 ms
])
def test_a_signal_at_any_point_keeps_what_is_complete_and_says_how_to_finish(reference, tmp_path, capsys, point, sig,
                                                                            kept):
    out = tmp_path / "run"
    line = last_line(faulted(out, f"{point}:{sig}"), 128 + signal.Signals[sig])
    assert line.startswith(f"hf-badm: error: stopped by {sig} ") and "continue with: hf-badm train " in line, line
    found = sorted(d.name for d in out.glob("checkpoint-*"))
    kept = found if kept is None and found in ([], ["checkpoint-3"]) else kept
    assert found == kept
    assert not (out / "metrics.json").exists()
    assert ("--resume_from_checkpoint" in line.split("continue with:")[1]) == bool(kept)
    if kept:
        assert f"the last complete one {out / kept[-1]}" in line
    assert_completes_like(reference, out, line, capsys)


def test_a_resume_at_max_steps_trains_nothing_and_writes_the_final_files(reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference / "checkpoint-6", out / "checkpoint-6")
    assert main(["train", RECIPE, *TINY, "--output_dir", str(out), "--resume_from_checkpoint"]) == 0
    assert "'loss'" not in capsys.readouterr().out  # no step logged
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    assert sorted(d.name for d in out.glob("checkpoint-*")) == ["checkpoint-6"]
    metrics, straight = (json.loads((d / "metrics.json").read_text()) for d in (out, reference))
    assert metrics["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-9)
    assert metrics["tokens_per_second"] == pytest.approx(straight["tokens_per_second"])


def test_a_resumed_run_reports_the_whole_runs_train_loss(reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference / "checkpoint-3", out / "checkpoint-3")
    assert main(["train", RECIPE, *TINY, "--output_dir", str(out), "--resume_from_checkpoint"]) == 0
    capsys.readouterr()
    metrics, straight = (json.loads((d / "metrics.json").read_text()) for d in (out, reference))
    assert metrics["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-9)
    assert metrics["tokens_per_second"] > 0 and metrics["train_steps_seconds"] > 0
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()


@pytest.mark.parametrize("fault, resumes", [
    ("optimizer.pt@2", True),  # checkpoint-6's optimizer state: checkpoint-3 stays the last complete one
    ("trainer_state.json@2", True),
    ("model.safetensors@3", True),  # the final model: checkpoint-6 holds the state it comes from
    ("metrics.json", True),
    ("model.safetensors@1", False),  # the first checkpoint: nothing complete yet
])
def test_a_full_disk_at_any_write_is_one_line_and_loses_no_checkpoint(reference, tmp_path, capsys, fault, resumes):
    out = tmp_path / "run"
    line = last_line(faulted(out, f"enospc:{fault}"), 1)
    assert line.startswith("hf-badm: error: no space left on device while writing ") and "MiB free" in line, line
    assert fault.split("@")[0] in line.split(" (")[0]
    complete = sorted(d.name for d in out.glob("checkpoint-*")) if out.exists() else []
    assert complete == {"optimizer.pt@2": ["checkpoint-3"], "trainer_state.json@2": ["checkpoint-3"],
                        "model.safetensors@1": []}.get(fault, ["checkpoint-3", "checkpoint-6"])
    if complete:
        assert f"{out / complete[-1]} is the last complete checkpoint, intact" in line
    assert ("--resume_from_checkpoint" in line) == resumes
    assert not (out / "metrics.json").exists() and not list(out.glob(".hf-badm-staging/*"))
    assert_completes_like(reference, out, line, capsys)


def test_a_full_disk_while_taking_the_lock_is_one_line_and_leaves_no_lock(tmp_path, monkeypatch):
    out = tmp_path / "run"

    def full(fd, data):
        raise OSError(28, os.strerror(28))

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(RunEnded, match="cannot write .*No space left on device.*free some space"):
        OutputDirLock(out).acquire()
    monkeypatch.undo()
    assert not out.exists()
    with OutputDirLock(out):
        pass


def test_a_lock_whose_holder_was_killed_is_free(tmp_path):
    """The kernel drops a killed holder's lock: no stale lock to find or remove by hand."""
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | "
                               "os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'{\"pid\": 1, \"host\": \"h\"}');"
                               " print(flush=True); time.sleep(120)", str(out / LOCK_FILE)], stdout=subprocess.PIPE)
    holder.stdout.readline()
    with pytest.raises(RecipeError, match=r"in use by another run \(pid 1 on h\)"):
        OutputDirLock(out).acquire()
    holder.kill()
    holder.wait()
    with OutputDirLock(out):
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_symlinked_lock_is_refused_without_following_it(tmp_path):
    out, outside = tmp_path / "run", tmp_path / "outside.txt"
    out.mkdir()
    outside.write_text("keep")
    (out / LOCK_FILE).symlink_to(outside)
    with pytest.raises(RecipeError, match="symbolic link"):
        OutputDirLock(out).acquire()
    assert outside.read_text() == "keep"


def test_values_changed_inside_the_checkpoints_model_are_refused_naming_it(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference / "checkpoint-3", out / "checkpoint-3")
    model = out / "checkpoint-3" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-64:-32] = bytes(b ^ 0x55 for b in data[-64:-32])  # values only: the header is intact
    model.write_bytes(bytes(data))
    done = faulted(out, "", "--resume_from_checkpoint")
    assert f"{model} has changed since it was saved" in last_line(done, 2)
    assert len(done.stderr.strip().splitlines()) == 1 and not (out / "model.safetensors").exists()


def test_an_unsafe_pickle_is_named_unsafe(reference, tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (print, ("this ran on load",))

    out = tmp_path / "run"
    shutil.copytree(reference / "checkpoint-3", out / "checkpoint-3")
    torch.save(Payload(), out / "checkpoint-3" / "optimizer.pt")
    write_manifest(out / "checkpoint-3")  # a manifest that vouches for it: the load itself must refuse
    code = main(["train", RECIPE, *TINY, "--output_dir", str(out), "--resume_from_checkpoint"])
    captured = capsys.readouterr()
    assert code == 2 and "this ran on load" not in captured.out
    assert "unsafe to load" in captured.err.strip().splitlines()[-1]


@pytest.mark.parametrize("remove, needle", [("badm_slots_rank1-of-2.pt", "badm_slots_rank1-of-2.pt is missing"),
                                            ("model.safetensors", "model.safetensors is missing")])
def test_a_partial_resume_without_slots_or_weights_is_refused_in_one_line(reference, tmp_path, remove, needle):
    """What no resume can do without is refused even with --allow_partial_resume, on every rank alike (each
    rank checks before the process group is used)."""
    ckpt = tmp_path / "checkpoint-3"
    shutil.copytree(reference / "checkpoint-3", ckpt)
    for rank in (0, 1):
        torch.save({}, ckpt / f"badm_slots_rank{rank}-of-2.pt")
    write_manifest(ckpt)
    (ckpt / remove).unlink()
    args = SimpleNamespace(deepspeed=None, fsdp=None, world_size=2)
    with pytest.raises(RecipeError, match=f"{needle}.*cannot do without it"):
        verify_checkpoint(str(ckpt), args, allow_partial=True)


def test_a_symlink_in_output_dir_is_replaced_not_followed(reference, tmp_path, capsys):
    out, outside = tmp_path / "run", tmp_path / "outside.json"
    shutil.copytree(reference, out)
    outside.write_text("keep")
    (out / "metrics.json").unlink()
    (out / "metrics.json").symlink_to(outside)
    (out / "tokenizer").rename(tmp_path / "tokenizer")
    (out / "tokenizer").symlink_to(tmp_path / "tokenizer")
    assert main(["train", RECIPE, *TINY, "--max_steps", "1", "--output_dir", str(out),
                 "--overwrite_output_dir", "true"]) == 0
    capsys.readouterr()
    assert outside.read_text() == "keep" and not (out / "metrics.json").is_symlink()
    assert not (out / "tokenizer").is_symlink() and (tmp_path / "tokenizer" / "tokenizer.json").exists()


FIELDS = ["per_device_train_batch_size", "learning_rate", "block_size", "num_train_examples", "num_eval_examples",
          "dataset", "output_dir", "report_to", "seed", "model_size", "model_family", "optimizer", "lr_scheduler_type",
          "save_steps", "logging_steps", "weight_decay", "warmup_steps", "max_grad_norm", "gradient_accumulation_steps",
          "sigma", "rho", "mode", "preconditioner", "eval_strategy", "task", "vocab_size"]
VALUES = [[8, 16], {"a": 1}, "", "abc", -1, 0, 1, 1e308, "nan", "inf", True, None, 10**12, "/dev/zero", 2.5,
          "[[[[[[[[[[]]]]]]]]]]", [], "wandb", "none", 3]


def _timed_out(signum, frame):
    raise TimeoutError("a fuzzed recipe ran for more than 120 s")


def test_fuzzed_recipes_exit_2_in_one_line_or_train(tmp_path, capsys, monkeypatch):
    """30 recipes, each the tiny recipe with one field set to an odd value (fixed seed): each is refused in one
    line (exit 2, nothing written) or trains to the end; an odd value is never a traceback or a hang."""
    base = yaml.safe_load(Path(RECIPE).read_text())
    base.update(num_train_examples=64, num_eval_examples=8, block_size=16, per_device_train_batch_size=4,
                per_device_eval_batch_size=4, max_steps=2, eval_steps=2, logging_steps=1, model_family="llama",
                disable_tqdm=True)
    monkeypatch.chdir(tmp_path)  # relative output_dirs land here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # an odd dataset name is not looked up on the hub
    previous = signal.signal(signal.SIGALRM, _timed_out)
    rng, outcomes = random.Random(26), []
    for case in range(30):
        field, value = rng.choice(FIELDS), rng.choice(VALUES)
        recipe = {**base, field: value, "output_dir": str(tmp_path / f"out{case}")} if field != "output_dir" else {
            **base, field: value}
        path = tmp_path / f"case{case}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        signal.alarm(120)  # a hang fails the test instead of the suite
        try:
            code = main(["train", str(path)])
        finally:
            signal.alarm(0)
        err = capsys.readouterr().err.strip().splitlines()
        outcomes.append((field, value, code, err[-1] if err else ""))
        assert code in (0, 2), (field, value, code, err[-3:])
        if code == 2:
            assert err[-1].startswith("hf-badm: error: ") and "Traceback" not in "\n".join(err), (field, value, err)
            assert field == "output_dir" or not Path(recipe["output_dir"]).exists(), (field, value)
        else:
            metrics = json.loads((Path(str(recipe["output_dir"])) / "metrics.json").read_text())
            assert math.isfinite(metrics["train_loss"]), (field, value)
    signal.signal(signal.SIGALRM, previous)
    codes = [code for _, _, code, _ in outcomes]
    assert codes.count(2) >= 10 and codes.count(0) >= 3, outcomes
