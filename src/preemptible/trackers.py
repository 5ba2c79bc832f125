"""`preemptible.trackers`: the experiment trackers' public path (`preemptible.trackers.WandB`, ...).

The code lives in `preemptible.observe.trackers`; this path is the same module object."""

import sys

from preemptible.observe import trackers as _module

sys.modules[__name__] = _module
