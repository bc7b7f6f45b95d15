"""The command line, generated from DreamBoothConfig and the adapter config dataclasses.

Precedence: defaults < ``--config run.json`` < flags given on the command line. A method flag
given for another method (``--n_frequency`` with ``--adapter lora``) is an error, not ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

from ..adapters import ConfigError
from .config import DreamBoothConfig, adapter_option_fields


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def argument_kwargs(hint: Any, f: dataclasses.Field) -> dict[str, Any]:
    """argparse keyword arguments for a dataclass field of type ``hint``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    help_text = f.metadata.get("help", "")
    if "choices" in f.metadata:  # choices known at run time (the method registry)
        return {"type": hint, "choices": f.metadata["choices"](), "help": help_text}
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction, "help": help_text}
    if typing.get_origin(hint) is typing.Literal:
        choices = typing.get_args(hint)
        return {"type": type(choices[0]), "choices": choices, "help": help_text}
    if typing.get_origin(hint) is list:
        return {"type": _split, "metavar": "A,B,...", "help": help_text + " (comma-separated)"}
    return {"type": hint, "help": help_text}


def add_adapter_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per method option over all methods (``--rank``, ``--n_frequency``, …), defaults
    suppressed so ``adapter_options_from`` sees only what was given."""
    group = parser.add_argument_group("adapter options (each applies to the methods named)")
    for flag, owners in adapter_option_fields().items():
        cls, f = owners[0]
        kw = argument_kwargs(typing.get_type_hints(cls)[f.name], f)
        kw["help"] += " [" + ", ".join(f"{c.method}: {fl.default}" for c, fl in owners) + "]"
        if "type" in kw and "choices" not in kw:
            kw.setdefault("metavar", flag.lstrip("-").upper())
        group.add_argument(flag, dest="adapter." + flag.lstrip("-"), default=argparse.SUPPRESS, **kw)


def adapter_options_from(given: dict[str, Any], method: str, options: dict | None = None) -> dict:
    """The ``adapter.*`` entries of parsed arguments as ``method``'s config options; a flag of
    another method is an error, not ignored."""
    options, fields = dict(options or {}), adapter_option_fields()
    for key, value in given.items():
        if not key.startswith("adapter."):
            continue
        flag = "--" + key.split(".", 1)[1]
        owner = next(((c, f) for c, f in fields[flag] if c.method == method), None)
        if owner is None:
            methods = ", ".join(c.method for c, _ in fields[flag])
            raise ConfigError(f"{flag} applies to --adapter {methods}, not {method}")
        options[owner[1].name] = value
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_dreambooth.py", argument_default=argparse.SUPPRESS,
        description="DreamBooth for SDXL with LoRA, LoRA-Dash, FourierFT or MoRA adapters.")
    parser.add_argument("--config", help="JSON file of options (a saved dreambooth_config.json works); "
                        "flags given on the command line override it")
    hints = typing.get_type_hints(DreamBoothConfig)
    for f in dataclasses.fields(DreamBoothConfig):
        if f.name != "adapter_options":
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kw = argument_kwargs(hints[f.name], f)
            kw["help"] = f"{kw['help']} (default: {default})"
            parser.add_argument("--" + f.name, **kw)
    add_adapter_arguments(parser)
    return parser


def parse_config(argv: list[str] | None = None) -> DreamBoothConfig:
    given = vars(build_parser().parse_args(argv))
    data: dict[str, Any] = {}
    if "config" in given:
        path = Path(given.pop("config"))
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"--config {path}: no such file") from None
        except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
            why = "is a folder" if isinstance(exc, IsADirectoryError) else "cannot be read as text"
            raise ConfigError(f"--config {path}: {why}; pass a JSON file of options") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--config {path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"--config {path}: expected a JSON object of options")
    # a method option in the JSON (``"rank": 8``) means what its flag means; flags still win
    options = {f"adapter.{k}": data.pop(k) for k in list(data) if f"--{k}" in adapter_option_fields()}
    data.update({k: v for k, v in given.items() if not k.startswith("adapter.")})
    method = data.get("adapter", "lora")
    data["adapter_options"] = adapter_options_from(
        given, method, adapter_options_from(options, method, data.get("adapter_options")))
    return DreamBoothConfig.from_dict(data, source="options")


def main(argv: list[str] | None = None) -> int:
    """``train_dreambooth.py`` and ``python -m dreampeft.dreambooth``: bad input is one ``error:``
    line and exit status 2, never a traceback."""
    from ..state import AdapterFileError
    from ..utils import quiet_libraries
    from .data import DreamBoothError
    from .stop import RunStopped
    from .train import train

    quiet_libraries()
    cfg = None
    try:
        cfg = parse_config(argv)
        result = train(cfg)
    except (ConfigError, DreamBoothError, AdapterFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, RunStopped) as exc:
        where = cfg.output_dir if cfg else "--output_dir"
        print(f"error: {exc or 'interrupted (Ctrl-C)'}; the checkpoints in {where} are complete: "
              "continue with --resume_from_checkpoint latest", file=sys.stderr)
        return 130 if isinstance(exc, KeyboardInterrupt) else 2
    if result is not None:  # the main process
        print(f"adapters saved in {result.output_dir}")
    return 0
