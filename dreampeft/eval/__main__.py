"""python -m dreampeft.eval --real DIR --generated DIR [--prompts FILE] [--out DIR]

Prompts for CLIP-T: ``--prompts FILE`` (one line per generated image, in file-name order), else
``NAME.txt`` beside each generated image, else CLIP-T is left out. Writes ``fidelity.json`` and
``fidelity.md`` into ``--out`` (default: the generated folder).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..dreambooth.data import DreamBoothError, scan_folder
from ..utils import quiet_libraries
from .metrics import DEFAULT_CLIP, DEFAULT_DINO, EvalError, FidelityScorer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dreampeft.eval", description=__doc__.split("\n")[0])
    parser.add_argument("--real", required=True, help="folder of real subject images")
    parser.add_argument("--generated", required=True, help="folder of generated images")
    parser.add_argument("--prompts", help="text file: one prompt per generated image, in name order")
    parser.add_argument("--dino_model", default=DEFAULT_DINO, help="DINO ViT hub id or folder")
    parser.add_argument("--clip_model", default=DEFAULT_CLIP, help="CLIP hub id or folder")
    parser.add_argument("--out", help="where fidelity.json/.md go (default: --generated)")
    args = parser.parse_args(argv)
    quiet_libraries()
    try:
        real = [e.image for e in scan_folder(args.real, "", "--real")]
        gen = scan_folder(args.generated, "", "--generated")
        prompts = [e.prompt for e in gen] if all(e.prompt for e in gen) else None
        if args.prompts:
            try:
                prompts = [p.strip() for p in Path(args.prompts).read_text().splitlines() if p.strip()]
            except (OSError, UnicodeDecodeError) as exc:
                raise EvalError(f"--prompts {args.prompts}: cannot read it ({type(exc).__name__}); "
                                "give a text file with one prompt per line") from None
        scores = FidelityScorer(args.dino_model, args.clip_model).score(real, [e.image for e in gen], prompts)
    except (DreamBoothError, EvalError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out or args.generated)
    out.mkdir(parents=True, exist_ok=True)
    scores.update(dino_model=args.dino_model, clip_model=args.clip_model)
    (out / "fidelity.json").write_text(json.dumps(scores, indent=1) + "\n")
    cols = [c for c in ("dino", "clip_i", "clip_t") if c in scores]
    table = ["| " + " | ".join(c.upper().replace("_", "-") for c in cols) + " | real | generated |",
             "|" + "---:|" * (len(cols) + 2),
             "| " + " | ".join(f"{scores[c]:.4f}" for c in cols) + f" | {scores['n_real']} | {scores['n_generated']} |"]
    (out / "fidelity.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
