"""`model.*` and `model.lora.*` (conf/model/base.yaml): which model and tokenizer, how they load,
and the LoRA adapters. Loading them is uapt.models."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from uapt.schema import (
    BOOL,
    MAPPING,
    TEXT,
    ConfigError,
    Section,
    interval,
    number,
    one_of,
    option,
    optional,
    satisfies,
)

ARCHITECTURES = {"llama": "llama", "gemma2": "gemma2", "phi3": "phi3"}
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "auto")  # auto: transformers' choice (sdpa if supported)


def _targets_ok(v: Any) -> bool:
    if isinstance(v, str):
        return v == "all-linear"
    return (
        isinstance(v, list | tuple)
        and len(v) > 0
        and all(isinstance(name, str) and name for name in v)
    )


@dataclass(frozen=True)
class LoraConfig(Section):
    """`model.lora.*`: low-rank adapters instead of all weights (the teacher: adapters off)."""

    SECTION: ClassVar[str] = "model.lora"
    DEFAULTS: ClassVar[str] = "model/base.yaml"

    enabled: bool = option(BOOL)
    r: int = option(number(1, integer=True))
    alpha: float = option(number(0, lo_open=True))
    dropout: float = option(interval(0, 1, hi_open=True))
    target_modules: str | tuple[str, ...] = option(
        satisfies(_targets_ok, "'all-linear' or a non-empty list of module names")
    )

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return dict(super().defaults()["lora"])


@dataclass(frozen=True)
class ModelConfig(Section):
    """`model.*`, checked (conf/model/base.yaml says what each key does)."""

    SECTION: ClassVar[str] = "model"
    DEFAULTS: ClassVar[str] = "model/base.yaml"

    name: str = option(TEXT)
    path: str | None = option(optional(TEXT))
    tokenizer: str | None = option(optional(TEXT))
    source: str = option(one_of("auto", "hub", "embedded"))
    arch: str = option(one_of(*ARCHITECTURES))
    config: Mapping[str, Any] | None = option(optional(MAPPING))
    dtype: str = option(one_of("auto", "float32", "bfloat16", "float16"))
    attn_implementation: str = option(one_of(*ATTN_IMPLEMENTATIONS))
    chat_template: str | None = option(optional(TEXT))
    trust_remote_code: bool = option(BOOL)
    lora: LoraConfig = option(section=LoraConfig)

    def check(self, where: str) -> None:
        for key in ("path", "tokenizer"):  # written as a path (./, /, ~): it must exist
            value = str(getattr(self, key) or "")
            if value.startswith((".", "/", "~")) and not Path(value).expanduser().exists():
                raise ConfigError(f"model.{key}={value!r}: no such local folder")
        if not self.path and self.arch == "gemma2" and self.attn_implementation == "sdpa":
            raise ConfigError(no_sdpa_message("Gemma2ForCausalLM"))


def no_sdpa_message(cls_name: str) -> str:
    return (
        f"model.attn_implementation='sdpa': {cls_name} has no SDPA attention in transformers "
        "(Gemma-2's attention-logit softcapping needs eager); set model.attn_implementation=eager"
    )
