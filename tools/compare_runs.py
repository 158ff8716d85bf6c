"""Compare runs from their TensorBoard event files: the same as `powergrad compare`.

    python tools/compare_runs.py runs/fashion_mnist/resnet_baseline runs/fashion_mnist/resnet_pgt \
        --target 90 --out results/my_comparison
"""
import sys

from powergrad.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
