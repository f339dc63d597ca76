"""cvmkd: knowledge distillation of neural machine-translation models, with proof.

Plugins import the hook marker from here::

    from cvmkd_core import hookimpl
"""

from __future__ import annotations

from cvmkd_core.hookspecs import hookimpl, hookspec

__version__ = "0.1.0"

__all__ = ["__version__", "hookimpl", "hookspec"]
