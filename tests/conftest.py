import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")


@pytest.fixture(autouse=True)
def _restore_environment():
    """Each test starts from the same environment: TrainingArguments export ACCELERATE_* variables (mixed precision
    among them) that a later Trainer in this process would read as its own settings (transformers 4.x does)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


# Every optimizer the `hf-badm compare` tests check, in one compare run on the newton_schulz recipe (one interpreter,
# one data set-up: each compare run costs ~25 s before its first step here).
COMPARED = ("badm", "badm-newton_schulz", "adamw", "muon", "normuon", "badm-normuon", "muon_qhadam")


@pytest.fixture(scope="session")
def compared(tmp_path_factory):
    """``(output dir, finished process)`` of that one compare run (tests/test_cli.py's FAST settings)."""
    from test_cli import FAST, cli

    out = tmp_path_factory.mktemp("compare") / "cmp"
    done = cli("compare", "recipes/pretrain/tiny-gpt-newton-schulz.yaml", "--optimizers", ",".join(COMPARED), *FAST,
               "--output_dir", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done
