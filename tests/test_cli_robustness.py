"""Nothing lost, nothing silent: resume into a finished run, concurrent runs, incomplete or foreign checkpoints,
bad values, SIGTERM, runs that can no longer step, a full disk, what compare and the logs say. Each case runs
the console script in a fresh process, as a user would, unless it needs a fault injected."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hf_badm.app import RecipeError
from hf_badm.app.cli import main
from hf_badm.app.output import LOCK_FILE, OutputDirLock
from procs import launch_env

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes/pretrain/tiny-gpt.yaml")
TINY = ["--num_train_examples", "200", "--num_eval_examples", "8", "--block_size", "32", "--per_device_train_batch_size",
        "8", "--per_device_eval_batch_size", "8", "--logging_steps", "1", "--disable_tqdm", "true",
        "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--model_family", "llama"]
ENV = launch_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def hf_badm(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hf_badm", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=ENV)


def train(out: Path, *args: str) -> subprocess.CompletedProcess:
    return hf_badm("train", RECIPE, *TINY, *args, "--output_dir", str(out))


def hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def one_line(done: subprocess.CompletedProcess, code: int) -> str:
    err = done.stderr.strip()
    assert done.returncode == code, err[-3000:]
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("finished") / "run"
    done = train(out, "--max_steps", "4", "--save_steps", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_a_run_is_quiet(finished):
    """The fixture's run said nothing a user cannot act on."""
    done = train(finished.parent / "quiet", "--max_steps", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    for noise in ("pin_memory", "loss_type", "Map:", "Setting accelerator"):
        assert noise not in done.stderr + done.stdout, noise


@pytest.mark.parametrize("resume", [[], ["true"], ["checkpoint-4"]])
def test_resume_into_a_finished_run_changes_nothing(finished, tmp_path, resume):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = hashes(out)
    done = train(out, "--max_steps", "4", "--resume_from_checkpoint", *[str(out / r) if r.startswith("checkpoint")
                                                                         else r for r in resume])
    assert "nothing to resume" in one_line(done, 0)
    assert hashes(out) == before


def test_resume_from_another_runs_checkpoint_into_a_finished_run_is_refused(finished, tmp_path):
    out, other = tmp_path / "run", tmp_path / "other"
    shutil.copytree(finished, out)
    shutil.copytree(finished, other)
    before = hashes(out)
    err = one_line(train(out, "--max_steps", "4", "--resume_from_checkpoint", str(other / "checkpoint-2")), 2)
    assert "not a checkpoint of output_dir" in err and hashes(out) == before


def test_a_second_run_into_the_same_output_dir_is_refused(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "hf_badm", "train", RECIPE, *TINY, "--max_steps", "100000",
                              "--output_dir", str(out)], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (out / LOCK_FILE).exists():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        err = one_line(train(out, "--max_steps", "4"), 2)
        assert f"pid {first.pid}" in err and "in use" in err
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    assert not (out / LOCK_FILE).exists()  # released on the way out


@pytest.mark.parametrize("content", ["", "abc", '{"pid": null}', '{"pid": "abc", "host": 7}', "[1, 2]", "{"])
def test_a_left_lock_file_of_any_content_is_taken_and_a_held_one_refused(tmp_path, content):
    """The lock is the kernel's (flock), not the file: whatever a dead run left in it, the next run takes it; a
    lock held by a live run is refused naming its pid."""
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(content)
    with OutputDirLock(out):
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
        with pytest.raises(RecipeError, match=f"in use by another run \\(pid {os.getpid()} on "):
            OutputDirLock(out).acquire()
    assert not (out / LOCK_FILE).exists()


def unfinished(finished: Path, tmp_path: Path) -> Path:
    """An output_dir holding only the finished run's checkpoint-2 (a run stopped there)."""
    out = tmp_path / "run"
    shutil.copytree(finished / "checkpoint-2", out / "checkpoint-2")
    return out


@pytest.mark.parametrize("damage, needle", [
    ("scheduler.pt", "scheduler.pt is missing"),
    ("rng_state.pth", "rng_state.pth is missing"),
    ("optimizer.pt", "optimizer.pt is missing"),
    ("truncate optimizer.pt", "optimizer.pt is not as saved"),
    ("garbage trainer_state.json", "trainer_state.json is not as saved"),
])
def test_an_incomplete_or_damaged_checkpoint_is_refused_naming_the_file(finished, tmp_path, damage, needle):
    out = unfinished(finished, tmp_path)
    ckpt = out / "checkpoint-2"
    if damage.startswith("truncate"):
        path = ckpt / damage.split()[1]
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage.startswith("garbage"):
        (ckpt / damage.split()[1]).write_text("{not json")
    else:
        (ckpt / damage).unlink()
    before = hashes(out)
    err = one_line(train(out, "--max_steps", "4", "--resume_from_checkpoint"), 2)
    assert needle in err and str(ckpt) in err and hashes(out) == before


def test_a_partial_resume_goes_on_when_asked_and_says_so(finished, tmp_path):
    out = unfinished(finished, tmp_path)
    (out / "checkpoint-2" / "scheduler.pt").unlink()
    done = train(out, "--max_steps", "3", "--resume_from_checkpoint", "--allow_partial_resume", "true")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "partial resume" in done.stderr and "scheduler.pt is missing" in done.stderr
    assert (out / "model.safetensors").exists()


def test_a_checkpoint_of_another_model_size_is_refused_in_one_line(finished, tmp_path):
    out = unfinished(finished, tmp_path)
    before = hashes(out)
    err = one_line(train(out, "--max_steps", "4", "--resume_from_checkpoint", "--model_size", "small"), 2)
    assert "does not fit this run" in err and "checkpoint-2" in err and hashes(out) == before


def test_sigterm_saves_a_checkpoint_at_that_step_and_the_resume_is_bit_identical(tmp_path):
    steps = ["--max_steps", "150"]
    straight = train(tmp_path / "straight", *steps)
    assert straight.returncode == 0, straight.stderr[-3000:]
    out, at = tmp_path / "stopped", random.randint(3, 40)
    proc = subprocess.Popen([sys.executable, "-m", "hf_badm", "train", RECIPE, *TINY, *steps, "--output_dir", str(out)],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    logged = 0
    for line in proc.stdout:
        logged += line.startswith("{'loss'")
        if logged == at:
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("hf-badm: error: stopped by SIGTERM at step "), err[-3000:]
    step = int(last.split("at step ")[1].split(":")[0])
    assert at <= step < 150 and f"{out}/checkpoint-{step}" in last
    state = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())
    assert state["global_step"] == step and not (out / "model.safetensors").exists()
    assert not (out / LOCK_FILE).exists()
    resumed = train(out, *steps, "--resume_from_checkpoint")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "straight" / "model.safetensors").read_bytes()


