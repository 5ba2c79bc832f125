"""Run the real recipe's main() once per case, all in this one process, so that many bad-input cases
pay the interpreter and imports once (a recipe process takes seconds just to import torch).

stdin: JSON [{"argv": [...], "env": {...}}, ...]; stdout: one JSON line per case with the exit
status, what the case wrote to stderr and stdout, and whether its run directory exists afterwards.
A case that does not fail would end this process (exit_run): the caller sees missing results.
"""

import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "finetune.py"

sys.path.insert(0, str(RECIPE.parent))  # as when the recipe runs as a script: its building blocks beside it
spec = importlib.util.spec_from_file_location("finetune", RECIPE)
recipe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recipe)
# Hydra finds conf/ next to the script (as when it runs as __main__), not as a package module's.
recipe.hydra_main.__wrapped__.__module__ = "__main__"
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

cases = json.load(sys.stdin)
real_stdout = os.dup(1)
for case in cases:
    GlobalHydra.instance().clear()
    saved_env = dict(os.environ)
    os.environ.update(case.get("env", {}))
    sys.argv = [str(RECIPE), *case["argv"]]
    with tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as out:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            recipe.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        err.seek(0)
        out.seek(0)
        result = {"code": code, "stderr": err.read().decode(errors="replace"),
                  "stdout": out.read().decode(errors="replace")}
    os.environ.clear()
    os.environ.update(saved_env)
    os.write(real_stdout, (json.dumps(result) + "\n").encode())
