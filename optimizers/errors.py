"""The optimizers' exception types, under Lightwire's common base.

::

    LightwireError                  (store.errors) base; never raised itself
    ├── NotReady                    the optimizer has nothing to publish into yet (the policy is starting)
    ├── RunCancelled                the process stopped during an optimizer run (or is stopping: none starts)
    └── TrainingError               a training run cannot start or continue (bad options, foreign checkpoint)
        └── NoUsableDataError       no record survived conversion and the algorithm's filter; nothing was written

The command line turns :class:`NoUsableDataError` into exit status :data:`optimizers.trainer.EXIT_NO_DATA` and
any other :class:`TrainingError` into status 1, each with its message on stderr.
"""

from __future__ import annotations

from store.errors import LightwireError


class TrainingError(LightwireError):
    pass


class NoUsableDataError(TrainingError):
    pass


class NotReady(LightwireError):
    pass


class RunCancelled(LightwireError):
    pass
