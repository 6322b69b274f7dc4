"""The hf-badm console script: every recipe end to end (a few steps), compare (muon included), demo, help,
reproducible runs, no silent overwrite, resuming, launch notes. Bad inputs: tests/test_app_validation.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
from transformers import Trainer

from hf_badm.app.cli import main
from hf_badm.app.launch import unbuilt_deepspeed_op
from hf_badm.app.plots import PLOT_SKIPPED
from hf_badm.trainer import RESHARD_HOOK, hook_parameters
from procs import free_port, launch_env, run_process_group

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--max_steps", "3", "--num_train_examples", "200", "--num_eval_examples", "16", "--eval_steps", "2",
        "--logging_steps", "1", "--disable_tqdm", "true"]


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hf_badm", *args], cwd=cwd or ROOT, capture_output=True, text=True,
                          timeout=600)


def assert_run_written(out: Path) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_loss"] > 0 and "eval_loss" in metrics and metrics["log_history"]
    image = matplotlib.image.imread(out / "loss.png")
    assert image.ndim == 3 and image.shape[0] > 100
    return metrics


def test_help_is_complete(capsys, monkeypatch):
    top = cli("--help")  # the console script itself; each command's help in this process (same parser)
    assert top.returncode == 0 and all(c in top.stdout for c in ("train", "compare", "demo"))

    def help_of(*argv: str) -> str:
        assert main([*argv, "--help"]) == 0
        return capsys.readouterr().out

    monkeypatch.chdir(ROOT)
    train = help_of("train")
    for field in ("--sigma", "--rho", "--mode", "--sub_batches_per_micro_batch", "--sub_batch_weights", "--model_family",
                  "--model_name_or_path", "--task", "--dataset", "--optimizer", "--learning_rate", "--max_steps",
                  "--deepspeed"):
        assert field in train, field
    words = " ".join(train.split())
    assert "file names become split names" in words and "--overwrite_output_dir" in words
    assert help_of("train", "recipes/pretrain/tiny-gpt.yaml") == train
    for command in ("compare", "demo"):
        done = help_of(command)
        assert "--optimizers" in done and "--output_dir" in done


def test_pretrain_then_full_finetune_recipes(tmp_path):
    pre = cli("train", "recipes/pretrain/tiny-gpt.yaml", *FAST, "--output_dir", str(tmp_path / "pre"))
    assert pre.returncode == 0, pre.stderr[-3000:]
    metrics = assert_run_written(tmp_path / "pre")
    assert metrics["recipe"]["badm"]["mode"] == "fused" and (tmp_path / "pre" / "tokenizer.json").exists()
    ft = cli("train", "recipes/finetune/full-gpt.yaml", *FAST, "--model_name_or_path", str(tmp_path / "pre"),
             "--output_dir", str(tmp_path / "ft"))
    assert ft.returncode == 0, ft.stderr[-3000:]
    assert_run_written(tmp_path / "ft")


def test_newton_schulz_pretrain_recipe(tmp_path):
    done = cli("train", "recipes/pretrain/tiny-gpt-newton-schulz.yaml", *FAST, "--output_dir", str(tmp_path / "ns"),
               "--solve_report", str(tmp_path / "routes.tsv"))
    assert done.returncode == 0, done.stderr[-3000:]
    badm = assert_run_written(tmp_path / "ns")["recipe"]["badm"]
    assert (badm["preconditioner"], badm["elementwise_preconditioner"]) == ("newton_schulz", "normalized")
    report = [line for line in done.stdout.splitlines() if line.startswith("hf_badm: local solves:")]
    assert len(report) == 1 and "newton_schulz 8 tensors" in report[0] and "lm_head.weight" in report[0]
    rows = [line.split("\t") for line in (tmp_path / "routes.tsv").read_text().splitlines()]
    assert rows[0] == ["name", "shape", "role", "solve", "parts"]
    assert ["transformer.h.0.attn.c_attn.weight", "64x192", "linear", "newton_schulz", "q,k,v"] in rows


@pytest.mark.parametrize("optimizer", ["badm", "muon"])
def test_a_name_override_that_matches_nothing_stops_at_start_up(tmp_path, optimizer):
    done = cli("train", "recipes/pretrain/tiny-gpt-newton-schulz.yaml", *FAST, "--output_dir", str(tmp_path / "ns"),
               "--optimizer", optimizer, "--solve_overrides", "nonesuch=elementwise")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "matches no trainable parameter" in lines[0], done.stderr
    assert not (tmp_path / "ns" / "metrics.json").exists()


def test_llama_pretrain_then_lora_sft_recipes(tmp_path):
    pre = cli("train", "recipes/pretrain/small-llama.yaml", *FAST, "--output_dir", str(tmp_path / "pre"))
    assert pre.returncode == 0, pre.stderr[-3000:]
    assert assert_run_written(tmp_path / "pre")["recipe"]["badm"]["mode"] == "per_sub_batch"
    lora = cli("train", "recipes/sft/lora-llama.yaml", *FAST, "--exact_match_examples", "8",
               "--model_name_or_path", str(tmp_path / "pre"), "--output_dir", str(tmp_path / "lora"))
    assert lora.returncode == 0, lora.stderr[-3000:]
    metrics = assert_run_written(tmp_path / "lora")
    assert metrics["exact_match"] * 8 == round(metrics["exact_match"] * 8)  # a share of the 8 scored prompts
    assert (tmp_path / "lora" / "adapter_config.json").exists()


def test_moe_sft_recipe(tmp_path):
    done = cli("train", "recipes/moe/mixtral-sft.yaml", *FAST, "--exact_match_examples", "8",
               "--output_dir", str(tmp_path / "moe"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert assert_run_written(tmp_path / "moe")["recipe"]["model"]["model_family"] == "mixtral"


@pytest.mark.timeout(600)
def test_recipe_under_torchrun_with_deepspeed_zero3(tmp_path):
    """The same recipe and command on 2 CPU ranks with ZeRO-3 (the model is built partitioned)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "hf_badm",
           "train", "recipes/pretrain/tiny-gpt.yaml", "--deepspeed", "recipes/launch/zero3.json", "--use_cpu", "true",
           *FAST, "--output_dir", str(tmp_path / "z3")]
    unbuilt = unbuilt_deepspeed_op()
    code, log = run_process_group(cmd, 540, cwd=ROOT, env=launch_env(OMP_NUM_THREADS="1"))
    assert code == 0, log[-4000:]
    notice = "hf-badm: DeepSpeed builds its"
    assert log.count(notice) == (1 if unbuilt else 0), log[:3000]  # said once, before a first build only
    assert unbuilt_deepspeed_op() is None  # built now: the next run says nothing
    metrics = assert_run_written(tmp_path / "z3")
    assert (tmp_path / "z3" / "model.safetensors").exists() and metrics["train_loss"] > 0
    assert metrics["init_fingerprint"] is None  # zero.Init partitions the weights as they are built


