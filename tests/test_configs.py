"""Every config file composes, resolves and validates; bad values fail with the key named."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from uapt.config import ConfigError, validate

CONF = Path(__file__).resolve().parents[1] / "conf"
SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"
GROUPS = ["model", "dataset", "objective", "trainer", "eval", "logger", "variant"]
FOLDERS = {"sweep": SWEEPS, "variant": SWEEPS / "variants", "tuned": SWEEPS / "tuned"}


def compose_plain(overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def group_options(group: str) -> list[str]:
    folder = FOLDERS.get(group, CONF / group)
    return sorted(p.stem for p in folder.glob("*.yaml") if p.stem != "base")


@pytest.mark.parametrize("override", [f"{g}={name}" for g in GROUPS for name in group_options(g)])
def test_every_config_file_composes_and_validates(override, tmp_path):
    cfg = compose_plain([override, f"runs_dir={tmp_path}"])
    validate(cfg)


def sweep_points(sweep: str) -> list[list[str]]:
    """Each value of each swept parameter once (the others at their first value)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"sweep={sweep}"], return_hydra_config=True)
    if cfg.hydra.sweeper.get("grid"):  # a tuning sweep: its grid, the searched keys at defaults
        params = {k: list(v) for k, v in cfg.hydra.sweeper.grid.items()}
    else:
        params = {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}
    first = {k: values[0] for k, values in params.items()}
    points = [{**first, key: value} for key, values in params.items() for value in values]
    return [[f"{k}={v}" for k, v in point.items()] for point in points]


@pytest.mark.slow  # measured over 2 s (make test-fast stays under 90 s)
@pytest.mark.parametrize("sweep", group_options("sweep"))
def test_every_sweep_point_composes_and_validates(sweep, tmp_path):
    for point in sweep_points(sweep):
        validate(compose_plain([f"sweep={sweep}", *point, f"runs_dir={tmp_path}"]))


def test_variants_set_the_knobs_they_are_named_after():
    from uapt.records import objective_variant

    expect = {  # file -> (objective, rho, lambda, the summary's variant label)
        "mle": ("mle", 0.0, 0.0, "mle"),
        "masked_mle_r05": ("masked_mle", 0.5, 0.0, "masked_mle-r0.5"),
        "masked_mle_r08": ("masked_mle", 0.8, 0.0, "masked_mle-r0.8"),
        "self_distill_l1": ("self_distill", 0.0, 1.0, "self_distill-l1"),
        "masked_mle_distill_r05_l1": ("masked_mle_distill", 0.5, 1.0, "masked_mle_distill-r0.5-l1"),
        "masked_mle_distill_r05_l03": (
            "masked_mle_distill", 0.5, 0.3, "masked_mle_distill-r0.5-l0.3"
        ),
    }  # fmt: skip
    assert set(group_options("variant")) == set(expect)
    for name, (objective, rho, lam, label) in expect.items():
        obj = compose_plain([f"variant={name}"])["objective"]
        assert (obj["name"], obj["mask_ratio"], obj["distill_weight"]) == (objective, rho, lam)
        assert objective_variant(obj) == label
        assert label.replace(".", "").replace("-", "_") == name  # the naming rule, docs/tables.md


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


@pytest.mark.parametrize("group", ["sweep", "variant", "tuned"])
def test_a_mistyped_option_of_the_sweeps_groups_is_an_error(group):
    """sweeps/ serves these groups; a typo names the group and lists the options, never falls
    back silently to a single default run."""
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match=rf"Could not find '{group}/no_such_option'"):
        compose_plain([f"{group}=no_such_option"])


@pytest.mark.parametrize("tuned", group_options("tuned"))
def test_every_tuned_point_composes_at_its_tuned_values(tuned, tmp_path):
    """A shipped tuning result (sweeps/tuned/) gives each point of its grid the value its study
    chose, resolved through the point's config-group choice as `uapt-train` resolves it."""
    from hydra.core.hydra_config import HydraConfig

    doc = OmegaConf.to_container(OmegaConf.load(FOLDERS["tuned"] / f"{tuned}.yaml"))
    (group,) = doc["tuned"]["grid"]  # the shipped studies search one group (variant)
    lrs = doc["tuned"]["values"]["trainer"]["lr"]
    assert set(lrs) == set(doc["tuned"]["best"]) and set(lrs) <= set(group_options(group))
    for point, lr in lrs.items():
        overrides = [f"tuned={tuned}", f"{group}={point}", f"runs_dir={tmp_path}"]
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # what @hydra.main does before resolving
        try:
            with open_dict(cfg):
                del cfg["hydra"]  # the run's config, as the job sees it
            plain = OmegaConf.to_container(cfg, resolve=True)
        finally:
            HydraConfig.instance().cfg = None  # leave no Hydra state to the next test
        assert plain["trainer"]["lr"] == lr == doc["tuned"]["best"][point]["trainer.lr"]
        validate(plain)


def test_a_renamed_key_is_refused_naming_the_new_one(monkeypatch, caplog):
    """trainer.eval_every is trainer.val_every now: in a config file (or a `+` override) the
    section refuses it; as a plain override Hydra would only call it unknown, so uapt-train and
    uapt-eval refuse it before Hydra composes, with exit status 2."""
    from uapt import train
    from uapt.config import refuse_renamed_keys
    from uapt.evaluation import cli

    message = r"trainer\.eval_every was renamed: use trainer\.val_every"
    with pytest.raises(ConfigError, match=message):
        validate(compose_plain(["+trainer.eval_every=4"]))
    for override in ("trainer.eval_every=4", "++trainer.eval_every=1,2", "~trainer.eval_every"):
        with pytest.raises(ConfigError, match=message):
            refuse_renamed_keys(["model=tiny", override])
    refuse_renamed_keys(["trainer.val_every=4", "-m", "--cfg", "job"])  # the new name passes
    monkeypatch.setattr(train, "setup_logging", lambda: None)  # no terminal handler left behind
    monkeypatch.setattr("uapt.console.setup_logging", lambda: None)
    for main in (train.main, cli.main):
        monkeypatch.setattr("sys.argv", ["uapt", "model=tiny", "trainer.eval_every=4"])
        with pytest.raises(SystemExit) as stop:
            main()
        assert stop.value.code == 2
    assert "use trainer.val_every" in caplog.text
