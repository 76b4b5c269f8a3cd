"""``python -m bridge.cli``: the same as the ``eimis-bridge`` command."""

import sys

from bridge.cli import main

sys.exit(main())
