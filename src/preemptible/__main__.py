"""python -m preemptible export RUN_OR_CHECKPOINT OUT  |  status RUN_DIR  |  plot RUN_DIR [-o FILE.png]"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m preemptible", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="a committed checkpoint's model weights -> a .pt or .safetensors file")
    ex.add_argument("checkpoint", help="a run directory (its head checkpoint) or a checkpoint directory")
    ex.add_argument("out", help="the file to write (.safetensors: safetensors, else torch.save)")
    ex.add_argument("--format", choices=("pt", "safetensors"), help="default: from OUT's suffix")
    ex.add_argument("--no-verify", action="store_true", help="skip the CRC-32C check of the checkpoint's files")
    st = sub.add_parser("status", help="a run directory's checkpoints (head, lineage, validity) and its stops")
    st.add_argument("run_dir")
    st.add_argument("--verify", action="store_true", help="also check every file's CRC-32C (reads them all)")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    pl = sub.add_parser("plot", help="loss and LR against step, stops, resumes and lost time marked (matplotlib)")
    pl.add_argument("run_dir")
    pl.add_argument("-o", "--out", help="the image to write (.png, .svg, .pdf); default RUN_DIR/run.png")
    args = parser.parse_args(argv)

    from preemptible.errors import ConfigError
    from preemptible.observe.export import export_weights, format_status, status

    try:
        if args.command == "export":
            out = export_weights(args.checkpoint, args.out, format=args.format, verify=not args.no_verify)
            print(f"wrote {out}")
        elif args.command == "plot":
            from preemptible.observe.plot import interruptions, plot_run

            out = plot_run(args.run_dir, args.out)
            for it in interruptions(args.run_dir):
                lost = f"{it.lost_seconds:.1f}s lost" if it.lost_seconds is not None else "time lost unknown"
                print(f"{it.reason} at step {it.stop_step if it.stop_step is not None else '?'} -> resumed at step "
                      f"{it.resume_step}: {lost}" + (" (save skipped)" if it.save_skipped else ""))
            print(f"wrote {out}")
        else:
            info = status(args.run_dir, verify=args.verify)
            print(json.dumps(info, indent=1, default=str) if args.json else format_status(info))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
