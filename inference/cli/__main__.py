"""``python -m inference.cli``: the ``dfx`` command (as torchrun and ``accelerate launch -m`` start it)."""

import sys

from . import main

sys.exit(main())
