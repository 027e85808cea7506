"""`plan.*` (conf/plan/base.yaml): the plan of a sweep instead of its launch, and the device
kind it prices time on (uapt.devices)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from uapt.schema import BOOL, ConfigError, Section, interval, number, one_of, option, optional

# The device kinds uapt.devices.DEVICES describes (a test holds the two equal).
DEVICE_KINDS = ("h100", "h200", "a100", "cpu")


@dataclass(frozen=True)
class PlanConfig(Section):
    """`plan.*` (conf/plan/base.yaml): the plan instead of the launch, and its device."""

    SECTION: ClassVar[str] = "plan"
    DEFAULTS: ClassVar[str] = "plan/base.yaml"

    enabled: bool = option(BOOL)
    device: str = option(one_of("auto", *DEVICE_KINDS))
    mfu: float | None = option(optional(interval(0, 1, lo_open=True)))
    peak_tflops: float | None = option(optional(number(0, lo_open=True)))

    def check(self, where: str) -> None:
        if self.enabled:
            return
        given = [k for k in ("mfu", "peak_tflops") if getattr(self, k) is not None]
        given += ["device"] if self.device != "auto" else []
        if given:
            raise ConfigError(
                f"plan.{given[0]} is set but the plan is off: add plan=on to see the plan"
            )
