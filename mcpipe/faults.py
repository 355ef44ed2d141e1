"""A test hook, inert unless ``MCPIPE_TEST_PAUSE_AT`` is set: pause at a named point so a kill lands there.

``MCPIPE_TEST_PAUSE_AT=block_write,store_complete`` makes a process log
``test pause at <point>`` (a warning, on stderr) and sleep
``MCPIPE_TEST_PAUSE_SECONDS`` (default 1) each time it reaches one of those
points; the fault-injection tests kill it during the sleep. The points:

* ``block_write``: a store block's features are written, not yet flushed nor flagged (``store/writer.py``)
* ``store_complete``: every row of a store is committed, ``complete`` not yet set (``store/writer.py``)
* ``head_export``: train-head's last epoch is saved and scores.csv written, head.pt not yet (``cleaner/outputs.py``)
* ``sweep_results``: every point finished, results.csv written, results.md not yet (``cleaner/sweep.py``)
* ``finetune_step``: a training step is done, its checkpoint (if one is due) not yet written (``finetune/loop.py``)
* ``finetune_evaluate``: an epoch is trained, its evaluation not begun (``finetune/loop.py``)
* ``finetune_export``: the best epoch's model is about to be exported (``finetune/loop.py``)
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)


def pause_at(point: str) -> None:
    """Sleep here if ``MCPIPE_TEST_PAUSE_AT`` names ``point``; otherwise do nothing."""
    names = os.environ.get("MCPIPE_TEST_PAUSE_AT")
    if names and point in names.split(","):
        log.warning("test pause at %s", point)
        time.sleep(float(os.environ.get("MCPIPE_TEST_PAUSE_SECONDS", "1")))
