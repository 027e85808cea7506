"""Scenario 6: typos on the command line, and what the user is told.

README: `uapt-train` "validates it (a bad value stops the run before any model is loaded, naming the
key and what is allowed)". Nothing is left behind: no run folder for a run that never started.
"""

from __future__ import annotations

import pytest
from uatlib import sh


@pytest.fixture()
def home(tmp_path):
    return tmp_path


def _nothing_written(home) -> None:
    assert sorted(p.name for p in home.iterdir()) == []  # no runs/, no outputs/, no wandb/


def test_out_of_range_value_names_key_and_range(home, bin_dir, env):
    # The default model (SmolLM2) is never loaded: the check comes first, so this takes seconds.
    seen = sh([bin_dir / "uapt-train", "objective.mask_ratio=1.5"], home, env, timeout=120)
    assert seen.rc == 2, seen
    assert (
        "bad configuration: objective.mask_ratio=1.5 is not a finite number in [0, 1)" in seen.text
    )
    assert "Traceback" not in seen.text
    _nothing_written(home)


def test_unknown_key_is_hydras_error_naming_it(home, bin_dir, env):
    seen = sh([bin_dir / "uapt-train", "objective.foo=1"], home, env, timeout=120)
    assert seen.rc == 1, seen
    assert "Could not override 'objective.foo'" in seen.text, seen
    assert "Key 'foo' is not in struct" in seen.text, seen
    assert "Traceback" not in seen.text
    _nothing_written(home)


def test_unknown_option_of_a_group_lists_the_options(home, bin_dir, env):
    seen = sh([bin_dir / "uapt-train", "objective=masked_mle_distil"], home, env, timeout=120)
    assert seen.rc == 1, seen
    assert "Could not find 'objective/masked_mle_distil'" in seen.text, seen
    for option in ("masked_mle", "masked_mle_distill", "mle", "rho1", "self_distill"):
        assert option in seen.text, option
    _nothing_written(home)
