"""Running a suite: lm-eval on the in-memory model (`run_suite`), its results flattened to
{task: {metric: value}}, per-sample outcomes kept, and the base model's scores cached per (model,
suite)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from uapt import console
from uapt.evaluation import outcomes
from uapt.evaluation.suite import parse_suite
from uapt.evaluation.tasks import lm_eval_version, task_request
from uapt.schema import non_semantic
from uapt.sections.eval import SuiteConfig
from uapt.sections.model import ModelConfig

log = logging.getLogger("uapt.evaluation")


def evaluate_lm(
    lm: Any,
    suite_cfg: Mapping[str, Any],
    *,
    out_dir: Path | None = None,
    seed: int = 0,
    device: str | None = None,
) -> dict[str, Any]:
    """Run every task of the suite on an lm-eval LM; {} for the `none` suite or no tasks.

    This is the whole scoring path: run_suite wraps the model in an HFLM (generate.UaptLM) and
    calls this.
    Seeds: lm-eval's defaults (0, 1234, 1234, 1234) shifted by `seed`.
    """
    suite = parse_suite(suite_cfg)
    if not suite.task_specs:
        return {}
    from lm_eval.evaluator import simple_evaluate

    from uapt.ifeval import prepare_ifeval

    prepare_ifeval()  # lm-eval's IFEval code downloads punkt_tab at import unless NLTK finds it
    include = suite.include_path
    include = [include] if isinstance(include, str) else list(include or [])
    scores: dict[str, dict[str, float | None]] = {}
    meta: dict[str, Any] = {"n_samples": {}, "task_versions": {}, "seconds": {}}
    kept: list[dict[str, Any]] = []
    dropped: list[str] = []
    quiet = console.library_bars_hidden if console.quiet_wanted() else contextlib.nullcontext
    for spec in suite.task_specs:
        started = time.perf_counter()
        if spec.is_nll:  # uapt's own forward-only task: no lm-eval request
            from uapt.evaluation import nll  # torch: only where a model is evaluated

            result = nll.evaluate(spec, lm.model, lm.tokenizer, lm.device, suite.system_instruction)
            scores[spec.name] = result["scores"]
            meta["n_samples"][spec.name] = result["n_samples"]
            meta["task_versions"][spec.name] = nll.VERSION
            kept += result["outcomes"]
            _log_task(meta, spec.name, result["n_samples"]["effective"], started)
            continue
        request, manager, is_cfg = task_request(spec, include)
        with quiet():
            raw = simple_evaluate(
                model=lm,
                tasks=[request],
                task_manager=manager,
                limit=spec.limit,
                num_fewshot=None if is_cfg else spec.num_fewshot,
                gen_kwargs={"max_gen_toks": spec.max_gen_toks} if spec.max_gen_toks else None,
                apply_chat_template=spec.apply_chat_template,
                fewshot_as_multiturn=spec.fewshot_as_multiturn,
                system_instruction=suite.system_instruction,
                bootstrap_iters=suite.bootstrap_iters,
                log_samples=True,  # per-sample outcomes are always kept (uapt.evaluation.outcomes)
                device=device,
                random_seed=seed,
                numpy_random_seed=1234 + seed,
                torch_random_seed=1234 + seed,
                fewshot_random_seed=1234 + seed,
            )
        if raw is None:  # not rank 0 (lm-eval returns results on rank 0 only)
            continue
        keep = None if suite.subtasks else {spec.name}
        # a tag (e.g. ai2_arc) has no aggregate of its own: then every task it expanded to
        scores.update(flatten_results(raw, keep) or flatten_results(raw))
        meta["n_samples"].update(raw.get("n-samples", {}))
        meta["task_versions"].update(
            {k: v for k, v in raw.get("versions", {}).items() if v is not None}
        )
        _log_task(
            meta,
            spec.name,
            (raw.get("n-samples") or {}).get(spec.name, {}).get("effective", "?"),
            started,
        )
        lines, skipped = outcomes.from_samples(raw.get("samples") or {}, scores)
        kept, dropped = kept + lines, dropped + skipped
        if out_dir is not None and suite.log_samples:
            write_samples(Path(out_dir) / "eval_samples", raw.get("samples") or {})
    if out_dir is not None:
        outcomes.write(Path(out_dir), kept)
    meta["outcomes"] = {"file": outcomes.FILE, "lines": len(kept), "not_per_sample": dropped}
    meta_out = {
        "suite": _plain(suite_cfg),
        "lm_eval_version": lm_eval_version(),
        "seed": seed,
        **meta,
    }
    return {"eval": scores, "eval_meta": json.loads(json.dumps(meta_out, default=str))}


def _log_task(meta: dict[str, Any], name: str, samples: Any, started: float) -> None:
    meta["seconds"][name] = round(time.perf_counter() - started, 2)
    log.info("eval %s: %s samples in %.0f s", name, samples, meta["seconds"][name])


def run_suite(
    model: Any,
    tokenizer: Any,
    suite_cfg: Mapping[str, Any],
    *,
    device: Any,
    out_dir: Path | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Evaluate an in-memory model (on `device` already) with a suite: {"eval", "eval_meta"} or {}.

    The model goes to eval mode for the duration and back to its previous mode afterwards.
    Generation tasks decode with uapt's greedy loop unless `eval.generate=hf` (generate.py).
    Per-sample outputs go to <out_dir>/eval_samples/<task>.jsonl when `eval.log_samples` is true.
    """
    suite = parse_suite(suite_cfg)
    if not suite.task_specs:
        return {}
    from uapt.evaluation.generate import UaptLM

    was_training = model.training
    try:
        # simple_evaluate ignores its batch_size for a model object: the HFLM carries it.
        lm = UaptLM(
            pretrained=model,
            tokenizer=tokenizer,
            generator=suite.generate,
            batch_size=suite.batch_size,
            max_batch_size=suite.max_batch_size,
            max_length=suite.max_length,
        )
        result = evaluate_lm(lm, suite_cfg, out_dir=out_dir, seed=seed, device=str(device))
        if result:  # which decoding produced the outputs (lm-eval's where the loop would differ)
            result["eval_meta"]["generation"] = {
                "generate": suite.generate,
                "fell_back": dict(lm.fallbacks),
            }
        return result
    finally:
        model.train(was_training)


