"""Data for BADM experiments that needs no download.

The built-in corpus is seeded, templated short stories about a fixed cast (home, job and pet never
change: learnable world knowledge) with per-story facts (clothes, food, counts, places) that later
sentences and closing questions must recall, plus causal chains, dialogue and number agreement, so
a small causal LM keeps improving for thousands of steps. Also: instruction tasks with checkable
answers (TRL prompt-completion format), exact-match scoring, a locally trained tokenizer,
local/Hub dataset loading and "group texts" blocking for ``transformers.default_data_collator``.
"""

from __future__ import annotations

import random
from collections import namedtuple
from collections.abc import Callable, Hashable, Iterable, Sequence
from contextlib import contextmanager
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import torch
from datasets import Dataset, DatasetDict
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["INSTRUCTION_TASKS", "generate_corpus", "builtin_text_dataset", "instruction_examples", "instruction_dataset",
           "exact_match", "generate_completions", "evaluate_exact_match", "build_tokenizer", "load_text_dataset",
           "load_instruction_dataset", "tokenize_for_causal_lm"]

PAD, BOS, EOS, UNK = "<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"
_EVAL_SEED_OFFSET = 1_000_003  # eval splits come from another random stream than train

# ----------------------------------------------------------------------------- the corpus

_Character = namedtuple("_Character", "name he him his job home pet pet_name")
_GIRLS = "Mia Lily Anna Rosa Nora Ella Ivy Zoe Lena Ruby Maya Tess".split()
_BOYS = "Tom Ben Leo Max Sam Finn Owen Jack Eli Hugo Noah Theo".split()
_HOMES = "Elmbrook Stonehill Mapleford Riverbend Pinewood Fernvale Oakridge Willowmere Foxhollow".split()
_PETS = "dog cat rabbit parrot turtle goat owl pony".split()
_PET_NAMES = "Biscuit Pepper Coco Sunny Pip Muffin Ziggy Button Clover Pebble Toffee Noodle".split()
# job -> (what they do all day, what they give away)
_JOBS = {"baker": ("baked bread all morning", "a loaf of warm bread"),
         "farmer": ("fed the cows and the hens", "a basket of eggs"),
         "painter": ("painted a picture of the hills", "a small painting"),
         "teacher": ("read old books by the window", "a book of stories"),
         "fisher": ("caught fish in the river", "a silver fish"),
         "builder": ("fixed the roof of a barn", "a wooden box"),
         "doctor": ("helped people who felt sick", "a jar of honey tea"),
         "gardener": ("planted flowers by the gate", "a bunch of flowers"),
         "singer": ("sang songs in the square", "a new song"), "tailor": ("sewed coats and scarves", "a warm scarf"),
         "inventor": ("built a strange machine", "a tiny clock"),
         "sailor": ("mended the sails of a boat", "a shell from the sea")}
_CAST = tuple(  # a fixed world, the same for every corpus seed
    _Character(n, *(("she", "her", "her") if n in _GIRLS else ("he", "him", "his")), list(_JOBS)[i % len(_JOBS)],
               _HOMES[i * 5 % len(_HOMES)], _PETS[i * 3 % len(_PETS)], _PET_NAMES[i * 7 % len(_PET_NAMES)])
    for i, n in enumerate(random.Random(7).sample(_GIRLS + _BOYS, len(_GIRLS + _BOYS))))
_ADJECTIVES = "kind brave clever shy cheerful curious quiet busy patient funny gentle old young".split()
_COLORS = "red blue green yellow orange purple brown grey".split()
_GARMENTS = [("hat", False), ("scarf", False), ("coat", False), ("boots", True), ("mittens", True)]  # (noun, plural)
_FOODS = "apple pie,carrot soup,plum jam,pancakes,cheese,honey cake,berries,warm bread,rice pudding".split(",")
_COUNTABLES = [("apple", "apples"), ("pear", "pears"), ("plum", "plums"), ("cherry", "cherries"), ("egg", "eggs"),
               ("cookie", "cookies"), ("acorn", "acorns"), ("shell", "shells"), ("peach", "peaches"),
               ("flower", "flowers")]
