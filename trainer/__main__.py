"""``python -m trainer``: train, retrain, eval, eval-allocator, report-allocator,
allocator-limits, allocator-state, train-transfer, eval-transfer."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    from trainer import (
        allocator_limits,
        allocator_state,
        eval_transfer,
        evaluate,
        evaluate_allocator,
        report_allocator,
        retrain,
        train,
        train_transfer,
    )

    train.add_arguments(sub.add_parser("train", help="train the forecaster and the agent"))
    retrain.add_arguments(
        sub.add_parser(
            "retrain", help="fine-tune a model directory on recordings; report against it"
        )
    )
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
    report_allocator.add_arguments(
        sub.add_parser(
            "report-allocator",
            help="re-score a shipped model directory on make train's split; rewrite allocator.md",
        )
    )
    allocator_limits.add_arguments(
        sub.add_parser(
            "allocator-limits",
            help="train the agent on the shipped state and with the next step known",
        )
    )
    allocator_state.add_arguments(
        sub.add_parser(
            "allocator-state",
            help="train the agent on the shipped state and on richer ones; compare on validation",
        )
    )
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
