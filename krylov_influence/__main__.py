"""``python -m krylov_influence``: the ``krylov-influence`` command."""

import sys

from krylov_influence.cli import main

sys.exit(main())
