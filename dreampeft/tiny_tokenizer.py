"""A small CLIP-style byte-level BPE tokenizer, learned deterministically from a prompt corpus.

The files it writes are bundled in ``assets/clip_tokenizer`` so that the tiny SDXL pipelines
need no download. Regenerate them with ``python -m dreampeft.tiny_tokenizer assets/clip_tokenizer``
(a test checks that the bundled files equal what this module produces).

Layout follows OpenAI CLIP's vocabulary: the 256 byte symbols, the same with the end-of-word
marker ``</w>``, one entry per merge, then ``<|startoftext|>`` and ``<|endoftext|>``.
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

# Words of DreamBooth-style prompts; each occurrence counts once towards the merge statistics.
CORPUS = """
a an the photo picture image of with on in at by near and sks dog cat person man woman boy girl
toy object backpack bag teddy bear vase clock candle sneaker shoe boot glasses sunglasses robot
red blue green yellow orange purple pink white black gray grey brown gold silver colorful
circle square triangle star heart ring cross diamond shape pattern striped dotted checkered
background floor table grass sand snow water beach mountain forest city street road room kitchen
small large big tiny huge corner top bottom left right center middle front side behind under
wearing sitting standing floating lying holding next to inside outside wet dirty shiny cube
high quality detailed realistic cartoon painting drawing sketch style render portrait closeup
jungle river bridge tower sky sunset night day rainbow fur hat santa chef police nurse outfit
purple sheep pillow book cup bowl car bike boat house tree flower fire ice rock stone wood metal
""".split()


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from bytes to printable unicode characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars, n = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


def learn_merges(words: list[str], n_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE: repeatedly merge the most frequent adjacent pair (ties: smallest pair)."""
    byte_map = bytes_to_unicode()
    counts = collections.Counter(words)
    seqs = {}
    for w, c in counts.items():
        symbols = [byte_map[b] for b in w.encode("utf-8")]
        symbols[-1] += "</w>"
        seqs[tuple(symbols)] = c
    merges = []
    for _ in range(n_merges):
        pairs = collections.Counter()
        for seq, c in seqs.items():
            for pair in zip(seq, seq[1:]):
                pairs[pair] += c
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = {}
        for seq, c in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + c
        seqs = merged
    return merges


def write_clip_tokenizer(out_dir: str | Path, n_merges: int = 400) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    byte_syms = list(bytes_to_unicode().values())
    merges = learn_merges(CORPUS, n_merges)
    tokens = byte_syms + [s + "</w>" for s in byte_syms] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n")
    lines = ["#version: 0.2 - dreampeft tiny CLIP BPE"] + [f"{a} {b}" for a, b in merges]
    (out / "merges.txt").write_text("\n".join(lines) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m dreampeft.tiny_tokenizer OUT_DIR")
    print(write_clip_tokenizer(sys.argv[1]))
