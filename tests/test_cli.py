"""The hf-badm console script: every recipe end to end (a few steps), compare, demo, help, bad recipes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

from procs import run_process_group

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


def test_help_is_complete():
    top = cli("--help")
    assert top.returncode == 0 and all(c in top.stdout for c in ("train", "compare", "demo"))
    train = cli("train", "--help")
    for field in ("--sigma", "--rho", "--mode", "--sub_batches_per_micro_batch", "--sub_batch_weights", "--model_family",
                  "--model_name_or_path", "--task", "--dataset", "--optimizer", "--learning_rate", "--max_steps",
                  "--deepspeed"):
        assert field in train.stdout, field
    for command in ("compare", "demo"):
        done = cli(command, "--help")
        assert done.returncode == 0 and "--optimizers" in done.stdout and "--output_dir" in done.stdout


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
    done = cli("train", "recipes/pretrain/tiny-gpt-newton-schulz.yaml", *FAST, "--output_dir", str(tmp_path / "ns"))
    assert done.returncode == 0, done.stderr[-3000:]
    badm = assert_run_written(tmp_path / "ns")["recipe"]["badm"]
    assert (badm["preconditioner"], badm["elementwise_preconditioner"]) == ("newton_schulz", "normalized")


def test_llama_pretrain_then_lora_sft_recipes(tmp_path):
    pre = cli("train", "recipes/pretrain/small-llama.yaml", *FAST, "--output_dir", str(tmp_path / "pre"))
    assert pre.returncode == 0, pre.stderr[-3000:]
    assert assert_run_written(tmp_path / "pre")["recipe"]["badm"]["mode"] == "per_sub_batch"
    lora = cli("train", "recipes/sft/lora-llama.yaml", *FAST, "--exact_match_examples", "8",
               "--model_name_or_path", str(tmp_path / "pre"), "--output_dir", str(tmp_path / "lora"))
    assert lora.returncode == 0, lora.stderr[-3000:]
    metrics = assert_run_written(tmp_path / "lora")
    assert 0.0 <= metrics["exact_match"] <= 1.0 and (tmp_path / "lora" / "adapter_config.json").exists()


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
    code, log = run_process_group(cmd, 540, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert code == 0, log[-4000:]
    metrics = assert_run_written(tmp_path / "z3")
    assert (tmp_path / "z3" / "model.safetensors").exists() and metrics["train_loss"] > 0


def test_compare_writes_table_and_plot(tmp_path):
    done = cli("compare", "recipes/pretrain/tiny-gpt.yaml", "--optimizers", "badm,badm-newton_schulz,adamw", *FAST,
               "--output_dir", str(tmp_path / "cmp"))
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| badm |" in table and "| adamw_torch | 0.003 |" in table and "comparison.png" in done.stdout
    assert "| badm-newton_schulz | 0.03 |" in table
    ns = json.loads((tmp_path / "cmp" / "badm-newton_schulz" / "metrics.json").read_text())
    assert ns["recipe"]["badm"]["preconditioner"] == "newton_schulz"
    assert matplotlib.image.imread(tmp_path / "cmp" / "comparison.png").ndim == 3


def test_compare_rejects_an_unknown_badm_variant_before_training(tmp_path):
    done = cli("compare", "recipes/pretrain/tiny-gpt.yaml", "--optimizers", "adamw,badm-adam", *FAST,
               "--output_dir", str(tmp_path / "cmp"))
    assert done.returncode == 2 and "preconditioner" in done.stderr and not (tmp_path / "cmp" / "adamw_torch").exists()


def test_demo_runs_and_prints_the_table(tmp_path):
    done = cli("demo", "--max_steps", "2", "--eval_steps", "1", "--num_train_examples", "100",
               "--output_dir", str(tmp_path / "demo"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| badm | 3 |" in done.stdout and "| adamw_torch | 0.01 |" in done.stdout
    assert "| badm-newton_schulz | 0.03 |" in done.stdout
    assert (tmp_path / "demo" / "comparison.png").exists()


@pytest.mark.parametrize(
    "recipe, overrides, needle",
    [
        ("max_steps: 3\nwarmup_ratio_typo: 0.1\n", [], "warmup_ratio_typo"),
        ("max_steps: three\n", [], "max_steps"),
        ("max_steps: 3\ndataset: ./no/such/file.jsonl\n", [], "no/such/file.jsonl"),
        ("max_steps: 3\nmodel_family: gpt5\n", [], "model_family"),
        ("max_steps: 3\n", ["--sigma", "-1"], "sigma"),
        ("max_steps: 3\ntask: finetune\nmodel_name_or_path: ./missing-model\n", [], "missing-model"),
    ],
)
def test_bad_recipe_fails_before_training_with_a_short_message(tmp_path, recipe, overrides, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(recipe)
    done = cli("train", str(path), *overrides, "--output_dir", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode != 0
    assert needle in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) <= 3, done.stderr
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_missing_recipe_file(tmp_path):
    done = cli("train", str(tmp_path / "nope.yaml"))
    assert done.returncode != 0 and "nope.yaml" in done.stderr and "Traceback" not in done.stderr
