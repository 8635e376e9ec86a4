"""``python -m zoptim.cli``: the ``zoptim`` command (what ``zoptim finetune --nproc N`` hands to torchrun)."""

import sys

from . import main

sys.exit(main())