_ITEMS = "key ball book map lantern whistle ring spoon kite drum".split()
_PLACES = ["under the bed", "behind the barn", "near the river", "in the garden", "on the bridge", "by the old tree",
           "inside the shed", "next to the well", "under a bench", "in the tall grass"]
_TIMES = ["One morning", "The next day", "Later that day", "In the afternoon", "After breakfast", "That evening",
          "Early the next morning", "After lunch"]
_WEATHER = [  # (situation, action, result); {his}, {gar} and {it} are filled per story
    ("it began to rain", "took {his} umbrella", "stayed dry"), ("the road was muddy", "walked slowly", "did not fall"),
    ("the wind was very strong", "held on to {his} {gar}", "did not lose {it}"),
    ("it was snowing", "put on {his} {gar}", "kept warm"), ("it was very hot", "sat in the shade", "felt cool again"),
    ("a thick fog came down", "carried a lantern", "found the way home")]
_GAMES = ["hide and seek", "tag", "catch", "a card game", "a guessing game", "hopscotch"]
_DEALS = ["take turns", "play both games, one after the other", "flip a coin", "ask a friend to choose"]
_NUMS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen twenty").split()
_NUMS += [f"twenty-{w}" for w in _NUMS[1:10]]


def _count(n: int, noun: tuple[str, str]) -> str:
    return f"{_NUMS[n]} {noun[0] if n == 1 else noun[1]}" if n else f"no {noun[1]}"


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


