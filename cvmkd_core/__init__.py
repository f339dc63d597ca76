"""cvmkd's core: the event loop, the plugin manager, recipes, checkpoints and the run directory.

Plugins import the hook marker from here::

    from cvmkd_core import hookimpl
"""

from __future__ import annotations

from cvmkd_core.hookspecs import hookimpl, hookspec

__version__ = "0.1.0"

__all__ = ["__version__", "hookimpl", "hookspec"]
