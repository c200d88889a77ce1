"""Entry point of a worker process: ``python -m worker SLOT`` (started by the supervisor)."""

import sys

from worker.main import main

sys.exit(main(sys.argv[1:]))
