"""uapt-eval: a suite on a saved model or run folder, standalone, and its results as a table."""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from uapt.evaluation.run import as_number, result_rows, run_suite
from uapt.paths import CONF_DIR
from uapt.schema import ConfigError

if TYPE_CHECKING:
    from uapt.sections.model import ModelConfig

log = logging.getLogger("uapt.evaluation")


def _fmt(x: Any) -> str:
    return "" if as_number(x) is None else f"{float(x):.4f}"


def rich_table(results: Mapping[str, Any], title: str | None = None):
    """Every metric with its stderr (and base and delta when the results carry them)."""
    from rich.table import Table

    suite = ((results.get("eval_meta") or {}).get("suite") or {}).get("name", "")
    rows = result_rows(results)
    extra = any(r[4] is not None or r[5] is not None for r in rows)
    table = Table(title=title or f"eval: {suite}")
    for col in ("task", "metric", "value", "± stderr", *(("base", "delta") if extra else ())):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for task, metric, value, stderr, base, delta in rows:
        table.add_row(
            task, metric, _fmt(value), _fmt(stderr), *((_fmt(base), _fmt(delta)) if extra else ())
        )
    return table


CLI_KEYS = ("checkpoint", "output")
USAGE = """uapt-eval: a suite on a saved model or run folder, standalone, and its results as a table.

Usage:
  uapt-eval model=<name> eval=<suite> [checkpoint=<folder>] [output=<file.json>] [key=value ...]
  uapt-eval model=smollm2_135m eval=embedded                     # the base model, standalone
  uapt-eval model=smollm2_135m eval=paper checkpoint=runs/<run>  # a run's newest checkpoint

checkpoint: a run folder (its model/, else its newest verified checkpoint) or a model folder;
output: where the results are written as JSON. Every other key is uapt-train's (conf/): model.*,
eval.* (conf/eval/base.yaml documents each). See docs/evaluation.md.
"""


