"""Command-line flags from a frozen config dataclass: one `--field-name` per field.

A config rejects a bad field value by raising `ConfigError` (a ValueError naming the field);
`config_from_args` turns it into an argparse usage error naming the flag.
"""
import argparse
import dataclasses
import math
import numbers
import typing
import warnings


class ConfigError(ValueError):
    """A config field holds a value it cannot take; `field` names it."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser, defaults) -> None:
    """Adds a flag per field of the dataclass instance `defaults`, defaulting to its value;
    a field's `metadata["choices"]` limits its values."""
    for field in dataclasses.fields(defaults):
        value = getattr(defaults, field.name)
        flag = flag_name(field.name)
        if typing.get_origin(field.type) is tuple:
            item_type = typing.get_args(field.type)[0]
            parser.add_argument(flag, type=item_type, nargs="*", default=value,
                                help=f"default: {' '.join(map(str, value)) or '(none)'}")
        elif field.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(flag, type=field.type, default=value, help=f"default: {value}",
                                choices=field.metadata.get("choices"))


def config_from_args(cls, args: argparse.Namespace, parser: argparse.ArgumentParser):
    """`cls` built from the parsed flags; a field it rejects is a usage error naming its flag."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    except ConfigError as error:
        usage_error(parser, error.field, error.problem)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def unit_interval(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text}")
    return value


def show_warnings_plainly() -> None:
    """Warnings as one "warning: ..." line on stderr, for command-line programs (only their
    format changes, so code that records warnings still does)."""
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"


def usage_error(parser: argparse.ArgumentParser, field: str, problem: str) -> typing.NoReturn:
    parser.error(f"argument {flag_name(field)}: {problem}")


# Checks of single field values, for configs' __post_init__: each raises ConfigError.

def require_int(config, field: str, minimum: int) -> None:
    value = getattr(config, field)
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ConfigError(field, f"must be an integer >= {minimum}, got {value!r}")


def require_number(config, field: str, low: float, high: float = math.inf, *,
                   low_open: bool = False, high_open: bool = False) -> None:
    """A finite real number in [low, high] (or open at either end)."""
    value = getattr(config, field)
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
          and (value > low if low_open else value >= low)
          and (value < high if high_open else value <= high))
    if not ok:
        interval = ("(" if low_open else "[") + f"{low:g}, {high:g}" + (")" if high_open else "]")
        raise ConfigError(field, f"must be a finite number in {interval}, got {value!r}")


def require_choice(config, field: str, choices) -> None:
    value = getattr(config, field)
    if value not in choices:
        raise ConfigError(field, f"must be one of {sorted(choices)}, got {value!r}")
