"""What a new user does: type the commands the README prints, and read what comes back.

Every scenario runs the real command-line tools in a subprocess, from a working directory of its
own (so `./runs` is the scenario's), and checks only what a user sees: the exit code, the text on
the terminal and the files the docs tell them to open.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
UAT = Path(__file__).resolve().parent

# The four objectives of the paper, as the README names them (and `sweep=objectives` runs them).
OBJECTIVES = ("mle", "masked_mle", "self_distill", "masked_mle_distill")


def venv_bin(root: Path = REPO) -> Path:
    """The tools the README calls (`.venv/bin/...`); else those of the interpreter running pytest."""
    folder = root / ".venv" / "bin"
    return folder if (folder / "uapt-train").exists() else Path(sys.executable).parent


def user_env(cache_dir: Path | None = None, **extra: str) -> dict[str, str]:
    """The user's shell: offline (no Hub, W&B offline), a wide terminal, polite to 2 shared cores."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        # Rich wraps log lines at 80 columns when piped; a user's terminal is usually wider.
        "COLUMNS": "200",
    }
    if cache_dir is not None:
        env["UAPT_CACHE"] = str(cache_dir)
    env.update(extra)
    return env


def quick_cache() -> Path:
    """The converted-model/tokenizer cache quick scenarios share with the test suite."""
    return Path(os.environ.get("UAPT_CACHE", str(REPO / ".cache" / "uapt")))


@dataclass
class Seen:
    """One command and what the user saw."""

    args: list[str]
    rc: int
    out: str
    err: str

    @property
    def text(self) -> str:
        """stdout and stderr as one, whitespace collapsed (log lines may wrap)."""
        return " ".join((self.out + "\n" + self.err).split())

    def __str__(self) -> str:
        cmd = shlex.join(self.args)
        return f"$ {cmd}\n[exit {self.rc}]\n--- stdout\n{self.out[-4000:]}\n--- stderr\n{self.err[-6000:]}"


def sh(args: list[str], cwd: Path, env: dict[str, str], timeout: float) -> Seen:
    proc = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return Seen([str(a) for a in args], proc.returncode, proc.stdout, proc.stderr)


def readme_commands() -> list[str]:
    """Every command line of the README's ```bash blocks, as printed."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def readme_command(prefix: str) -> list[str]:
    """The README's command line that starts with `prefix`, split like a shell (comments dropped)."""
    found = [line for line in readme_commands() if line.startswith(prefix)]
    if len(found) != 1:
        raise AssertionError(
            f"README.md: expected one command starting {prefix!r}, found {len(found)}: {found}"
        )
    return shlex.split(found[0], comments=True)


def as_typed(tokens: list[str], bin_dir: Path) -> list[str]:
    """`.venv/bin/<tool> ...` -> the tool in `bin_dir` (the same script; only its folder differs)."""
    head, *rest = tokens
    if head.startswith(".venv/bin/"):
        head = str(bin_dir / head.removeprefix(".venv/bin/"))
    return [head, *rest]


def run_dirs(runs: Path) -> list[Path]:
    """Run folders (`<slug>-<id>/`) under a runs directory, as `ls runs` shows them."""
    return sorted(p for p in runs.iterdir() if (p / "run.json").exists())
