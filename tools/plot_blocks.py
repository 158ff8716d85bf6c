"""Plot the GPAS diagnostics of ViT runs against depth: per-block residual-stream variance and
gradient norm, as a markdown table (PATH.md) and a PNG (PATH.png).

    python tools/plot_blocks.py runs/vit_study/vit_pre runs/vit_study/vit_pre_gpas \
        --out runs/vit_study/blocks

Each value is the mean of the last 5 logged steps. A run without the per-block record (not a
ViT, log.diagnostics off, or fewer steps than log.log_interval) is refused with exit 1.
"""
import argparse
import sys

from powergrad.compare import block_report

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="ViT run folders")
    parser.add_argument("--out", required=True, metavar="PATH",
                        help="write PATH.md and PATH.png (e.g. runs/vit_study/blocks)")
    args = parser.parse_intermixed_args()
    sys.exit(block_report(args.runs, args.out, command="python " + " ".join(sys.argv)))
