"""Compare runs from their TensorBoard event files: the same as `powergrad compare` (see
`powergrad compare --help` for the options).

    python tools/compare_runs.py runs/fashion_mnist/resnet_baseline runs/fashion_mnist/resnet_pgt \
        --target 90 --out runs/fashion_mnist/my_comparison
"""
import sys

from powergrad.commands.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
