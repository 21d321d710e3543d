"""`python -m distrack.bench`: see distrack.bench.cli."""

import sys

from distrack.bench.cli import main

sys.exit(main())
