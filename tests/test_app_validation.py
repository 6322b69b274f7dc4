"""Bad recipes, values, paths and data are refused before anything is written: exit code 2, at most five
lines naming the field or file, no output_dir. Most cases call the console script's main in-process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hf_badm.app.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--max_steps", "2", "--num_train_examples", "50", "--num_eval_examples", "4", "--block_size", "16",
         "--per_device_train_batch_size", "8"]
ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))


def refused(capsys, tmp_path: Path, argv: list[str]) -> str:
    """Run ``hf-badm`` in this process; assert the refusal's shape and return its message (the last line)."""
    code = main([*argv, "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) <= 5 and err.splitlines()[-1].startswith("hf-badm: error: "), err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    return err.splitlines()[-1]


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.mark.parametrize("recipe, needle", [
    ("learning_rate: -1\n", "learning_rate"),
    ("learning_rate: 0\n", "learning_rate"),
    ("learning_rate: .nan\n", "learning_rate"),
    ("learning_rate: .inf\n", "learning_rate"),
    ("learning_rate: 1.0e-300\n", "learning_rate"),  # BADM sigma = 1e300
    ("weight_decay: -1\n", "weight_decay"),
    ("max_grad_norm: .nan\n", "max_grad_norm"),
    ("optimizer: muon\nmuon_adamw_lr: -0.1\n", "muon_adamw_lr"),
    ("optimizer: muon_qhadam\nqhadam_nu: 1.5\n", "qhadam_nu"),
    ("sigma: 1.0e+308\n", "sigma"),
    ("sigma: 1.0e-300\n", "sigma"),
    ("rho: 1.0e+308\n", "rho"),
    ("elementwise_sigma: 1.0e+20\npreconditioner: newton_schulz\n", "elementwise_sigma"),
    ("mode: per_sub_batch\nfp16: true\n", "fp16"),
    ("mode: per_sub_batch\nsub_batches_per_micro_batch: 16\n", "sub_batches_per_micro_batch"),  # batch 8
    ("sub_batches_per_micro_batch: 2\n", "sub_batches_per_micro_batch"),  # fused mode ignores it
    ("max_steps: three\n", "max_steps"),
    ("warmup_ratio_typo: 0.1\n", "warmup_ratio_typo"),
    ("model_family: gpt5\n", "model_family"),
    ("optimizer: adamw_typo\n", "adamw_typo"),
])
def test_bad_values(capsys, tmp_path, recipe, needle):
    path = write(tmp_path, "bad.yaml", recipe)
    assert needle in refused(capsys, tmp_path, ["train", str(path), *SMALL])


@pytest.mark.parametrize("field, value", [("block_size", "1"), ("num_train_examples", "1"),
                                          ("num_eval_examples", "0")])
def test_sizes_too_small_for_a_split_or_a_block(capsys, tmp_path, field, value):
    assert field in refused(capsys, tmp_path, ["train", *SMALL, f"--{field}", value])


@pytest.mark.parametrize("recipe, needle", [
    ("", "empty"),
    ("# only a comment\n", "empty"),
    ("1: 3\n", "field names"),
    ("~: 3\n", "field names"),
    ("max_steps: 3\nlearning_rate: 1\nmax_steps: 4\n", "duplicate field 'max_steps'"),
    ("- max_steps\n", "mapping"),
    ("max_steps: [3\n", "not valid YAML"),
    (ALIAS_BOMB, "alias"),
])
def test_bad_recipe_files(capsys, tmp_path, recipe, needle):
    path = write(tmp_path, "bad.yaml", recipe)
    err = refused(capsys, tmp_path, ["train", str(path)])
    assert needle in err and "bad.yaml" in err


def test_the_alias_bomb_is_refused_without_expanding(capsys, tmp_path):
    """397 bytes that would expand into 9**9 strings: refused in well under a second."""
    assert len(ALIAS_BOMB) < 400
    path = write(tmp_path, "bomb.yaml", ALIAS_BOMB)
    start = time.perf_counter()
    refused(capsys, tmp_path, ["train", str(path)])
    assert time.perf_counter() - start < 1.0


def test_aliases_of_plain_values_still_work(capsys, tmp_path):
    """Refusing collection aliases keeps the scalar ones a recipe may use: the bad value behind one is found."""
    path = write(tmp_path, "alias.yaml", "max_steps: &n 3\neval_steps: *n\nlearning_rate: -1\n")
    err = refused(capsys, tmp_path, ["train", str(path)])
    assert "learning_rate" in err and "alias" not in err


@pytest.mark.parametrize("name, content, needle", [
    ("empty.jsonl", "", "is empty"),
    ("empty.txt", "", "is empty"),
    ("blank.jsonl", "\n\n  \n", "blank"),
    ("blank.txt", "\n\n\n", "blank"),
    ("binary.txt", bytes(range(256)) * 4, "text"),
    ("nul.jsonl", b'{"text": "a"}\n\x00\x00\n', "NUL"),
    ("one.txt", "only one line of text\n", "too few"),
    ("one.jsonl", '{"text": "one row"}\n\n', "too few"),
    ("data.xml", "<a>b</a>\n<a>c</a>\n<a>d</a>\n", "unsupported"),
])
def test_bad_data_files(capsys, tmp_path, name, content, needle):
    data = write(tmp_path, name, content)
    err = refused(capsys, tmp_path, ["train", "--dataset", str(data), *SMALL])
    assert needle in err and name in err


def test_data_that_fails_to_load_is_named(capsys, tmp_path):
    """Checked by loading it in memory, before anything is written: a column that is not there, one JSON row."""
    rows = "".join(f'{{"content": "story {i}"}}\n' for i in range(5))
    err = refused(capsys, tmp_path, ["train", "--dataset", str(write(tmp_path, "c.jsonl", rows)), *SMALL])
    assert "c.jsonl" in err and "text" in err
    err = refused(capsys, tmp_path, ["train", "--dataset", str(write(tmp_path, "one.json", '[{"text": "a"}]')), *SMALL])
    assert "one.json" in err and "too few" in err


@pytest.mark.parametrize("spec, needle", [
    ("./no/such/file.jsonl", "not found"),
    ("/no/such/dir", "not found"),
    ("no/such/dir/at/all", "not found"),  # neither a path that exists nor a hub id
    ("surely_not_a_cached_dataset_xyz", "HF_HUB_OFFLINE"),  # a hub id, and the tests run offline
])
def test_missing_datasets_are_named_fast(capsys, tmp_path, spec, needle):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # tests/conftest.py
    start = time.perf_counter()
    err = refused(capsys, tmp_path, ["train", "--dataset", spec, *SMALL])
    assert spec in err and needle in err and time.perf_counter() - start < 10


@pytest.mark.parametrize("field, value, task", [
    ("model_name_or_path", "./missing-model", "finetune"),
    ("model_name_or_path", "/abs/missing-model", "finetune"),
    ("tokenizer_name_or_path", "./missing-tokenizer", "pretrain"),
])
def test_missing_model_and_tokenizer_paths(capsys, tmp_path, field, value, task):
    err = refused(capsys, tmp_path, ["train", "--task", task, f"--{field}", value, *SMALL])
    assert f"{field}: directory not found: {value}" in err


def test_a_directory_without_a_model(capsys, tmp_path):
    (tmp_path / "not-a-model").mkdir()
    err = refused(capsys, tmp_path, ["train", "--task", "finetune", "--model_name_or_path", str(tmp_path / "not-a-model"),
                                     *SMALL])
    assert f"model_name_or_path: cannot load {tmp_path / 'not-a-model'}" in err


def test_finetune_needs_a_model(capsys, tmp_path):
    assert "model_name_or_path" in refused(capsys, tmp_path, ["train", "--task", "finetune", *SMALL])


def test_shipped_finetune_recipe_before_pretraining_says_what_to_run(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a fresh place: no outputs/ yet
    err = refused(capsys, tmp_path, ["train", str(ROOT / "recipes/finetune/full-gpt.yaml")])
    assert err.startswith("hf-badm: error: model_name_or_path: directory not found: outputs/pretrain-tiny-gpt")
    assert "recipes/pretrain/tiny-gpt.yaml" in err and "first" in err


def test_missing_recipe_and_unknown_command(capsys, tmp_path):
    assert "nope.yaml" in refused(capsys, tmp_path, ["train", str(tmp_path / "nope.yaml")])
    assert "frobnicate" in refused(capsys, tmp_path, ["frobnicate"])
    recipe = str(ROOT / "recipes/pretrain/tiny-gpt.yaml")
    assert "--learning_rates" in refused(capsys, tmp_path, ["compare", recipe, "--learning_rates", "adamw"])
    assert "--optimizers" in refused(capsys, tmp_path, ["compare", recipe, "--optimizers", ","])


def test_resume_without_a_checkpoint(capsys, tmp_path):
    err = refused(capsys, tmp_path, ["train", "--resume_from_checkpoint", *SMALL])
    assert "resume_from_checkpoint" in err and "no complete checkpoint" in err


@pytest.mark.parametrize("recipe, data", [("learning_rate: -1\n", None), ("max_steps: 2\n", b"")])
def test_the_console_script_refuses_in_one_line(tmp_path, recipe, data):
    """The whole stderr of a fresh process (warnings and progress bars included): one line, exit code 2."""
    extra = ["--dataset", str(write(tmp_path, "empty.jsonl", data))] if data is not None else []
    done = subprocess.run([sys.executable, "-m", "hf_badm", "train", str(write(tmp_path, "r.yaml", recipe)), *extra,
                           "--output_dir", str(tmp_path / "out")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert ("learning_rate" if data is None else "empty.jsonl") in done.stderr and not (tmp_path / "out").exists()


def test_per_sub_batch_under_deepspeed_is_refused_before_anything_starts(tmp_path):
    """A subprocess (DeepSpeed settings are process-wide): refused at parse time, before DeepSpeed starts."""
    done = subprocess.run([sys.executable, "-m", "hf_badm", "train", "--mode", "per_sub_batch", "--deepspeed",
                           str(ROOT / "recipes/launch/zero2.json"), *SMALL, "--output_dir", str(tmp_path / "out")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    err = done.stderr.strip()
    assert done.returncode == 2 and err.startswith("hf-badm: error: ") and "DeepSpeed" in err, err
    assert len(err.splitlines()) <= 5 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("files, needle", [
    ({"train.txt": "a story\n" * 300, "train_extra.jsonl": '{"text": "b"}\n' * 300}, "mixes data file types"),
    ({"train.jsonl": '{"text": "a"}\n' * 10, "test.jsonl": ""}, "test.jsonl is empty"),
    ({"train.txt": "a story\n" * 10, "test.txt": " \n\t\n"}, "test.txt has only blank lines"),
    ({"train.txt": "a story\n" * 10, "more.txt": b"\xff\xfe\x00bad" * 10}, "more.txt is not UTF-8"),
    ({"README.md": "no data here\n"}, "holds no data file"),
])
def test_bad_files_in_a_data_folder_are_named(capsys, tmp_path, files, needle):
    folder = tmp_path / "data"
    folder.mkdir()
    for name, content in files.items():
        write(folder, name, content)
    assert needle in refused(capsys, tmp_path, ["train", "--dataset", str(folder), *SMALL])
