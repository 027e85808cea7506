"""`python -m uapt.table`: the same as uapt-table."""

import sys

from uapt.table.cli import main

sys.exit(main())
