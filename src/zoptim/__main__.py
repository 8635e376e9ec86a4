"""``python -m zoptim``: the ``zoptim`` command."""

import sys

from .cli import main

sys.exit(main())
