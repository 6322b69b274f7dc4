"""Recipes: flat YAML mappings of fields, read safely and parsed by ``HfArgumentParser``.

A recipe holds fields of ``ModelArguments``, ``TaskArguments``, ``BADMConfig`` and
``transformers.TrainingArguments`` (TRL's ``SFTConfig`` for the sft tasks); ``--field value`` after
the recipe overrides it. Every value is checked here, before a run writes anything.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

from hf_badm.app import RecipeError

# Settings of a CLI run unless the recipe or command line says otherwise.
CLI_DEFAULTS: dict[str, Any] = {"report_to": "none", "include_num_input_tokens_seen": True, "save_strategy": "no",
                                "logging_steps": 10}
MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of settings; anything larger is not one


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses duplicate keys and aliases of lists or mappings.

    An alias of a collection is how a few hundred bytes of YAML expand to gigabytes ("billion laughs");
    recipes are flat, so only aliases of plain values are kept."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            if isinstance(self.anchors.get(event.anchor), yaml.CollectionNode):
                raise RecipeError(f"line {event.start_mark.line + 1}: alias *{event.anchor} repeats a list or mapping; "
                                  "recipes take aliases of plain values only")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise RecipeError(f"line {key_node.start_mark.line + 1}: duplicate field {key!r}")
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_recipe(path: str | None) -> dict[str, Any]:
    """The recipe file as ``{field: value}``; an empty, oversized, nested-key or malformed file is refused."""
    if path is None:
        return {}
    file = Path(path)
    if file.is_dir():
        raise RecipeError(f"recipe {path} is a directory, not a YAML file")
    if file.exists() and not file.is_file():
        raise RecipeError(f"recipe {path} is not a regular file (a device, pipe or socket)")
    if not file.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    if file.stat().st_size > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path} is larger than {MAX_RECIPE_BYTES >> 20} MiB: not a recipe")
    try:
        recipe = yaml.load(file.read_text(), Loader=_RecipeLoader)  # noqa: S506 (a SafeLoader subclass)
    except RecipeError as err:
        raise RecipeError(f"{path}, {err}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise RecipeError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
    except RecursionError:
        raise RecipeError(f"{path} nests lists or mappings too deeply: a recipe is a flat mapping of field: value") from None
    if recipe is None:
        raise RecipeError(f"{path} is empty: a recipe is lines of `field: value` (see `hf-badm train --help` and "
                          "recipes/)")
    if not isinstance(recipe, dict):
        raise RecipeError(f"{path} must be a mapping of field: value, not a {type(recipe).__name__}")
    if bad := [k for k in recipe if not isinstance(k, str)]:
        raise RecipeError(f"{path}: field names must be text, got {', '.join(repr(k) for k in bad)}")
    return recipe


def recipe_parser(task: str = "pretrain"):
    """Instruction-tuning tasks take TRL's SFTConfig (TrainingArguments plus max_length, packing, ...)."""
    from transformers import HfArgumentParser, TrainingArguments

    from hf_badm.app.arguments import SFT_TASKS, ModelArguments, TaskArguments
    from hf_badm.config import BADMConfig

    if task in SFT_TASKS:
        from trl import SFTConfig as TrainingArguments  # noqa: N814
    parser = HfArgumentParser((ModelArguments, TaskArguments, BADMConfig, TrainingArguments), allow_abbrev=False)
    for action in parser._actions:  # transformers 4.x has a help text with a bare '%', which argparse would expand
        action.help = re.sub(r"%[%(]?", lambda m: m[0] if len(m[0]) == 2 else "%%", action.help or "") or action.help
    parser.prog, parser.usage = "hf-badm train", "hf-badm train RECIPE.yaml [--field value ...]"
    parser.error = _argument_error  # argparse would print its usage and exit; the app raises instead
    return parser


def _argument_error(message: str) -> None:
    raise RecipeError(f"{message} (see `hf-badm train --help`)")


