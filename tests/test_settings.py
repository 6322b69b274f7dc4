"""Each BADM setting is described once (hf_badm.optim.settings, the solves' own settings, hf_badm.config): BADMConfig,
``BADM(...)``, the recipe loader and the CLI take its default, its check and its help from that one description."""

from __future__ import annotations

import dataclasses
import inspect
import typing

import pytest
import torch

from hf_badm import BADM, BADMConfig
from hf_badm.app import RecipeError
from hf_badm.app.recipe import parse, recipe_parser
from hf_badm.config import CONFIG_SETTINGS
from hf_badm.optim.local_solve import LOCAL_SOLVES
from hf_badm.optim.settings import OPTIMIZER_SETTINGS, Setting, solve_settings
from hf_badm.optim.validation import penalty

BADM_KEYWORDS = inspect.signature(BADM.__init__).parameters
PARSER = {action.dest: action for action in recipe_parser()._actions}


def bad_value(setting: Setting) -> object:
    """A value the setting's check refuses: an unknown name, or a negative number (every numeric BADM setting is a
    positive number, a count or a rate in [0, 1))."""
    return "no_such_name" if setting.type is str else setting.type(-1)


def bad_values(setting: Setting) -> list[object]:
    """:func:`bad_value`, and for a penalty (sigma, rho) the positive values outside its range too."""
    return [bad_value(setting), *((1e13, 1e-13) if setting.validate is penalty else ())]


def params() -> list[torch.Tensor]:
    return [torch.nn.Parameter(torch.zeros(3, 2))]


@pytest.mark.parametrize("name", list(CONFIG_SETTINGS))
def test_badmconfig_fields_and_the_cli_options_are_the_descriptions(name):
    setting = CONFIG_SETTINGS[name]
    field = {f.name: f for f in dataclasses.fields(BADMConfig)}[name]
    assert field.default == setting.default and field.metadata["help"] == setting.help
    hint = typing.get_type_hints(BADMConfig)[name]
    assert hint == (typing.Optional[setting.type] if setting.default is None else setting.type)
    assert list(CONFIG_SETTINGS) == [f.name for f in dataclasses.fields(BADMConfig)]  # every field has one
    action = PARSER[name]  # the recipe loader's and `hf-badm train --help`'s option
    assert action.default == setting.default and action.help == setting.help
    assert action.choices == (list(setting.choices()) if setting.choices else None)


@pytest.mark.parametrize("name", list(OPTIMIZER_SETTINGS))
def test_badm_and_badmconfig_share_the_optimizer_settings(name):
    setting = OPTIMIZER_SETTINGS[name]
    assert CONFIG_SETTINGS[name] is setting
    assert BADM_KEYWORDS[name].default == setting.default
    for bad in bad_values(setting):
        with pytest.raises(ValueError, match=name) as from_badm:
            BADM(params(), **{name: bad})
        with pytest.raises(ValueError, match=name) as from_config:
            BADMConfig(**{name: bad})
        assert str(from_config.value) == f"BADMConfig.{from_badm.value}"
        with pytest.raises(RecipeError, match=name):
            parse({name: bad}, [])


@pytest.mark.parametrize("name", ["elementwise_sigma", "elementwise_rho"])
def test_the_elementwise_penalties_have_the_penalties_check(name):
    """newton_schulz's elementwise sigma and rho are penalties too: the recipe refuses what BADM would."""
    assert CONFIG_SETTINGS[name].validate is penalty
    for bad in bad_values(CONFIG_SETTINGS[name]):
        with pytest.raises(RecipeError, match=name):
            parse({name: bad, "preconditioner": "newton_schulz"}, [])


@pytest.mark.parametrize("name", list(solve_settings()))
def test_every_solve_setting_is_a_badm_keyword_with_its_default_and_check(name):
    setting = solve_settings()[name]
    assert BADM_KEYWORDS[name].kind is inspect.Parameter.KEYWORD_ONLY
    assert BADM_KEYWORDS[name].default == setting.default == BADM(params()).defaults[name]
    bad = bad_value(setting)
    with pytest.raises(ValueError, match=name) as from_badm:
        BADM(params(), **{name: bad})
    with pytest.raises(ValueError, match=name) as from_config:
        BADMConfig(solve_settings=f"{name}={bad}")
    assert str(from_config.value) == f"BADMConfig.solve_settings: {from_badm.value}"
    with pytest.raises(RecipeError, match=name):
        parse({"solve_settings": f"{name}={bad}"}, [])
    # a good value reaches the optimizer through BADMConfig
    config = BADMConfig(solve_settings=f"{name}={setting.default}")
    assert BADM(params(), **config.optimizer_kwargs(1.0)).defaults[name] == setting.default


def test_badm_lists_its_keywords():
    """As torch's optimizers do: no ``**kwargs``; the settings of a solve registered later go in ``solve_settings``."""
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in BADM_KEYWORDS.values())
    with pytest.raises(TypeError, match="beta3"):
        BADM(params(), beta3=0.9)
    with pytest.raises(TypeError, match="are BADM keywords"):
        BADM(params(), solve_settings={"beta2": 0.9})


@pytest.mark.parametrize("preconditioner", ["none", "normalized", "second_moment", "adam", "newton_schulz", "nsisa"])
def test_rho_defaults_in_one_place_for_every_wiring(preconditioner):
    """BADM, BADMConfig's keywords and a group of another solve (as newton_schulz's elementwise tensors) default rho
    alike: the solve's measured rho/sigma times sigma."""
    ratio = LOCAL_SOLVES[preconditioner].rho_over_sigma
    assert BADM(params(), sigma=2.0, preconditioner=preconditioner).defaults["rho"] == 2.0 * ratio
    kwargs = BADMConfig(preconditioner=preconditioner, sigma=2.0).optimizer_kwargs(1.0)
    assert BADM(params(), **kwargs).defaults["rho"] == 2.0 * ratio
    group = {"params": params(), "preconditioner": preconditioner, "sigma": 4.0}
    assert BADM([group], sigma=1.0, preconditioner="newton_schulz").param_groups[0]["rho"] == 4.0 * ratio
