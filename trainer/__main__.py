"""``python -m trainer``: train, eval, eval-allocator, train-transfer, eval-transfer."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    from trainer import eval_transfer, evaluate, evaluate_allocator, train, train_transfer

    train.add_arguments(sub.add_parser("train", help="train the forecaster and the agent"))
    evaluate.add_arguments(sub.add_parser("eval", help="evaluate a forecaster on traces"))
    evaluate_allocator.add_arguments(
        sub.add_parser("eval-allocator", help="evaluate allocation policies on traces")
    )
    train_transfer.add_arguments(
        sub.add_parser("train-transfer", help="train the horizon (transfer time) model alone")
    )
    eval_transfer.add_arguments(
        sub.add_parser("eval-transfer", help="evaluate transfer times of a model directory")
    )
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
