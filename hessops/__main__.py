"""``python -m hessops`` is the ``hessops`` command."""

import sys

from hessops.cli import main

sys.exit(main())
