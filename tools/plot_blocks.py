"""Per-block residual-stream variance and gradient norm of ViT runs (the GPAS diagnostics),
as a markdown table and a PNG against depth.

    python tools/plot_blocks.py runs/vit_study/vit_pre runs/vit_study/vit_pre_gpas \
        --out results/vit_blocks
"""
import argparse
import sys

from powergrad.compare import block_report

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    block_report(args.runs, args.out, command="python " + " ".join(sys.argv))
