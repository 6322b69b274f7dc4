"""`hf-badm compare`'s learning-rate rule (hf_badm.app.learning_rates) does what its --help says, and nothing given is
silently dropped; the peers are a registry that the CLI's checks and runs read."""

from __future__ import annotations

import pytest

from hf_badm.app import RecipeError
from hf_badm.app.cli import compare, _compare_parser
from hf_badm.app.learning_rates import COMPARE_LEARNING_RATES, compare_learning_rate

NEWTON_SCHULZ = {"preconditioner": "newton_schulz", "learning_rate": 0.03}
PLAIN = {"learning_rate": 1.5}


@pytest.mark.parametrize("optimizer, recipe, given, lr", [
    ("badm", PLAIN, {}, None),  # the recipe's: it is plain BADM's
    ("badm", NEWTON_SCHULZ, {}, COMPARE_LEARNING_RATES["badm"]),  # newton_schulz's 0.03 is not plain BADM's scale
    ("badm", {**PLAIN, "optimizer": "adamw_torch"}, {}, COMPARE_LEARNING_RATES["badm"]),
    ("badm", NEWTON_SCHULZ, {"badm": 2.0}, 2.0),
    ("adamw_torch", PLAIN, {}, COMPARE_LEARNING_RATES["adamw_torch"]),
    ("adamw_torch", PLAIN, {"adamw_torch": 1e-3}, 1e-3),
    ("badm-newton_schulz", PLAIN, {}, COMPARE_LEARNING_RATES["badm-newton_schulz"]),
    ("rmsprop", PLAIN, {}, None),  # no default: the recipe's
])
def test_each_optimizers_rate_and_where_it_came_from(optimizer, recipe, given, lr):
    got, source = compare_learning_rate(optimizer, recipe, given)
    assert got == lr and source


def test_the_help_says_the_rule():
    text = _compare_parser("hf-badm compare").format_help()
    assert "no preconditioner" in text and "plain BADM's" in text and "--learning_rate is refused" in " ".join(text.split())


@pytest.mark.parametrize("flag", [["--learning_rate", "1.0"], ["--learning_rate=1.0"]])
def test_a_shared_learning_rate_is_refused_before_any_run(tmp_path, flag):
    with pytest.raises(RecipeError, match="--learning_rates"):
        compare(["--optimizers", "badm,adamw", "--output_dir", str(tmp_path / "out"), *flag], prog="hf-badm demo",
                recipe=dict(PLAIN))
    assert not (tmp_path / "out").exists()


def test_the_peers_are_one_registry():
    from hf_badm.app.checks import _check_optimizer
    from hf_badm.peers import PEERS, MuonWithQHAdam

    for name in PEERS:
        _check_optimizer(name)
    assert PEERS["muon_qhadam"].optimizer_cls is MuonWithQHAdam and PEERS["muon_qhadam"].options == {"qhadam_nu": "nu"}
    with pytest.raises(RecipeError, match="muon_qhadam"):
        _check_optimizer("muon_typo")
