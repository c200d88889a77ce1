"""Entry point of a worker process: ``python -m worker SLOT`` (started by the supervisor)."""

import os
import sys

# Issue 10: nothing in the worker depends on the directory the supervisor was started in
# (the supervisor starts it with -P, so that directory is not on sys.path either).
os.chdir("/")

from worker.main import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
