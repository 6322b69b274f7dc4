"""Tests for hf_badm.app.data (also importable as hf_badm.data): the built-in corpus and tasks, the local tokenizer, loading and blocking."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, default_data_collator

from hf_badm.app.data import (
    INSTRUCTION_TASKS,
    build_tokenizer,
    builtin_text_dataset,
    evaluate_exact_match,
    exact_match,
    generate_completions,
    generate_corpus,
    instruction_dataset,
    instruction_examples,
    load_instruction_dataset,
    load_text_dataset,
    tokenize_for_causal_lm,
)

_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
          "sixteen seventeen eighteen nineteen twenty").split()
NUMBER = {w: i for i, w in enumerate(_WORDS)} | {f"twenty-{w}": 20 + i for i, w in enumerate(_WORDS[1:10], 1)}
NUMBER["no"] = 0


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return generate_corpus(500, seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    texts = generate_corpus(300, seed=1) + [e["prompt"] + e["completion"] for e in instruction_examples(1000, seed=1)]
    return build_tokenizer(texts, vocab_size=1024)


# ----------------------------------------------------------------------------- corpus


def test_corpus_is_deterministic_per_seed():
    assert generate_corpus(30, seed=3) == generate_corpus(30, seed=3)
    assert generate_corpus(30, seed=3) != generate_corpus(30, seed=4)


def test_corpus_is_varied(corpus):
    sentences = {s for doc in corpus for s in re.split(r"(?<=[.!?\"])\s+|\n", doc)}
    words = {w for doc in corpus for w in re.findall(r"[a-z']+", doc.lower())}
    assert len(sentences) > 3000
    assert 250 < len(words) < 1000
    assert len(set(corpus)) == len(corpus)


def test_corpus_long_range_facts_are_consistent(corpus):
    checked = 0
    for doc in corpus:
        intro = doc.split("\n")[0]
        for verb, name, garment, color in re.findall(r"What color (was|were) (\w+)'s (\w+)\?\nAnswer: (\w+)\.", doc):
            assert name in intro and f"{color.lower()} {garment}" in intro
            assert (verb == "were") == garment.endswith("s")  # "were ... boots", "was ... hat"
            checked += 1
        for name, home in re.findall(r"Where does (\w+) live\?\nAnswer: (\w+)\.", doc):
            assert name in intro and f"in {home}".lower() in intro.lower()
            checked += 1
        main = re.search(r"(?:named|called) (\w+)\.|^(\w+) was an? ", intro)  # the first sentence names them
        assert doc.count(main.group(1) or main.group(2)) >= 4  # and they recur through the story
    assert checked > 200


def test_corpus_arithmetic_and_agreement(corpus):
    n_gave = n_brought = 0
    for doc in corpus:
        for n, k, left in re.findall(r"(?:picked|found|collected) ([\w-]+) \w+\. \w+ gave ([\w-]+) \w+ to \w+\. "
                                     r"Now \w+ had ([\w-]+) \w+ left\.", doc):
            assert NUMBER[n] - NUMBER[k] == NUMBER[left]
            n_gave += 1
        for n, k, total in re.findall(r"(?:picked|found|collected) ([\w-]+) \w+\. \w+ brought ([\w-]+) \w+ more\. "
                                      r"Together they had ([\w-]+) \w+\.", doc):
            assert NUMBER[n] + NUMBER[k] == NUMBER[total]
            n_brought += 1
        for number, noun in re.findall(r"(?<![\w-])(one|two|three|four|five|six|seven|eight|nine|ten) (\w+)", doc):
            if noun != "after":  # "one after the other"
                assert noun.endswith("s") == (number != "one"), (number, noun)
        assert "a orange" not in doc and "a apple" not in doc and "an red" not in doc
    assert n_gave > 20 and n_brought > 20


def test_builtin_text_dataset_is_held_out():
    ds = builtin_text_dataset(num_train=200, num_eval=50, seed=5)
    assert isinstance(ds, DatasetDict) and set(ds) == {"train", "test"}
    assert ds["train"].column_names == ["text"] and (len(ds["train"]), len(ds["test"])) == (200, 50)
    assert list(ds["train"]["text"]) == generate_corpus(200, seed=5)
    assert not set(ds["train"]["text"]) & set(ds["test"]["text"])
    assert list(builtin_text_dataset(200, 50, seed=5)["test"]["text"]) == list(ds["test"]["text"])


# ----------------------------------------------------------------------------- instruction tasks


def _recompute(task: str, prompt: str) -> str:
    question = prompt.removesuffix("\nAnswer:")
    if task in ("add", "sub", "mul"):
        x, op, y = re.fullmatch(r"Compute (\d+) ([-+*]) (\d+)\.", question).groups()
        return str({"+": int(x) + int(y), "-": int(x) - int(y), "*": int(x) * int(y)}[op])
    if task in ("copy", "reverse"):
        letters = question.split(": ", 1)[1].split()
        return " ".join(letters if task == "copy" else letters[::-1])
    if task == "lookup":
        pairs, key = re.fullmatch(r"Keys: (.*)\. What is (\w)\?", question).groups()
        return dict(p.split("=") for p in pairs.split(", "))[key]
    assert task == "sort"
    return " ".join(sorted(question.split(": ", 1)[1].split(), key=int))


def test_instruction_answers_are_correct():
    examples = instruction_examples(2000, seed=0)
    assert {e["task"] for e in examples} == set(INSTRUCTION_TASKS)
    for e in examples:
        assert e["prompt"].endswith("\nAnswer:") and e["completion"].startswith(" ")
        assert e["completion"].strip() == _recompute(e["task"], e["prompt"]), e
    assert all(int(e["completion"]) >= 0 for e in examples if e["task"] == "sub")


def test_instruction_dataset_split_and_tasks():
    ds = instruction_dataset(num_train=300, num_eval=100, seed=2, tasks=["add", "reverse"])
    assert set(ds["train"].column_names) == {"prompt", "completion", "task"}
    assert set(ds["train"]["task"]) | set(ds["test"]["task"]) == {"add", "reverse"}
    assert not set(ds["train"]["prompt"]) & set(ds["test"]["prompt"])
    again = instruction_dataset(300, 100, seed=2, tasks=["add", "reverse"])
    assert list(again["test"]["prompt"]) == list(ds["test"]["prompt"])
    with pytest.raises(ValueError, match="divide"):
        instruction_examples(3, tasks=["divide"])
    with pytest.raises(ValueError, match="held-out"):  # 20k draws cover all 1000 "x * y" prompts
        instruction_dataset(num_train=20_000, num_eval=50, tasks=["mul"])


def test_exact_match():
    assert exact_match(["4", " 1 2 ", "x"], [" 4", "1  2", "y"]) == pytest.approx(2 / 3)
    assert exact_match(["12"], ["1 2"]) == 0.0
    with pytest.raises(ValueError):
        exact_match(["1"], ["1", "2"])
    with pytest.raises(ValueError):
        exact_match([], [])


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip(tokenizer, corpus):
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == (
        "<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>")
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id}) == 4
    texts = corpus[:20] + [e["prompt"] + e["completion"] for e in instruction_examples(50, seed=9)]
    texts.append("Unseen text: café, naïve ☃ {}[]")  # byte-level: anything encodes without <|unk|>
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.tokenize("Compute 12 * 7.")[1:3] == ["Ġ1", "2"]  # one digit per token
    assert len(tokenizer(corpus[0])["input_ids"]) < len(corpus[0]) / 3  # words are mostly single tokens


def test_tokenizer_save_and_reload(tmp_path, corpus):
    built = build_tokenizer(corpus[:100], vocab_size=400, save_dir=tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    text = corpus[1] + "\nCompute 45 + 7.\nAnswer: 52"
    assert loaded(text)["input_ids"] == built(text)["input_ids"]
    assert (loaded.eos_token_id, loaded.pad_token_id, loaded.bos_token_id) == (
        built.eos_token_id, built.pad_token_id, built.bos_token_id)
    assert len(loaded) == 400


# ----------------------------------------------------------------------------- loading


def test_load_local_files(tmp_path):
    (tmp_path / "a.txt").write_text("first line\nsecond line\nthird line\nfourth line\n")
    txt = load_text_dataset(str(tmp_path / "a.txt"), eval_fraction=0.25)
    lines = ["first line", "fourth line", "second line", "third line"]
    assert sorted([*txt["train"]["text"], *txt["test"]["text"]]) == lines
    assert len(txt["test"]) == 1

    rows = [{"content": f"story {i}", "id": i} for i in range(20)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    jl = load_text_dataset(str(tmp_path / "d.jsonl"), text_column="content", eval_fraction=0.1, seed=1)
    assert jl["train"].column_names == ["text"] and (len(jl["train"]), len(jl["test"])) == (18, 2)

    Dataset.from_list(rows).rename_column("content", "text").to_parquet(str(tmp_path / "d.parquet"))
    pq = load_text_dataset(str(tmp_path / "d.parquet"))
    assert sorted([*pq["train"]["text"], *pq["test"]["text"]]) == sorted(r["content"] for r in rows)

    builtin = builtin_text_dataset(30, 10, seed=0)
    builtin.save_to_disk(str(tmp_path / "dd"))
    builtin["train"].save_to_disk(str(tmp_path / "single"))
    dd = load_text_dataset(str(tmp_path / "dd"))
    assert list(dd["test"]["text"]) == list(builtin["test"]["text"])  # an existing test split is kept, not re-split
    assert len(load_text_dataset(str(tmp_path / "single"), eval_fraction=0.2)["test"]) == 6

    data_dir = tmp_path / "jsonl_dir"
    data_dir.mkdir()
    for split, n in (("train", 8), ("test", 3)):
        (data_dir / f"{split}.jsonl").write_text("\n".join(json.dumps({"text": f"{split} {i}"}) for i in range(n)))
    split_dir = load_text_dataset(str(data_dir))
    assert (len(split_dir["train"]), len(split_dir["test"])) == (8, 3)


def test_load_instruction_data(tmp_path):
    rows = [{"prompt": f"Q{i}:", "completion": f" A{i}", "extra": i} for i in range(10)]
    (tmp_path / "sft.json").write_text(json.dumps(rows))
    ds = load_instruction_dataset(str(tmp_path / "sft.json"), eval_fraction=0.2)
    assert ds["train"].column_names == ["prompt", "completion"] and len(ds["test"]) == 2
    assert len(load_instruction_dataset("builtin", num_train=20, num_eval=5)["test"]) == 5
    as_text = load_text_dataset(str(tmp_path / "sft.json"), text_column="prompt", eval_fraction=0.2)
    assert as_text["train"].column_names == ["text"] and as_text["train"][0]["text"].startswith("Q")


def test_load_errors_are_clear(tmp_path):
    missing = tmp_path / "nope" / "corpus.jsonl"
    with pytest.raises(FileNotFoundError, match="corpus.jsonl"):
        load_text_dataset(str(missing))
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        load_text_dataset("./missing_dir")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl.*'text'.*body"):
        load_text_dataset(str(tmp_path / "bad.jsonl"))
    with pytest.raises(ValueError, match="'prompt', 'completion'"):
        load_instruction_dataset(str(tmp_path / "bad.jsonl"))
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_text_dataset(str(tmp_path / "x.xml"))


# ----------------------------------------------------------------------------- blocks and training


def test_tokenize_for_causal_lm(tokenizer):
    ds = builtin_text_dataset(40, 10, seed=0)
    blocks = tokenize_for_causal_lm(ds, tokenizer, block_size=32)
    train = blocks["train"]
    assert train.column_names == ["input_ids", "attention_mask", "labels"]
    assert all(len(row) == 32 for row in train["input_ids"]) and list(train["labels"]) == list(train["input_ids"])
    n_tokens = sum(len(tokenizer(t)["input_ids"]) + 1 for t in ds["train"]["text"])
    assert len(train) == n_tokens // 32  # only the final partial block is dropped
    all_ids = [i for row in train["input_ids"] for i in row]
    assert all_ids[0] == tokenizer.bos_token_id and all_ids.count(tokenizer.bos_token_id) == 40
    assert all_ids.count(tokenizer.eos_token_id) >= 39  # each document ends with EOS (the last may be cut off)
    batch = default_data_collator([train[i] for i in range(4)])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (4, 32)
    with pytest.raises(ValueError, match="'body'"):
        tokenize_for_causal_lm(ds["train"], tokenizer, 32, text_column="body")
    with pytest.raises(ValueError, match="no full block"):
        tokenize_for_causal_lm(Dataset.from_dict({"text": ["short"]}), tokenizer, 32)


@pytest.fixture
def one_thread():
    """A model this small trains fastest on one thread, and far faster when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_gpt_learns_the_builtin_corpus(tokenizer, one_thread):
    torch.manual_seed(0)
    block = 64
    data = tokenize_for_causal_lm(builtin_text_dataset(300, 30, seed=0), tokenizer, block).with_format("torch")
    train, held_out = data["train"][:]["input_ids"], data["test"][:32]["input_ids"]
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=block, n_embd=64, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = model(input_ids=held_out, labels=held_out).loss.item()
        model.train()
        return loss

    start = eval_loss()
    assert abs(start - math.log(len(tokenizer))) < 1.0  # untrained: about uniform
    for _ in range(60):
        batch = train[torch.randint(len(train), (16,))]
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    end = eval_loss()
    print(f"held-out loss {start:.3f} -> {end:.3f} ({1 - end / start:.0%} lower)")
    assert end < 0.75 * start

    prompts = ["Once upon a time, there was", "Question: Where does Mia live?\nAnswer:", "Tom"]
    batched = generate_completions(model, tokenizer, prompts, max_new_tokens=8)
    assert batched == [generate_completions(model, tokenizer, [p], max_new_tokens=8)[0] for p in prompts]
    assert model.training and tokenizer.padding_side == "right"
    examples = instruction_examples(4, seed=0)
    predictions = generate_completions(model, tokenizer, [e["prompt"] for e in examples], max_new_tokens=4)
    score = evaluate_exact_match(model, tokenizer, examples, max_new_tokens=4)
    assert score == exact_match(predictions, [e["completion"] for e in examples])
    own = [{"prompt": e["prompt"], "completion": f" {p}"} for e, p in zip(examples, predictions)]
    assert evaluate_exact_match(model, tokenizer, own, max_new_tokens=4) == 1.0


def test_a_long_text_is_tokenized_in_pieces_to_the_same_blocks(tokenizer, monkeypatch):
    """Pieces cut before whitespace give the ids of one call (special tokens once), so a huge single-line file
    is tokenized in bounded memory without changing the data (docs/data.md)."""
    import hf_badm.app.data as app_data

    text = " ".join(generate_corpus(40, seed=3)).replace("\n", " ")
    whole = tokenize_for_causal_lm(Dataset.from_dict({"text": [text, "a short one"]}), tokenizer, 16)
    monkeypatch.setattr(app_data, "TOKENIZE_PIECE_CHARS", 200)
    pieces = tokenize_for_causal_lm(Dataset.from_dict({"text": [text, "a short one"]}), tokenizer, 16)
    assert len(text) > 20 * 200 and pieces["input_ids"] == whole["input_ids"]
    spans = list(app_data._pieces(text, 200))
    assert "".join(text[s:e] for s, e in spans) == text and all(text[e].isspace() for _, e in spans[:-1])


def test_blank_texts_make_no_block_instead_of_failing(tokenizer):
    with pytest.raises(ValueError, match="no full block"):
        tokenize_for_causal_lm(Dataset.from_dict({"text": ["   ", "\n"] * 600}), tokenizer, 16)
