"""``python -m supervisor`` is the ``iupop3`` command."""

import sys

from supervisor.main import main

sys.exit(main())
