"""Affinity heatmaps of a GSPN layer: the four anisotropic directional maps and the dense aggregate.

    python examples/heatmaps.py --out out/heatmaps --size 32 --row 16 --col 16
"""

import argparse

import torch

from gspn_ref import GSPN
from gspn_ref.visualize import affinity_heatmaps, synthetic_image


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/heatmaps")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--row", type=int, default=None, help="output row (default: centre)")
    parser.add_argument("--col", type=int, default=None, help="output column (default: centre)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    image = synthetic_image(args.size)
    layer = GSPN(3, d_inner=8, d_proxy=4)
    position = (args.row if args.row is not None else args.size // 2, args.col if args.col is not None else args.size // 2)
    for name, path in affinity_heatmaps(layer, image, position, args.out).items():
        print(f"{name:>10}: {path}")


if __name__ == "__main__":
    main()
