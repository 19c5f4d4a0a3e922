"""The trainer's exception types, under Lightwire's common base.

::

    LightwireError                  (proxy.errors) base; never raised itself
    └── TrainingError               a training run cannot start or continue (bad options, foreign checkpoint)
        └── NoUsableDataError       no record survived conversion and the algorithm's filter; nothing was written

The command line turns :class:`NoUsableDataError` into exit status :data:`optimizers.trainer.EXIT_NO_DATA` and
any other :class:`TrainingError` into status 1, each with its message on stderr.
"""

from __future__ import annotations

from proxy.errors import LightwireError


class TrainingError(LightwireError):
    pass


class NoUsableDataError(TrainingError):
    pass