def _tokens(key: str, value: Any) -> list[str]:
    """A YAML value as command-line tokens, so argparse type-checks recipe and overrides alike."""
    if isinstance(value, dict):
        return [f"--{key}", json.dumps(value)]
    if isinstance(value, (list, tuple)):
        return [f"--{key}", *map(str, value)]
    return [f"--{key}", "none" if value is None else str(value)]


def _given(name: str, recipe: dict[str, Any], overrides: list[str]) -> bool:
    return name in recipe or any(t == f"--{name}" or t.startswith(f"--{name}=") for t in overrides)


def _override(name: str, overrides: list[str]) -> str | None:
    value = None
    for i, token in enumerate(overrides):
        if token == f"--{name}" and i + 1 < len(overrides):
            value = overrides[i + 1]
        elif token.startswith(f"--{name}="):
            value = token.split("=", 1)[1]
    return value


def _bare_resume(overrides: list[str]) -> list[str]:
    """``--resume_from_checkpoint`` with no value means the latest checkpoint, as ``true`` does."""
    out = []
    for i, token in enumerate(overrides):
        out.append(token)
        if token == "--resume_from_checkpoint" and (i + 1 == len(overrides) or overrides[i + 1].startswith("--")):
            out.append("true")
    return out


def _refuse_non_finite(tokens: list[str], float_fields: set[str]) -> None:
    """NaN or infinity in a numeric field, named before the dataclasses see it (TrainingArguments fails on an
    infinite save_steps with an OverflowError that names no field)."""
    for i, token in enumerate(tokens):
        if not token.startswith("--"):
            continue
        name, eq, value = token[2:].partition("=")
        value = value if eq else (tokens[i + 1] if i + 1 < len(tokens) else "")
        try:
            number = float(value)
        except ValueError:
            continue
        if name in float_fields and not math.isfinite(number):
            raise RecipeError(f"{name} must be a finite number, got {value}")


def parse(recipe: dict[str, Any], overrides: list[str], source: str = "recipe"):
    """(model, task, badm, training) arguments from a recipe dict plus command-line overrides, all values checked."""
    from hf_badm.app.arguments import OVERWRITE_IN_TRAINING_ARGS
    from hf_badm.app.checks import check_values

    overrides = _bare_resume(overrides)
    task = _override("task", overrides) or str(recipe.get("task", "pretrain"))
    parser = recipe_parser(task)
    known = {a.dest for a in parser._actions}
    unknown = sorted(k for k in recipe if k not in known)
    if unknown:
        raise RecipeError(f"{source}: unknown field(s) {', '.join(unknown)} (see `hf-badm train --help`)")
    for key, value in recipe.items():
        if isinstance(value, (list, tuple)) and next(a.nargs for a in parser._actions if a.dest == key) in (None, "?"):
            raise RecipeError(f"{source}: {key} takes one value, got a list {value!r}")
    merged = {**CLI_DEFAULTS, **recipe}
    merged.setdefault("output_dir", str(Path("outputs") / Path(source).stem))
    if _given("save_steps", recipe, overrides) and not _given("save_strategy", recipe, overrides):
        merged["save_strategy"] = "steps"  # as in HF scripts: asking for a save interval means saving
    tokens = [t for k, v in merged.items() for t in _tokens(k, v)]
    _refuse_non_finite(tokens + overrides, {a.dest for a in parser._actions if a.type is float})
    try:
        *parsed, rest = parser.parse_args_into_dataclasses(args=tokens + overrides, return_remaining_strings=True)
    except ValueError as err:  # a dataclass's own validation (BADMConfig, TrainingArguments)
        raise RecipeError(str(err).strip().splitlines()[0]) from None
    if rest:
        raise RecipeError(f"unknown argument(s) {' '.join(rest)} (see `hf-badm train --help`)")
    if OVERWRITE_IN_TRAINING_ARGS:
        parsed[1].overwrite_output_dir = parsed[3].overwrite_output_dir
    check_values(*parsed)
    return parsed
