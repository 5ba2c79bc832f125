"""Reproduce the gloo abort at exit that preemptible's exit hook prevents (not part of the test run).

    python tests/faults/exit_abort.py --runs 100            # with the hook: expect 0 aborts
    python tests/faults/exit_abort.py --runs 100 --no-hook  # without: ~7 % of runs abort here

Each run spawns 2 gloo ranks that train two tiny DDP models, stop on a signal, all_gather the
signals and exit (the body of tests/multiprocess/test_ranks.py::test_stop_flag_rides_on_ddp_gradients).
An abort is a rank killed by SIGABRT after it wrote its result: "terminate called without an
active exception" (see preemptible.distributed.let_gloo_workers_finish).
"""

import argparse
import atexit
import os
import sys
import tempfile

sys.path[:0] = [os.path.join(os.path.dirname(__file__), ".."), os.path.join(os.path.dirname(__file__), "..", "multiprocess")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--no-hook", action="store_true", help="unregister the exit hook in the ranks")
    args = ap.parse_args()
    if args.no_hook:
        os.environ["PREEMPTIBLE_TEST_NO_EXIT_HOOK"] = "1"  # read by the ranks, which import this module
    from distributed_helpers import run_ranks

    aborts = 0
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as d:
            try:
                run_ranks(_body, 2, d)
            except Exception as e:  # torch's ProcessExitedException names the signal
                aborts += "SIGABRT" in str(e)
                print(f"run {i}: {e}", flush=True)
    print(f"{aborts} of {args.runs} runs aborted at exit ({'without' if args.no_hook else 'with'} the exit hook)")


def _body(rank, world):
    if os.environ.get("PREEMPTIBLE_TEST_NO_EXIT_HOOK"):
        from preemptible.distributed.env import let_gloo_workers_finish

        atexit.unregister(let_gloo_workers_finish)
    import test_ranks

    return test_ranks._ddp_loop(rank, world, world - 1, 6)


if __name__ == "__main__":
    main()