def flatten_results(
    raw: Mapping[str, Any], keep: set[str] | None = None
) -> dict[str, dict[str, float | None]]:
    """lm-eval's results -> {task: {metric: value, metric + "_stderr": value}}.

    Keys are lm-eval's "metric,filter" with ",none" dropped: "acc", "exact_match,strict-match",
    "exact_match,strict-match_stderr". Stderrs lm-eval could not compute ("N/A") become None.
    """
    out: dict[str, dict[str, float | None]] = {}
    for section in ("groups", "results"):  # a group's aggregate appears in both; results win
        for task, metrics in (raw.get(section) or {}).items():
            if keep is not None and task not in keep:
                continue
            row = out.setdefault(task, {})
            for key, value in metrics.items():
                if "," not in key:  # "alias", "sample_len", ...
                    continue
                metric, filt = key.split(",", 1)
                stderr = metric.endswith("_stderr")
                metric = metric.removesuffix("_stderr")
                name = (metric if filt == "none" else f"{metric},{filt}") + (
                    "_stderr" if stderr else ""
                )
                row[name] = as_number(value)
    return out


def as_number(value: Any) -> float | None:
    """A score as a finite float, None when it is none (a string, NaN, a missing value)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _plain(node: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(node, DictConfig | ListConfig):
            return OmegaConf.to_container(node, resolve=True)
    except ImportError:
        pass
    return json.loads(json.dumps(node, default=str))


def write_samples(folder: Path, samples: Mapping[str, list[dict[str, Any]]]) -> None:
    from lm_eval.utils import handle_non_serializable

    from uapt import files

    for task, rows in samples.items():
        lines = (
            json.dumps(row, default=handle_non_serializable, ensure_ascii=False) + "\n"
            for row in rows
        )
        files.write_text(folder / f"{task}.jsonl", "".join(lines))


def score_delta(
    scores: Mapping[str, Mapping[str, Any]], base: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, float]]:
    """scores - base for every (task, metric) both have (stderrs excluded)."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in scores.items():
        for metric, value in metrics.items():
            ref = (base.get(task) or {}).get(metric)
            if metric.endswith("_stderr") or as_number(value) is None or as_number(ref) is None:
                continue
            out.setdefault(task, {})[metric] = float(value) - float(ref)
    return out


