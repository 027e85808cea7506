"""Device kinds the plan prices time on: each one's peak FLOP/s and the MFU the plan assumes,
with where each figure comes from (`plan.*`, the config section that asks for the plan, is
uapt.sections.plan).

    uapt-train sweep=paper_grid plan=on plan.device=h100 [plan.mfu=0.4] [plan.peak_tflops=...]

Time is FLOPs / (peak x MFU): the peak at the runs' precision (`trainer.precision`: bf16 on the
tensor cores, fp32 without TF32, which uapt does not enable), dense (without the sparsity the
datasheets also quote).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from uapt.schema import ConfigError

if TYPE_CHECKING:
    from uapt.sections.plan import PlanConfig


@dataclass(frozen=True)
class Device:
    """A device kind: peak dense TFLOP/s by training precision, and the MFU the plan assumes."""

    label: str
    peak_tflops: Mapping[str, float]  # "bf16" | "fp32" -> dense TFLOP/s
    peak_source: str
    mfu: float
    mfu_source: str
    measured: bool  # whether uapt measured the MFU on this kind (else it is an assumption)


GPU_MFU = 0.35  # assumed for every GPU kind: uapt has measured none (no GPU run is recorded)
GPU_MFU_SOURCE = (
    "assumption, not measured by uapt: a common MFU of bf16 fine-tuning of 1-8B models with "
    "transformers; measure it and set plan.mfu"
)
# CPU: measured by benchmarks/plan_accuracy.py (docs/results/benchmarks/plan_accuracy.json,
# 2026-12-03) on this project's 2-core AMD EPYC machine with one torch thread, as every benchmark
# runs: the peak is an fp32 matrix product's rate, the MFU that of SmolLM2-135M-Instruct's training
# step on real GSM8K rows, both medians over rounds interleaved on a shared machine (load average
# up to 7.8): contention slowed the products as it slowed the steps, so the two are low and high
# alike and their product, the rate a run gets here, is what a plan uses. Another CPU has other
# figures: set plan.peak_tflops and plan.mfu for it.
CPU_PEAK_TFLOPS = 0.0377
CPU_MFU = 0.616
DEVICES: dict[str, Device] = {
    "h100": Device(
        "NVIDIA H100 SXM5",
        {"bf16": 989.4, "fp32": 66.9},
        "NVIDIA H100 Tensor Core GPU datasheet: BF16 1,979 TFLOPS with sparsity (989.4 dense), "
        "FP32 66.9 TFLOPS",
        GPU_MFU,
        GPU_MFU_SOURCE,
        measured=False,
    ),
    "h200": Device(
        "NVIDIA H200 SXM",
        {"bf16": 989.4, "fp32": 66.9},
        "NVIDIA H200 Tensor Core GPU datasheet: BF16 1,979 TFLOPS with sparsity (989.4 dense), "
        "FP32 67 TFLOPS",
        GPU_MFU,
        GPU_MFU_SOURCE,
        measured=False,
    ),
    "a100": Device(
        "NVIDIA A100 SXM4",
        {"bf16": 312.0, "fp32": 19.5},
        "NVIDIA A100 Tensor Core GPU datasheet: BF16 624 TFLOPS with sparsity (312 dense), "
        "FP32 19.5 TFLOPS",
        GPU_MFU,
        GPU_MFU_SOURCE,
        measured=False,
    ),
    "cpu": Device(
        "CPU, one thread (the project's 2-core AMD EPYC)",
        {"bf16": CPU_PEAK_TFLOPS, "fp32": CPU_PEAK_TFLOPS},
        "measured: an fp32 matrix product on one thread (benchmarks/plan_accuracy.py)",
        CPU_MFU,
        "measured: SmolLM2-135M-Instruct's training step on GSM8K rows (benchmarks/plan_accuracy.py)",
        measured=True,
    ),
}
GPU_NAMES = {"H100": "h100", "H200": "h200", "A100": "a100"}  # torch's device name -> kind


@dataclass(frozen=True)
class Rate:
    """What a FLOP costs in time on the plan's device."""

    kind: str
    device: Device
    peak_tflops: float  # at the runs' precision
    mfu: float
    mfu_source: str
    peak_source: str

    def seconds(self, flops: float, devices: int = 1) -> float:
        return flops / (self.peak_tflops * 1e12 * self.mfu * devices)


def device_kind(name: str) -> str:
    """`auto`: the kind of this machine's first GPU (by its name), else cpu."""
    if name != "auto":
        return name
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    gpu = torch.cuda.get_device_name(0)
    for token, kind in GPU_NAMES.items():
        if token in gpu:
            return kind
    raise ConfigError(
        f"plan.device=auto: this machine's GPU {gpu!r} is not in uapt's table; "
        f"name one ({', '.join(DEVICES)}) and set plan.peak_tflops"
    )


def rate(plan: PlanConfig, precision: str) -> Rate:
    kind = device_kind(plan.device)
    device = DEVICES[kind]
    peak = plan.peak_tflops or device.peak_tflops[precision]
    peak_source = "plan.peak_tflops" if plan.peak_tflops else device.peak_source
    mfu_source = "plan.mfu" if plan.mfu else device.mfu_source
    return Rate(kind, device, peak, plan.mfu or device.mfu, mfu_source, peak_source)
