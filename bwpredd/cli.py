"""``bwpredd``: build a Config from flags, environment and file, then run the
Server. Also ``bwpredd check-model DIR``. Only this edge logs-and-exits."""

from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, fields
from typing import Any

from bwpredd.config import Config, ConfigError

__all__ = ["CONFIG_ERROR", "STARTUP_FAILURE", "main"]

CONFIG_ERROR = 2
STARTUP_FAILURE = 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bwpredd",
        description="Per-peer bandwidth forecasting sidecar for the DWCP mesh. Every option "
        "can also be set as BWPREDD_<NAME> in the environment or as <name> in the TOML file "
        "(--config / BWPREDD_CONFIG); flags win over the environment, which wins over the file.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", help="TOML configuration file")
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        default = None if f.default is MISSING else f.default
        kind = str(f.type)
        help_text = f"(default: {default!r})"
        if kind == "bool":
            parser.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        else:
            conv: Any = {"int": lambda v: int(v, 0), "float": float}.get(kind, str)
            parser.add_argument(flag, dest=f.name, type=conv, default=None, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bwpredd`` console script.

    Args:
        argv: arguments (``sys.argv[1:]`` when None).
    """
    args_list = sys.argv[1:] if argv is None else argv
    if args_list[:1] == ["check-model"]:
        from bwpredd import checkmodel

        return checkmodel.main(args_list[1:])
    args = vars(_parser().parse_args(args_list))
    config_file = args.pop("config")
    try:
        config = Config.load(flags=args, file=config_file)
    except ConfigError as exc:
        print(f"bwpredd: configuration error: {exc}", file=sys.stderr)
        return CONFIG_ERROR

    from bwpredd.logging import configure_logging, flush_logs_on_fatal_signals
    from bwpredd.server import Server, StartupError

    configure_logging(config.log_format, config.log_level)
    flush_logs_on_fatal_signals()
    try:
        return Server(config).run()
    except StartupError as exc:
        from bwpredd.logging import get_logger

        get_logger("bwpredd.cli").error("startup_failed", error=str(exc))
        print(f"bwpredd: cannot start: {exc}", file=sys.stderr)
        return STARTUP_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
