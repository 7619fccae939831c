"""`python -m tulip.report ...`: the same as `tulip-report ...`."""
import sys

from tulip.report.cli import main

sys.exit(main())
