"""Every config file composes, resolves and validates; bad values fail with the key named."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from uapt.config import ConfigError, validate

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ["model", "dataset", "objective", "trainer", "eval", "logger"]


def compose_plain(overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if p.stem != "base")


@pytest.mark.parametrize("override", [f"{g}={name}" for g in GROUPS for name in group_options(g)])
def test_every_config_file_composes_and_validates(override, tmp_path):
    cfg = compose_plain([override, f"runs_dir={tmp_path}"])
    validate(cfg)


def test_objective_variants_have_documented_semantics():
    expect = {
        "mle": (0.0, 0.0),
        "masked_mle": ("pos", 0.0),
        "self_distill": (0.0, "pos"),
        "masked_mle_distill": ("pos", "pos"),
    }
    for name, (rho, lam) in expect.items():
        obj = compose_plain([f"objective={name}"])["objective"]
        assert obj["name"] == name
        assert obj["mask_ratio"] > 0 if rho == "pos" else obj["mask_ratio"] == 0
        assert obj["distill_weight"] > 0 if lam == "pos" else obj["distill_weight"] == 0
    assert compose_plain(["objective=self_distill"])["objective"]["distill_on"] == "all"
    rho1 = compose_plain(["objective=rho1"])["objective"]
    assert (rho1["select"], rho1["scope"]) == ("excess", "batch")


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("objective.mask_ratio=1.0", "objective.mask_ratio"),
        ("objective.mask_ratio=-0.1", "objective.mask_ratio"),
        ("objective.distill_weight=-1", "objective.distill_weight"),
        ("objective.temperature=0", "objective.temperature"),
        ("objective.jsd_beta=1.0", "objective.jsd_beta"),
        ("objective.select=loss", "objective.select"),
        ("objective.scope=global", "objective.scope"),
        ("objective.divergence=kl", "objective.divergence"),
        ("trainer.precision=fp8", "trainer.precision"),
        ("trainer.batch_size=12", "trainer.batch_size"),
        ("model.path=./no/such/model", "model.path"),
        ("+trainer.bogus=1", "trainer.bogus"),
    ],
)
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        validate(compose_plain([override]))
