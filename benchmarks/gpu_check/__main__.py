"""`python benchmarks/gpu_check ...`: the folder run as a script (it is then not yet a package)."""

import sys
from pathlib import Path

# Python put this folder first on the path, where its modules would shadow any top-level module
# of the same name (`check`, `cli`, ...): its parent, benchmarks/, takes its place.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from gpu_check.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
