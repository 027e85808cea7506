"""`python -m uapt.evaluation`: the same as uapt-eval."""

from uapt.evaluation.cli import main

main()
