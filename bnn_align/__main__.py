"""``python -m bnn_align demo``: the same as the ``bnn-align`` console script."""

import sys

from .cli import main

sys.exit(main())