def _pop_cli_keys(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """uapt-eval's own keys (not in train.yaml) out of the Hydra overrides."""
    own, rest = {}, []
    for arg in argv:
        key, sep, value = arg.lstrip("+").partition("=")
        if sep and key in CLI_KEYS:
            own[key] = value
        else:
            rest.append(arg)
    return own, rest


def latest_checkpoint(folder: Path) -> Path:
    """A run folder resolves to its final model/ when it saved one, else (like its checkpoints/)
    to the newest step-<N>/ whose files match their manifest; any other folder is taken as is."""
    from uapt import checkpoint as ckpt

    if (folder / "run.json").is_file() and (folder / "model").is_dir():
        return folder / "model"
    for candidate in (folder / "checkpoints", folder):
        if any(candidate.glob("step-*")):
            found = ckpt.latest(candidate)
            if found is None:
                raise FileNotFoundError(
                    f"checkpoint={folder}: no step-* folder in {candidate} matches its manifest"
                )
            return found
    return folder


def load_for_eval(
    model_cfg: ModelConfig | Mapping[str, Any],
    cache_dir: str | Path,
    device: Any,
    checkpoint: str | Path | None = None,
) -> tuple[Any, Any]:
    """(model, tokenizer) from the model config, or from a checkpoint folder of that model:
    a saved Hugging Face model (config.json), a PEFT adapter (adapter_config.json) or bare
    weights (model.safetensors) for the architecture `model_cfg` describes."""
    from uapt.models import load_model, load_tokenizer
    from uapt.sections.model import ModelConfig

    model_cfg = ModelConfig.parse(model_cfg)
    if checkpoint is None:
        tokenizer = load_tokenizer(model_cfg, cache_dir)
        return load_model(model_cfg, tokenizer, cache_dir, device), tokenizer
    if not Path(checkpoint).expanduser().is_dir():
        raise FileNotFoundError(f"checkpoint={checkpoint}: no such folder")
    folder = latest_checkpoint(Path(checkpoint).expanduser())
    has_tokenizer = (folder / "tokenizer_config.json").exists()
    tokenizer_from = str(folder) if has_tokenizer else model_cfg.tokenizer
    if (folder / "config.json").exists():
        cfg = dataclasses.replace(model_cfg, path=str(folder), tokenizer=tokenizer_from)
        tokenizer = load_tokenizer(cfg, cache_dir)
        return load_model(cfg, tokenizer, cache_dir, device), tokenizer
    tok_cfg = dataclasses.replace(model_cfg, tokenizer=tokenizer_from)
    tokenizer = load_tokenizer(tok_cfg, cache_dir)
    model = load_model(model_cfg, tokenizer, cache_dir, device)
    if (folder / "adapter_config.json").exists():
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(folder)).to(device), tokenizer
    weights_file = folder / "model.safetensors"
    if not weights_file.exists():
        raise FileNotFoundError(
            f"checkpoint={checkpoint}: {folder} has no config.json, "
            "adapter_config.json or model.safetensors"
        )
    from safetensors.torch import load_file

    # uapt checkpoints hold the trainable tensors only (all weights, or the LoRA adapters)
    weights = load_file(str(weights_file), device=str(device))
    unknown = sorted(set(weights) - set(model.state_dict()))
    if unknown:
        raise ValueError(
            f"checkpoint={checkpoint}: {len(unknown)} tensors the model {model_cfg.name!r} "
            f"does not have, e.g. {unknown[0]}: it belongs to another model"
        )
    model.load_state_dict(weights, strict=False)
    return model, tokenizer


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def evaluate_cli(
    cfg: Mapping[str, Any], checkpoint: str | None = None, output: str | None = None
) -> int:
    """uapt-eval's body on a resolved config; returns the exit status."""
    from rich.console import Console

    from uapt.sections.run import RunConfig  # the edge: every section checked before any loading

    try:
        run = RunConfig.parse(cfg)
    except ConfigError as e:
        log.error("bad configuration: %s", e)
        return 2
    if not run.eval.task_specs:
        log.error(
            "eval=%s has no tasks: choose a suite, e.g. eval=embedded or eval=paper", run.eval.name
        )
        return 2
    device = _device(run.trainer.device)
    try:
        model, tokenizer = load_for_eval(run.model, run.cache_dir, device, checkpoint)
    except (FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 2
    out_file = Path(output).expanduser() if output else None
    if out_file is not None and out_file.suffix != ".json":
        out_file = out_file / "eval.json"
    results = run_suite(
        model,
        tokenizer,
        run.plain["eval"],  # as written: what the results record
        device=device,
        out_dir=out_file.parent if out_file else None,
        seed=run.seed,
    )
    at = f" @ {checkpoint}" if checkpoint else ""
    title = f"{run.model.name}{at} on eval={run.eval.name}"
    Console().print(rich_table(results, title))
    if out_file is not None:
        from uapt import files

        files.write_json(
            out_file, {"model": run.plain["model"], "checkpoint": checkpoint, **results}
        )
        log.info("wrote %s", out_file)
    return 0


def main() -> None:
    """uapt-eval model=<name> eval=<suite> [checkpoint=<folder>] [output=<file.json>] [key=value ...]"""
    import hydra
    from omegaconf import DictConfig, OmegaConf

    from uapt.config import refuse_renamed_keys
    from uapt.console import setup_logging

    if {"-h", "--help"} & set(sys.argv[1:]):  # uapt-eval's own usage, not uapt-train's
        print(USAGE, end="")
        raise SystemExit(0)
    own, rest = _pop_cli_keys(sys.argv[1:])
    try:
        refuse_renamed_keys(rest)  # before Hydra, which would not name the new key
    except ConfigError as e:
        setup_logging()
        log.error("bad configuration: %s", e)
        raise SystemExit(2) from None
    sys.argv[1:] = rest

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
    def app(cfg: DictConfig) -> None:
        setup_logging()  # uapt's lines; lm-eval's own only when they are errors
        from uapt.errors import UserError, show_traceback

        try:
            status = evaluate_cli(OmegaConf.to_container(cfg, resolve=True), **own)
        except UserError as e:  # named in one line (HYDRA_FULL_ERROR=1: the traceback too)
            if show_traceback():
                raise
            log.error("%s", e)
            raise SystemExit(2) from None
        if status:
            raise SystemExit(status)

    app()


if __name__ == "__main__":
    main()
