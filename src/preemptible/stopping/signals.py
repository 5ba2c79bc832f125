"""The signal sets, in one place.

- `DEFAULT`: what stops a run unless told otherwise: TERM (Kubernetes, torchrun forwarding, scancel),
  INT (Ctrl-C), HUP (the terminal or SSH session went away).
- `JOB_ENDING`: what launchers and schedulers send to end a job: the default set plus USR2 (SLURM's
  `--signal=B:USR2@N`). Held during the imports before a handler exists (`early.hold_signals`), and
  ignored once a run's last checkpoint is committed (`distributed.env.ignore_late_signals`).
- `LEFT_TO_THE_MAIN_PROCESS`: what a data-loader worker ignores (it shares the process group, so a
  signal to the group reaches it too): the job-ending set plus USR1 (NCCL and MPI use it).
"""

import signal

DEFAULT = ("SIGTERM", "SIGINT", "SIGHUP")
JOB_ENDING = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2)
LEFT_TO_THE_MAIN_PROCESS = (*JOB_ENDING, signal.SIGUSR1)
