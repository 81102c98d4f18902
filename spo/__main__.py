"""`python -m spo` is the same as the `spo` command."""

import sys

from spo.cli import main

sys.exit(main())
