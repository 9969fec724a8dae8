"""`python -m seng_fw ...` = `seng-fw ...` (the lab starts its processes this way, so they
run with the same interpreter and virtual environment)."""

import sys

from seng_fw.cli import main

sys.exit(main())