class _Story:
    """One story: two characters and the per-story facts that later sentences must recall."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.a, self.b = rng.sample(_CAST, 2)
        self.adj, self.color, self.food = rng.choice(_ADJECTIVES), rng.choice(_COLORS), rng.choice(_FOODS)
        self.gar, self.gar_plural = rng.choice(_GARMENTS)
        self.qa: list[tuple[str, str]] = []  # questions the closing lines may ask, with answers

    def said(self, who: _Character, words: str, verb: str = "said") -> str:
        quoted = words[:-1] + "," if words.endswith(".") else words  # "Hi," said Tom. / Tom said, "Hi."
        return self.rng.choice([f'"{quoted}" {verb} {who.name}.', f'{who.name} {verb}, "{words}"'])

    def intro(self) -> list[str]:
        a, r = self.a, self.rng
        first = r.choice([f"Once upon a time, there was {_a(self.adj)} {a.job} named {a.name}.",
                          f"In {a.home}, there lived {_a(self.adj)} {a.job} called {a.name}.",
                          f"{a.name} was {_a(self.adj)} {a.job} who lived in {a.home}."])
        gar = f"{self.color} {self.gar}" if self.gar_plural else _a(f"{self.color} {self.gar}")
        facts = [f"{_cap(a.he)} had {_a(a.pet)} named {a.pet_name}.", f"{_cap(a.he)} always wore {gar}.",
                 f"{_cap(a.his)} favorite food was {self.food}."]
        if a.home not in first:
            facts.append(f"{_cap(a.his)} home was in {a.home}.")
        r.shuffle(facts)
        verb = "were" if self.gar_plural else "was"
        self.qa += [(f"What color {verb} {a.name}'s {self.gar}?", self.color), (f"Where does {a.name} live?", a.home)]
        return [first, *facts]

    def weather(self) -> list[str]:
        a, r = self.a, self.rng
        fill = {"his": a.his, "gar": f"{self.color} {self.gar}", "it": "them" if self.gar_plural else "it"}
        sit, act, res = (part.format(**fill) for part in r.choice(_WEATHER))
        return [r.choice([f"{r.choice(_TIMES)}, {sit}, so {a.name} {act}. Thanks to that, {a.he} {res}.",
                          f"{r.choice(_TIMES)}, {sit}. {a.name} {act} because {sit}. In the end, {a.he} {res}.",
                          f"{_cap(sit)}. {a.name} knew what to do: {a.he} {act}, and {a.he} {res}."])]

    def lost_item(self) -> list[str]:
        a, b, r = self.a, self.b, self.rng
        item, (place, wrong) = r.choice(_ITEMS), r.sample(_PLACES, 2)
        self.qa.append((f"Where did {a.name} find the {item}?", place))
        return [f"{r.choice(_TIMES)}, {a.name} could not find {a.his} {item}.",
                f"{_cap(a.he)} looked {wrong}, but the {item} was not there.",
                self.said(a, f"{b.name}, have you seen my {item}?", "asked"),
                r.choice([f'"Yes," said {b.name}. "I saw it {place}."',
                          self.said(b, f"I think it is {place}.", "replied")]),
                f"{a.name} went to look, and {a.he} found the {item} {place}.", self.said(a, f"Thank you, {b.name}!")]

    def sharing(self) -> list[str]:
        a, b, r = self.a, self.b, self.rng
        noun, n, k = r.choice(_COUNTABLES), r.randint(2, 12), r.randint(1, 10)
        out = [f"{r.choice(_TIMES)}, {a.name} {r.choice(['picked', 'found', 'collected'])} {_count(n, noun)}."]
        if r.random() < 0.5:
            k = min(k, n)
            out += [f"{_cap(a.he)} gave {_count(k, noun)} to {b.name}.",
                    f"Now {a.name} had {_count(n - k, noun)} left."]
            self.qa.append((f"How many {noun[1]} did {a.name} have left?", _NUMS[n - k]))
        else:
            out += [f"{b.name} brought {_count(k, noun)} more.", f"Together they had {_count(n + k, noun)}."]
            self.qa.append((f"How many {noun[1]} did they have together?", _NUMS[n + k]))
        return out

    def pet_runs(self) -> list[str]:
        a, b, r = self.a, self.b, self.rng
        self.qa.append((f"What is the name of {a.name}'s {a.pet}?", a.pet_name))
        return [f"{r.choice(_TIMES)}, {a.pet_name} the {a.pet} ran away.",
                self.said(a, f"{a.pet_name}! Come back!", r.choice(["called", "shouted"])),
                f"{b.name} heard {a.him} and helped {a.him} look.",
                f"At last, they found {a.pet_name} {r.choice(_PLACES)}.",
                f"{a.name} gave {a.pet_name} some {self.food}, and the {a.pet} was happy."]

    def visit(self) -> list[str]:
        a, b, r = self.a, self.b, self.rng
        work, gift = _JOBS[b.job]
        path = f"from {a.home} to {b.home}" if a.home != b.home else f"across {a.home}"
        self.qa.append((f"What did {b.name} give {a.name}?", gift))
        return [f"{r.choice(_TIMES)}, {a.name} walked {path} to visit {b.name}.",
                f"{b.name} was {_a(b.job)}, so {b.he} {work}.", f"{b.name} gave {a.name} {gift}.",
                self.said(b, r.choice(["This is for you.", "I made it for you.", "I hope you like it."])),
                f"Then they shared some {self.food}, because {self.food} was {a.name}'s favorite food."]

    def game(self) -> list[str]:
        a, b, r = self.a, self.b, self.rng
        g1, g2 = r.sample(_GAMES, 2)
        return [f"{r.choice(_TIMES)}, {a.name} and {b.name} were bored.",
                f"{a.name} wanted to play {g1}, but {b.name} wanted to play {g2}.",
                f"They did not agree, so they decided to {r.choice(_DEALS)}.",
                f"{a.name} and {b.name} were {r.choice(['happy', 'tired', 'proud'])} when the games were over."]

    def ending(self) -> list[str]:
        a, b, it = self.a, self.b, "them" if self.gar_plural else "it"
        return self.rng.sample([f"When the sun went down, {a.name} went home to {a.home} with {a.pet_name}.",
                                f"That night, {a.name} hung {a.his} {self.color} {self.gar} by the door.",
                                f"The {self.adj} {a.job} smiled. It had been a good day.",
                                f"{a.name} and {b.name} were good friends, and they met again the next day."], k=2)

    def render(self) -> str:
        r = self.rng
        episodes = r.sample([self.weather, self.lost_item, self.sharing, self.pet_runs, self.visit, self.game],
                            r.randint(2, 3))
        paragraphs = [self.intro(), *(episode() for episode in episodes), self.ending()]
        if r.random() < 0.6:
            paragraphs += [[f"Question: {q}\nAnswer: {_cap(ans)}."] for q, ans in r.sample(self.qa, 2)]
        return "\n".join(" ".join(p) for p in paragraphs)


def generate_corpus(num_documents: int, seed: int = 0) -> list[str]:
    """Generate ``num_documents`` stories; the same seed always yields the same list."""
    rng = random.Random(seed)
    return [_Story(rng).render() for _ in range(num_documents)]


def _held_out(make: Callable[[], Any], key: Callable[[Any], Hashable], train: Sequence, num_eval: int) -> list:
    """Draw ``num_eval`` distinct items from ``make()`` whose key occurs nowhere in ``train``."""
    seen, out = {key(x) for x in train}, []
    for _ in range(50 * num_eval + 1000):
        if len(out) == num_eval:
            return out
        item = make()
        if key(item) not in seen:
            seen.add(key(item))
            out.append(item)
    raise ValueError(f"could not draw {num_eval} held-out examples unseen in training; use fewer or more varied ones")


def builtin_text_dataset(num_train: int = 2000, num_eval: int = 200, seed: int = 0) -> DatasetDict:
    """Built-in corpus as ``{"train", "test"}`` with a "text" column; test stories never occur in train."""
    train, rng = generate_corpus(num_train, seed), random.Random(seed + _EVAL_SEED_OFFSET)
    test = _held_out(lambda: _Story(rng).render(), str, train, num_eval)
    return DatasetDict(train=Dataset.from_dict({"text": train}), test=Dataset.from_dict({"text": test}))


# ----------------------------------------------------------------------------- instruction tasks

INSTRUCTION_TASKS = ("add", "sub", "mul", "copy", "reverse", "lookup", "sort")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _task(rng: random.Random, task: str) -> tuple[str, str]:
    """One (question, answer) pair of ``task``; answers are computed, never looked up."""
    if task in ("add", "sub"):
        x, y = rng.randint(0, 99), rng.randint(0, 99)
        x, y = (x, y) if task == "add" else (max(x, y), min(x, y))  # no negative results
        return f"Compute {x} {'+' if task == 'add' else '-'} {y}.", str(x + y if task == "add" else x - y)
    if task == "mul":
        x, y = rng.randint(0, 99), rng.randint(0, 9)
        return f"Compute {x} * {y}.", str(x * y)
    if task in ("copy", "reverse"):
        letters = rng.choices(_LETTERS, k=rng.randint(3, 8))
        return f"{_cap(task)} the letters: {' '.join(letters)}", " ".join(letters if task == "copy" else letters[::-1])
    if task == "lookup":
        values = {k: rng.randint(0, 9) for k in rng.sample(_LETTERS, rng.randint(3, 6))}
        query = rng.choice(list(values))
        return f"Keys: {', '.join(f'{k}={v}' for k, v in values.items())}. What is {query}?", str(values[query])
    numbers = [rng.randint(0, 9) for _ in range(rng.randint(3, 7))]  # "sort"
    return f"Sort the numbers: {' '.join(map(str, numbers))}", " ".join(map(str, sorted(numbers)))


def _example(rng: random.Random, tasks: Sequence[str]) -> dict[str, str]:
    task = rng.choice(tasks)
    question, answer = _task(rng, task)
    # Prompt ending on ":" + completion starting with " ": the tokenized prompt is a prefix of the tokenized
    # prompt+completion, which TRL's completion masking needs.
    return {"prompt": f"{question}\nAnswer:", "completion": f" {answer}", "task": task}


def instruction_examples(num_examples: int, seed: int = 0, tasks: Sequence[str] | None = None) -> list[dict[str, str]]:
    """``num_examples`` dicts with "prompt", "completion" (leading space) and "task", uniform over ``tasks``."""
    tasks = tuple(tasks or INSTRUCTION_TASKS)
    if unknown := set(tasks) - set(INSTRUCTION_TASKS):
        raise ValueError(f"unknown task(s) {sorted(unknown)}; choose from {INSTRUCTION_TASKS}")
    rng = random.Random(seed)
    return [_example(rng, tasks) for _ in range(num_examples)]


def instruction_dataset(num_train: int = 2000, num_eval: int = 200, seed: int = 0,
                        tasks: Sequence[str] | None = None) -> DatasetDict:
    """TRL prompt-completion ``{"train", "test"}`` (plus a "task" column); no test prompt occurs in train."""
    train, rng = instruction_examples(num_train, seed, tasks), random.Random(seed + _EVAL_SEED_OFFSET)
    tasks = tuple(tasks or INSTRUCTION_TASKS)
    test = _held_out(lambda: _example(rng, tasks), lambda e: e["prompt"], train, num_eval)
    return DatasetDict(train=Dataset.from_list(train), test=Dataset.from_list(test))


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference up to surrounding/repeated whitespace."""
    if len(predictions) != len(references) or not references:
        raise ValueError(f"need as many predictions as references (> 0), got {len(predictions)} and {len(references)}")
    return sum(p.split() == r.split() for p, r in zip(predictions, references)) / len(references)