def suite_hash(suite_cfg: Mapping[str, Any]) -> str:
    """Identity of what a suite computes (its semantic keys: not batch size or sample logging),
    with lm-eval's version."""
    node = {k: v for k, v in _plain(suite_cfg).items() if k not in non_semantic(SuiteConfig)}
    blob = json.dumps({"suite": node, "lm_eval": lm_eval_version()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def base_scores_path(
    model_cfg: ModelConfig | Mapping[str, Any],
    suite_cfg: Mapping[str, Any],
    cache_dir: str | Path,
    *,
    init_seed: int | None = None,
    inputs: Mapping[str, str] | None = None,
) -> Path:
    """Where the initial model's scores on a suite are cached (see base_scores)."""
    from uapt.models import model_fingerprint

    model = ModelConfig.parse(model_cfg)
    key = f"{model_fingerprint(model)}-{suite_hash(suite_cfg)}"
    if not model.path and init_seed is not None:
        key += f"-s{init_seed}"
    local = {k: v for k, v in (inputs or {}).items() if k.startswith(("model.", "eval."))}
    if local:
        key += "-" + hashlib.sha256(json.dumps(local, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir).expanduser() / "base_scores" / f"{key}.json"


def base_scores(
    model_cfg: ModelConfig | Mapping[str, Any],
    suite_cfg: Mapping[str, Any],
    cache_dir: str | Path,
    evaluate_fn: Callable[[], dict[str, Any]],
    *,
    init_seed: int | None = None,
    inputs: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The initial model's run_suite result, computed once per (model, suite) and cached as JSON.

    `evaluate_fn()` runs the suite on the initial model; it is called only on a cache miss. Its
    result may carry the per-sample outcome lines as "outcomes" (cached with the scores, so that
    every run can pair its samples with the base model's); an entry cached before outcomes were
    kept is evaluated again once.
    A random-init model (no `model.path`) depends on its init seed: pass it as `init_seed`.
    `inputs`: the run's content fingerprints (uapt.inputs); those of the model and the suite's
    data files enter the key, so an edited local model or eval file is scored again.
    """
    if not parse_suite(suite_cfg).task_specs:
        return {}
    from uapt import files

    path = base_scores_path(model_cfg, suite_cfg, cache_dir, init_seed=init_seed, inputs=inputs)
    if path.exists():
        try:
            cached = files.read_json(path)
            if "outcomes" in cached:
                log.info("base scores from cache %s", path)
                return cached
            log.info("base-score cache %s has no per-sample outcomes; evaluating again", path)
        except files.DamagedFile as e:
            log.warning("base-score cache %s is damaged (%s); evaluating again", path, e.why)
    result = {"outcomes": [], **evaluate_fn()}
    files.write_json(path, result)
    return result


def result_rows(results: Mapping[str, Any]) -> list[list[Any]]:
    """[task, metric, value, stderr, base, delta] per metric, from a run_suite result or run record."""
    base, delta = results.get("eval_base") or {}, results.get("eval_delta") or {}
    rows = []
    for task, metrics in (results.get("eval") or {}).items():
        for metric, value in metrics.items():
            if metric.endswith("_stderr"):
                continue
            rows.append(
                [
                    task,
                    metric,
                    value,
                    metrics.get(metric + "_stderr"),
                    (base.get(task) or {}).get(metric),
                    (delta.get(task) or {}).get(metric),
                ]
            )
    return rows
