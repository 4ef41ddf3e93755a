"""Command-line flags from a frozen config dataclass: one `--field-name` per field."""
import argparse
import dataclasses
import typing


def add_config_flags(parser: argparse.ArgumentParser, defaults) -> None:
    """Adds a flag per field of the dataclass instance `defaults`, defaulting to its value;
    a field's `metadata["choices"]` limits its values."""
    for field in dataclasses.fields(defaults):
        value = getattr(defaults, field.name)
        flag = "--" + field.name.replace("_", "-")
        if typing.get_origin(field.type) is tuple:
            item_type = typing.get_args(field.type)[0]
            parser.add_argument(flag, type=item_type, nargs="*", default=value,
                                help=f"default: {' '.join(map(str, value)) or '(none)'}")
        elif field.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(flag, type=field.type, default=value, help=f"default: {value}",
                                choices=field.metadata.get("choices"))


def config_from_args(cls, args: argparse.Namespace):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