def test_a_run_whose_every_step_is_skipped_stops_without_a_model(tmp_path):
    out = tmp_path / "run"
    done = train(out, "--max_steps", "50", "--learning_rate", "1e11", "--max_grad_norm", "0", "--max_skipped_steps", "3")
    err = done.stderr.strip().splitlines()  # BADM's own warning of the first skipped step, then the stop
    assert done.returncode == 1 and len(err) <= 5 and err[-1].startswith("hf-badm: error: stopped at step"), err
    assert "no model written" in err[-1] and not out.exists()


def test_a_full_disk_while_saving_is_said_in_one_line(tmp_path, capsys, monkeypatch):
    """torch's zip writer on a full disk says only "unexpected pos": the run names the file and the cause."""
    import torch

    save = torch.save

    def full(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt"):
            Path(f).write_bytes(b"PK")  # the partial file the failed write leaves
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 265408 vs 265296")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "run"
    code = main(["train", RECIPE, *TINY, "--max_steps", "2", "--save_steps", "1", "--output_dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert "no space left on device while writing" in err and "optimizer.pt" in err


BAD = [
    (["--weight_decay", "1e308"], "weight_decay"),
    (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps"),
    (["--per_device_train_batch_size", "0"], "per_device_train_batch_size"),
    (["--per_device_train_batch_size", "-1"], "per_device_train_batch_size"),
    (["--save_steps", "inf"], "save_steps"),
    (["--logging_steps", "inf"], "logging_steps"),
    (["--save_steps", "nan"], "save_steps"),
    (["--warmup_steps", "nan"], "warmup_steps"),
    (["--max_steps", "0"], "max_steps"),
    (["--seed", "-1"], "seed"),
    (["--eval_steps", "-1"], "eval_steps"),
    (["--weight_decay", "0.5", "--learning_rate", "3"], "weight_decay"),
]


@pytest.mark.parametrize("flags, needle", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_values_exit_2_in_one_line_writing_nothing(tmp_path, flags, needle):
    out = tmp_path / "out"
    err = one_line(hf_badm("train", RECIPE, *TINY, *flags, "--output_dir", str(out), cwd=tmp_path), 2)
    assert needle in err and not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("name, content, needle", [
    ("blank.txt", " \n\t\n   \n", "blank"),
    ("blank.jsonl", "".join('{"text": "   "}\n' for _ in range(20)), "no full block"),
])
def test_a_whitespace_only_train_file_exits_2_in_one_line(tmp_path, name, content, needle):
    data = tmp_path / "data" / name
    data.parent.mkdir()
    data.write_text(content)
    out = tmp_path / "out"
    err = one_line(hf_badm("train", RECIPE, *TINY, "--max_steps", "2", "--dataset", str(data), "--output_dir", str(out),
                           cwd=tmp_path), 2)
    assert needle in err and name in err and not out.exists()


def test_an_output_dir_that_is_a_file_exits_2_before_loading_anything(tmp_path):
    out = tmp_path / "out"
    out.write_text("a file")
    start = time.perf_counter()
    err = one_line(hf_badm("train", RECIPE, *TINY, "--max_steps", "2", "--output_dir", str(out), cwd=tmp_path), 2)
    assert "is a file" in err and out.read_text() == "a file" and sorted(tmp_path.iterdir()) == [out]
    assert time.perf_counter() - start < 60


def test_compare_names_plain_and_preconditioned_badm_on_the_newton_schulz_recipe(compared):
    """`badm` is the paper's BADM even on a recipe that names a preconditioner: two different runs, labelled so (the
    one compare run of conftest.py, on the newton_schulz recipe)."""
    out, done = compared
    runs = json.loads((out / "comparison.json").read_text())
    assert runs["badm"]["recipe"]["badm"]["preconditioner"] == "none"
    assert runs["badm-newton_schulz"]["recipe"]["badm"]["preconditioner"] == "newton_schulz"
    assert [runs[k]["optimizer"] for k in runs][:2] == ["badm", "badm-newton_schulz"]
    assert runs["badm"]["train_loss"] != runs["badm-newton_schulz"]["train_loss"]
    assert runs["badm"]["recipe"]["learning_rate"] == 3.0  # plain BADM's own scale, not the recipe's 0.03
    assert "| badm |" in done.stdout and "| badm-newton_schulz |" in done.stdout


@pytest.mark.parametrize("lr, warns", [(1e-2, True), (3e-2, True), (1.0, False), (3.0, False)])
def test_plain_badm_warns_at_an_adamw_scale_learning_rate(lr, warns):
    """The sweeps' plain-BADM optimum is lr 3; lr 1e-2 (AdamW's) barely trains and must say so."""
    import warnings

    from hf_badm.config import BADMConfig

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        BADMConfig().optimizer_kwargs(lr)
    assert any("AdamW learning rate" in str(w.message) for w in caught) == warns
