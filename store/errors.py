"""The root of Lightwire's exception types, in the lowest layer so that every package can derive from it.

``proxy.errors`` draws the whole tree; ``optimizers.errors`` adds the optimizer's branch.
"""

from __future__ import annotations


class LightwireError(Exception):
    """Base of every exception Lightwire raises on purpose; never raised itself."""
