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