def test_compare_writes_table_and_plot(compared):
    out, done = compared  # conftest.py: one compare run of every optimizer the compare tests check
    table = (out / "comparison.md").read_text()
    assert "| badm |" in table and "| adamw_torch | 0.003 |" in table and "comparison.png" in done.stdout
    assert "| badm-newton_schulz | 0.03 |" in table and "| muon | 0.03 |" in table
    runs = json.loads((out / "comparison.json").read_text())
    assert runs["badm-newton_schulz"]["recipe"]["badm"]["preconditioner"] == "newton_schulz"
    assert runs["muon"]["optimizer"] == "muon" and runs["muon"]["eval_loss"] != runs["adamw_torch"]["eval_loss"]
    # every optimizer started from the same weights (the recipe's seed, applied before the model is built)
    assert len({m["init_fingerprint"] for m in runs.values()}) == 1 and "same weights" not in done.stderr
    assert matplotlib.image.imread(out / "comparison.png").ndim == 3


def test_compare_rejects_an_unknown_badm_variant_before_training(tmp_path):
    done = cli("compare", "recipes/pretrain/tiny-gpt.yaml", "--optimizers", "adamw,badm-lamb", *FAST,
               "--output_dir", str(tmp_path / "cmp"))
    assert done.returncode == 2 and "preconditioner" in done.stderr and not (tmp_path / "cmp" / "adamw_torch").exists()


