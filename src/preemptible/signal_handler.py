"""`preemptible.signal_handler`: the documented module path of the signal-handling API.

The code lives in `preemptible.stopping.signal_handler`; this path is the same module object
(so patching either patches both)."""

import sys

from preemptible.stopping import signal_handler as _module

sys.modules[__name__] = _module
