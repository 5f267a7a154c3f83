"""`python -m model_worker`: see model_worker.cli."""

import sys

from model_worker.cli import main

sys.exit(main())
