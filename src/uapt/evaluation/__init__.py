"""Evaluation suites through lm-evaluation-harness, on the in-memory model or standalone (`uapt-eval`).

A suite (conf/eval/<name>.yaml) lists lm-eval tasks with their few-shot count, sample limit,
chat-template use and generation length; results follow docs/run_record.md:
`{"eval": {task: {metric: value, metric + "_stderr": value}}, "eval_meta": {...}}` with lm-eval's
metric keys, minus the `,none` suffix of unfiltered metrics, and every sample's outcome in
`<run>/eval_outcomes.jsonl` (`outcomes`). Read in the order of the flow: `suite` (the config),
`tasks` (what lm-eval runs), `run` (running it, the base model's cached scores). The command,
`cli` (uapt-eval), sits above the config layer and is not imported here: a module that imports
evaluation's data does not load the run config with it. See docs/evaluation.md.
"""

from uapt.evaluation.run import (
    base_scores,
    evaluate_lm,
    flatten_results,
    result_rows,
    run_suite,
    score_delta,
    suite_hash,
)
from uapt.evaluation.suite import parse_suite, suite_tasks, validate_suite
from uapt.evaluation.tasks import arith_dataset, ifeval_dataset, lm_eval_version, task_request
from uapt.sections.eval import SuiteConfig, TaskSpec  # re-exported: a suite's parts

__all__ = [
    "SuiteConfig",
    "TaskSpec",
    "arith_dataset",
    "base_scores",
    "evaluate_lm",
    "flatten_results",
    "ifeval_dataset",
    "lm_eval_version",
    "parse_suite",
    "result_rows",
    "run_suite",
    "score_delta",
    "suite_hash",
    "suite_tasks",
    "task_request",
    "validate_suite",
]
