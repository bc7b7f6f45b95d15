"""``python -m dreampeft.export SRC --to diffusers|kohya|kohya_diff|peft|merged --out DIR``: arguments are
checked before any model loads, and every failure is one ``error:`` line with exit status 2."""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

from .export import _check_empty, _load_components, export_diffusers, export_peft, save_merged
from .export_kohya import export_kohya, export_kohya_diff


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} keeps nothing; use a rank of 1 or more (e.g. 32)")
    return value


def _energy(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        why = "keeps nothing" if value == 0 else "is outside (0, 1]"
        raise argparse.ArgumentTypeError(f"{value} {why}; give the share of each layer's squared singular "
                                         "values to keep, in (0, 1], e.g. 0.9")
    return value


def _check_out(out: Path) -> None:
    """Fail before any model loads when ``--out`` cannot take the export."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot write there ({exc.strerror}); choose a folder you can write to") from None


def _check_rank(rank: int | None, manifest: dict) -> None:
    # a layer's full rank: min(out, in·kh·kw) (a convolution's ΔW is a matrix over its flattened kernel)
    sides = [min(t["shape"][0], math.prod(t["shape"][1:])) for c in manifest["components"].values()
             for t in c["targets"].values()]
    if rank is not None and rank > max(sides):
        raise ValueError(f"--rank {rank} is above every layer's full rank (at most {max(sides)}); "
                         f"use {max(sides)} or less")


def _write(args, pipe, models: dict, base: str) -> None:
    rank = args.rank if args.rank or args.energy else 32
    if args.to == "merged":
        print(save_merged(pipe, models, args.out))
    elif args.to == "kohya":
        print(export_kohya(models, args.out, rank, args.energy))
    elif args.to == "kohya_diff":
        path = export_kohya_diff(models, args.out)
        print(f"{path} ({path.stat().st_size / 2**20:.1f} MiB, whole fp16 weight differences: exact)")
    elif args.to == "peft":
        print("\n".join(map(str, export_peft(models, args.out, base))))
    else:
        report = export_diffusers(models, args.out, rank, args.energy)
        for comp, r in report["components"].items():
            print(f"{comp}: {r['method']} rank {r['ranks']} relative error {r['overall_rel_error']:.4f}")


def main(argv: list[str] | None = None) -> int:
    from .state import AdapterFileError, read_manifest
    from .utils import model_load_error

    parser = argparse.ArgumentParser(prog="python -m dreampeft.export",
                                     description="Convert a dreampeft run or native adapter file.")
    parser.add_argument("src", help="a run's output folder or a dreampeft_adapter.safetensors file")
    parser.add_argument("--to", required=True, choices=["diffusers", "kohya", "kohya_diff", "peft", "merged"])
    parser.add_argument("--base", help="base model (hub id or folder); default: the one it was trained on")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--rank", type=_positive_int, help="SVD rank for FourierFT/MoRA (default 32)")
    group.add_argument("--energy", type=_energy, help="SVD energy threshold in (0, 1] instead of --rank")
    args = parser.parse_args(argv)
    base = args.base
    try:
        manifest = read_manifest(args.src)[1]  # check the source and --out before loading any model
        base = args.base or manifest.get("base_model")
        if not base:
            raise ValueError(f"{args.src} does not name its base model; pass --base")
        _check_rank(args.rank, manifest)
        if args.to == "merged":
            _check_empty(args.out)
        else:
            _check_out(args.out)
        try:
            pipe, models = _load_components(base, args.src)
        except AdapterFileError:
            raise
        except (OSError, ValueError) as exc:  # from_pretrained: no such folder, the hub unreachable
            raise ValueError(model_load_error("--base", base, exc)) from None
        try:
            _write(args, pipe, models, base)
        except OSError as exc:  # a full disk, a folder that turned read-only
            raise ValueError(f"--out {args.out}: {exc.strerror or exc}; free space or choose another "
                             "folder (files are written whole or not at all)") from None
    except (AdapterFileError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
