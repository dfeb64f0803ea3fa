"""Shared machinery, not public API: CoLA, imported once with its import-time deprecation noise silenced.

CoLA's torch backend, and torch's forward-mode AD decompositions (loaded at the first ``jvp``), call
``torch.jit.script`` at import time, which torch >= 2.10 deprecates with a ``FutureWarning``: noise for our
users, about code that is not theirs. Every hessops module that uses CoLA imports it from here
(``from hessops._cola import cola``), so the filter applies whichever module loads first, and only to these
two imports (no global warnings filter is installed).
"""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
    import cola
    import torch._decomp.decompositions_for_jvp  # noqa: F401

__all__ = ["cola"]
