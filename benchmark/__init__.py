"""metabench core: the episodic Omniglot protocol, the learner API and the plugin system.

Plugin authors import from here::

    from benchmark import hookimpl
    from benchmark.learner import Learner

This module must stay cheap to import (no torch): ``bench --help`` imports it.
"""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

#: The pluggy project name. A marker built with any other name is silently ignored by our manager.
PROJECT_NAME = "bench"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

__all__ = ["PROJECT_NAME", "__version__", "hookimpl", "hookspec"]