@torch.no_grad()
def generate_completions(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                         max_new_tokens: int = 16, batch_size: int = 32) -> list[str]:
    """Greedy-decode each prompt (left-padded batches) and return the first line of the new text."""
    was_training, side = model.training, tokenizer.padding_side
    config = model.config
    router_logits = getattr(config, "output_router_logits", None)
    if router_logits:
        config.output_router_logits = False  # MoE: no auxiliary loss while decoding (it breaks with a KV cache)
    model.eval()
    tokenizer.padding_side = "left"  # a decoder-only model continues from the last position
    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(list(prompts[i:i + batch_size]), return_tensors="pt", padding=True,
                            return_token_type_ids=False).to(model.device)  # generate() of transformers 4.x refuses them
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            texts = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            out += [t.split("\n", 1)[0].strip() for t in texts]
    finally:
        tokenizer.padding_side = side
        if router_logits:
            config.output_router_logits = router_logits
        model.train(was_training)
    return out


def evaluate_exact_match(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                         examples: Iterable[dict[str, str]], max_new_tokens: int = 16, batch_size: int = 32) -> float:
    """Exact-match accuracy of greedy completions on prompt-completion ``examples`` (a list or Dataset)."""
    examples = list(examples)
    predictions = generate_completions(model, tokenizer, [e["prompt"] for e in examples], max_new_tokens, batch_size)
    return exact_match(predictions, [e["completion"] for e in examples])