def test_demo_runs_and_prints_the_table(tmp_path):
    done = cli("demo", "--max_steps", "2", "--eval_steps", "1", "--num_train_examples", "100",
               "--output_dir", str(tmp_path / "demo"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| badm | 3 |" in done.stdout and "| adamw_torch | 0.01 |" in done.stdout
    assert "| badm-newton_schulz | 0.03 |" in done.stdout and "| muon | 0.03 |" in done.stdout
    assert (tmp_path / "demo" / "comparison.png").exists()


TINY = ["--num_train_examples", "64", "--num_eval_examples", "8", "--block_size", "32", "--per_device_train_batch_size",
        "8", "--per_device_eval_batch_size", "8", "--logging_steps", "1", "--disable_tqdm", "true",
        "--lr_scheduler_type", "constant", "--warmup_steps", "0"]


def train_here(out: Path, *args: str) -> int:
    """``hf-badm train`` of the tiny GPT recipe in this process (a few tiny steps)."""
    return main(["train", str(ROOT / "recipes/pretrain/tiny-gpt.yaml"), *TINY, *args, "--output_dir", str(out)])


def test_one_recipe_and_seed_give_identical_weights(tmp_path):
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        assert train_here(tmp_path / name, "--max_steps", "3", "--seed", seed) == 0
    weights = {n: (tmp_path / n / "model.safetensors").read_bytes() for n in "abc"}
    start = {n: json.loads((tmp_path / n / "metrics.json").read_text())["init_fingerprint"] for n in "abc"}
    assert weights["a"] == weights["b"] and start["a"] == start["b"]
    assert weights["a"] != weights["c"] and start["a"] != start["c"]  # the seed does decide


def test_a_finished_run_is_not_replaced_unless_told(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_here(out, "--max_steps", "2", "--save_steps", "1") == 0
    model = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert train_here(out, "--max_steps", "3") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "finished run" in err[0] and "--overwrite_output_dir" in err[0]
    assert (out / "model.safetensors").read_bytes() == model
    assert train_here(out, "--max_steps", "3", "--overwrite_output_dir", "true") == 0
    assert (out / "model.safetensors").read_bytes() != model
    assert not list(out.glob("checkpoint-*"))  # the replaced run's checkpoints cannot be resumed by mistake


def test_save_steps_alone_saves_and_a_bare_resume_continues_from_the_latest_complete_checkpoint(tmp_path):
    """4 steps saved every 2, then resumed to 6 (replacing the finished 4-step run, so only when told): the same
    weights as 6 steps in one go (a Llama: no dropout, whose random masks the Trainer does not replay bit for bit
    across a resume)."""
    llama = ["--model_family", "llama"]
    assert train_here(tmp_path / "straight", "--max_steps", "6", *llama) == 0
    out = tmp_path / "resumed"
    assert train_here(out, "--max_steps", "4", "--save_steps", "2", *llama) == 0
    assert sorted(d.name for d in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    (out / "checkpoint-5").mkdir()  # a half-written checkpoint (no trainer_state.json) must be passed over
    assert train_here(out, "--max_steps", "6", "--resume_from_checkpoint", *llama) == 2  # would replace the model
    assert train_here(out, "--max_steps", "6", "--resume_from_checkpoint", "--overwrite_output_dir", "true", *llama) == 0
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "straight" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("eval_steps, expected", [("2", [2, 4]), ("3", [3, 4])])
def test_the_final_evaluation_is_not_repeated(tmp_path, eval_steps, expected):
    out = tmp_path / "run"
    assert train_here(out, "--max_steps", "4", "--eval_strategy", "steps", "--eval_steps", eval_steps) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    evals = [h for h in metrics["log_history"] if "eval_loss" in h]
    assert [h["step"] for h in evals] == expected and metrics["eval_loss"] == evals[-1]["eval_loss"]


def test_without_matplotlib_the_run_says_once_that_the_plot_was_skipped(tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None\n"  # as if matplotlib were not installed
            "from hf_badm.app.cli import main\nsys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", code, "train", "recipes/pretrain/tiny-gpt.yaml", *TINY, "--max_steps",
                           "1", "--output_dir", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count(PLOT_SKIPPED) == 1 and "plots" in PLOT_SKIPPED
    assert (tmp_path / "run" / "metrics.json").exists() and not (tmp_path / "run" / "loss.png").exists()


@pytest.mark.timeout(600)
def test_accelerate_cpu_launch_of_two_processes_warns_that_it_trains_alone(tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "hf_badm", "train",
           "recipes/pretrain/tiny-gpt.yaml", *TINY, "--max_steps", "1", "--output_dir", str(tmp_path / "run")]
    code, log = run_process_group(cmd, 540, cwd=ROOT, env=launch_env(OMP_NUM_THREADS="1"))
    assert code == 0, log[-4000:]
    assert log.count("hf-badm: warning: accelerate launch --cpu asked for several processes but started one") == 1


@pytest.mark.skipif(hook_parameters(Trainer, RESHARD_HOOK[0]) != RESHARD_HOOK[1],
                    reason="transformers 4.x lacks Trainer._prepare_for_training: refused (tests/test_reshard.py)")
@pytest.mark.timeout(600)
def test_a_zero_checkpoint_of_two_ranks_resumes_on_one_rank_and_what_cannot_be_exact_is_refused(tmp_path, capsys):
    """ZeRO-3 on 2 ranks, checkpoint at step 3 of 6, then the same command on 1 rank with --resume_from_checkpoint
    (accumulation 2: the same global batch): BADM's state files (newton_schulz: the matrices' momentum and the
    normalized solve's moments elsewhere) are re-partitioned, and the final weights are the uninterrupted 2-rank run's
    (float32, within the issue's 1e-3 max-relative on every tensor; a Llama: no dropout, whose masks differ per rank,
    and every tensor has a gradient). Resumes that cannot be exact exit 2 with one line and write nothing: bf16 under DeepSpeed at another
    world size; DeepSpeed's files without BADM's, resumed without DeepSpeed; a ZeRO checkpoint under FSDP (its
    arguments only: the Trainer's FSDP needs GPUs)."""
    from unittest import mock

    from safetensors.torch import load_file

    recipe = ["-m", "hf_badm", "train", "recipes/pretrain/tiny-gpt-newton-schulz.yaml", *TINY, "--model_family",
              "llama", "--max_steps", "6", "--use_cpu", "true"]
    zero3 = ["--deepspeed", "recipes/launch/zero3.json"]
    env = launch_env(OMP_NUM_THREADS="1")

    def torchrun(ranks: int, *args: str) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
               "--master_port", str(free_port()), *recipe, *zero3, *args]
        code, log = run_process_group(cmd, 300, cwd=ROOT, env=env)
        assert code == 0, log[-4000:]

    torchrun(2, "--save_steps", "3", "--output_dir", str(tmp_path / "two"))
    checkpoint = tmp_path / "two" / "checkpoint-3"
    assert sorted(p.name for p in checkpoint.glob("badm_zero_rank*")) == ["badm_zero_rank0-of-2.pt",
                                                                           "badm_zero_rank1-of-2.pt"]
    torchrun(1, "--gradient_accumulation_steps", "2", "--resume_from_checkpoint", str(checkpoint),
             "--output_dir", str(tmp_path / "one"))
    full, moved = (load_file(tmp_path / run / "model.safetensors") for run in ("two", "one"))
    start = load_file(checkpoint / "model.safetensors")
    assert max(float((moved[k] - full[k]).abs().max() / full[k].abs().max()) for k in full) <= 1e-3
    assert max(float((start[k] - full[k]).abs().max() / full[k].abs().max()) for k in full) > 1e-2  # steps 4-6 ran

    bf16 = subprocess.run([sys.executable, *recipe, *zero3, "--bf16", "true", "--gradient_accumulation_steps", "2",
                           "--resume_from_checkpoint", str(checkpoint), "--output_dir", str(tmp_path / "bf16")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    lines = bf16.stderr.strip().splitlines()
    assert bf16.returncode == 2 and not bf16.stdout and len(lines) == 1 and "float32 only" in lines[0], bf16.stderr
    assert not (tmp_path / "bf16").exists()
    bare = tmp_path / "bare" / "checkpoint-3"
    shutil.copytree(checkpoint, bare, ignore=shutil.ignore_patterns("badm_zero_rank*"))
    saved = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for args, why in (([str(bare)], "resumes under DeepSpeed on 2 ranks only, not on 1 rank without DeepSpeed"),
                      ([str(checkpoint), "--fsdp", "full_shard"], "saved by DeepSpeed ZeRO: resuming it under FSDP")):
        capsys.readouterr()
        with mock.patch.dict(os.environ):  # TrainingArguments export FSDP's settings: not for the tests after this
            assert main([*recipe[2:], "--resume_from_checkpoint", *args, "--output_dir", str(tmp_path / "no")]) == 2
        out, err = capsys.readouterr()
        assert not out and len(err.strip().splitlines()) == 1 and why in err, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == saved  # nothing written
