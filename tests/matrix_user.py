"""The tests' native Matrix user: see bridge/devtools/matrix_user.py (shared with the demo)."""

from bridge.devtools.matrix_user import *  # noqa: F403
from bridge.devtools.matrix_user import __all__  # noqa: F401