# ----------------------------------------------------------------------------- tokenizer


def build_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = 1024,
                    save_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer locally (default texts: built-in corpus + instruction tasks).

    Byte-level BPE, not characters: any text (real data too) encodes without unknowns, and ~1k
    tokens keep a tiny model's embedding small while most corpus words are one token, so sequences
    stay short. Digits are one per token (with their leading space) so arithmetic tokenizes the same
    at every position. ``<|bos|>`` starts every sequence, ``<|eos|>`` ends documents and completions,
    ``<|pad|>`` pads. Saved to ``save_dir`` if given (reload with ``AutoTokenizer.from_pretrained``).
    """
    if texts is None:
        texts = generate_corpus(2000) + [e["prompt"] + e["completion"] for e in instruction_examples(4000)]
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(  # " 68" -> " 6", "8"
        [pre_tokenizers.Split(Regex(r" ?\d"), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False, special_tokens=[PAD, BOS, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                        unk_token=UNK, clean_up_tokenization_spaces=False)
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


# ----------------------------------------------------------------------------- loading

FILE_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _read(spec: str, path: Path, config_name: str | None, **load_kwargs) -> Dataset | DatasetDict:
    """The data as datasets loads it: a saved dataset, a directory of data files, one file, or a hub id."""
    if path.is_dir() and any((path / f).exists() for f in ("dataset_dict.json", "state.json")):
        return datasets.load_from_disk(str(path))
    if path.is_dir():
        return datasets.load_dataset(str(path), **load_kwargs)  # data files; splits named by file names
    if path.is_file():
        if path.suffix.lower() not in FILE_BUILDERS:
            raise ValueError(f"unsupported file type {path.suffix!r} for {path}; use one of {sorted(FILE_BUILDERS)}")
        return datasets.load_dataset(FILE_BUILDERS[path.suffix.lower()], data_files=str(path), split="train", **load_kwargs)
    if spec.startswith((".", "/", "~")) or path.suffix.lower() in FILE_BUILDERS:
        raise FileNotFoundError(f"dataset file or directory not found: {spec}")
    return datasets.load_dataset(spec, config_name, **load_kwargs)


def _load(spec: str, columns: Sequence[str], eval_fraction: float, seed: int, config_name: str | None,
          **load_kwargs) -> DatasetDict:
    """Load a file, directory or Hub dataset; keep ``columns`` (checked) and a train + test split."""
    path = Path(spec).expanduser()
    with _progress_bars(not path.exists() or _bytes(path) >= LARGE_DATA_BYTES):
        raw = _read(spec, path, config_name, **load_kwargs)
    splits = DatasetDict(train=raw) if isinstance(raw, Dataset) else raw
    if "train" not in splits:
        raise ValueError(f"{spec} has no 'train' split (found {list(splits)})")
    test = next((s for s in ("test", "validation", "valid", "eval") if s in splits), None)
    out = DatasetDict(train=splits["train"], **({"test": splits[test]} if test else {}))
    for name, split in out.items():
        if missing := [c for c in columns if c not in split.column_names]:
            raise ValueError(f"{spec} ({name} split) lacks column(s) {missing}; it has {split.column_names}")
    out = out.select_columns(list(columns))
    if test is None:
        if len(out["train"]) < 2:
            raise ValueError(f"{spec} has {len(out['train'])} row(s): too few to hold out an evaluation split")
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"{spec} has no test split and eval_fraction={eval_fraction} is not in (0, 1)")
        out = out["train"].train_test_split(test_size=eval_fraction, seed=seed)
    return out


def load_text_dataset(spec: str = "builtin", *, text_column: str = "text", eval_fraction: float = 0.05,
                      seed: int = 0, num_train: int = 2000, num_eval: int = 200, config_name: str | None = None,
                      **load_kwargs) -> DatasetDict:
    """Load ``{"train", "test"}`` with one "text" column.

    ``spec``: "builtin" (``num_train``/``num_eval`` generated stories); a .txt (a row per line),
    .jsonl/.json, .parquet or .csv file; a directory of such files or one written by ``save_to_disk``;
    or a Hub dataset name (``config_name`` and ``load_kwargs`` go to ``datasets.load_dataset``). A
    "test" (or "validation") split is kept, else ``eval_fraction`` of train is split off with
    ``seed``. ``text_column`` names the column holding the text; it is renamed to "text".
    """
    if spec == "builtin":
        return builtin_text_dataset(num_train, num_eval, seed)
    out = _load(spec, [text_column], eval_fraction, seed, config_name, **load_kwargs)
    return out if text_column == "text" else out.rename_column(text_column, "text")


def load_instruction_dataset(spec: str = "builtin", *, eval_fraction: float = 0.05, seed: int = 0,
                             num_train: int = 2000, num_eval: int = 200, tasks: Sequence[str] | None = None,
                             config_name: str | None = None, **load_kwargs) -> DatasetDict:
    """Load prompt-completion ``{"train", "test"}``: the "builtin" tasks, or any spec of
    :func:`load_text_dataset` whose data has "prompt" and "completion" columns."""
    if spec == "builtin":
        return instruction_dataset(num_train, num_eval, seed, tasks)
    return _load(spec, ["prompt", "completion"], eval_fraction, seed, config_name, **load_kwargs)


def tokenize_for_causal_lm(dataset: Dataset | DatasetDict, tokenizer: PreTrainedTokenizerBase, block_size: int,
                           text_column: str = "text") -> Dataset | DatasetDict:
    """Tokenize, end each text with EOS, concatenate and cut into ``block_size`` blocks ("group texts").

    Rows are full blocks: ``input_ids``, ``attention_mask`` of ones and ``labels`` = ``input_ids``
    (the model shifts them), ready for ``default_data_collator``. Each map batch of 1000 texts drops
    its final partial block. A long text is tokenized piece by piece (cut at whitespace), so memory stays
    bounded by the piece, not the text: a 20 MB single-line file takes well under 1 GB (docs/data.md).
    """
    if isinstance(dataset, DatasetDict):
        return DatasetDict({k: tokenize_for_causal_lm(v, tokenizer, block_size, text_column)
                            for k, v in dataset.items()})
    if block_size < 2 or tokenizer.eos_token_id is None:
        raise ValueError(f"need block_size >= 2 (got {block_size}) and a tokenizer with an eos_token")
    if text_column not in dataset.column_names:
        raise ValueError(f"dataset lacks column {text_column!r}; it has {dataset.column_names}")

    def group(batch: dict[str, list]) -> dict[str, list]:
        ids = list(chain.from_iterable(_token_ids(t, tokenizer) + [tokenizer.eos_token_id]
                                       for t in batch[text_column] if t and t.strip()))
        blocks = [ids[i:i + block_size] for i in range(0, len(ids) - block_size + 1, block_size)]
        return {"input_ids": blocks, "attention_mask": [[1] * block_size] * len(blocks), "labels": blocks}

    with _progress_bars(len(dataset) >= LARGE_DATASET_ROWS):
        out = dataset.map(group, batched=True, batch_size=1000, remove_columns=dataset.column_names)
    if len(out) == 0:
        raise ValueError(f"no full block of {block_size} tokens could be made; use more text or a smaller block_size")
    return out


LARGE_DATASET_ROWS = 100_000  # below these a map or a load takes seconds: no progress bar
LARGE_DATA_BYTES = 100 << 20
TOKENIZE_PIECE_CHARS = 1 << 16


def _token_ids(text: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The text's token ids (special tokens as the tokenizer adds them to one text), tokenized in pieces of about
    ``TOKENIZE_PIECE_CHARS`` cut before a whitespace, so a huge single-line file never holds all its encodings
    (offsets, masks) at once. Only the first piece takes the special tokens."""
    if len(text) <= TOKENIZE_PIECE_CHARS:
        return tokenizer(text)["input_ids"]
    ids: list[int] = []
    for start, end in _pieces(text, TOKENIZE_PIECE_CHARS):
        ids += tokenizer(text[start:end], add_special_tokens=start == 0)["input_ids"]
    return ids


def _pieces(text: str, size: int) -> Iterable[tuple[int, int]]:
    """(start, end) spans of about ``size`` characters; each cut sits before a whitespace character (where the
    pre-tokenizer splits anyway), or at ``size`` when the text has none there."""
    start = 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            cut = max(text.rfind(c, start + 1, end) for c in " \n\t")
            end = cut if cut > start else end
        yield start, end
        start = end


def _bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@contextmanager
def _progress_bars(show: bool):
    """datasets' progress bars only where a map takes long enough to watch."""
    hide = not show and not datasets.are_progress_bars_disabled()
    if hide:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if hide:
            datasets.enable_progress_bars()
