"""`python -m oneword.cli ...` (same as `oneword ...`)."""

import sys

from . import main

sys.exit(main())
