"""Generator for the tiny CLIP tokenizer files in ``tiny_configs/tokenizer/``.

The real CLIP tokenizer is a byte-level BPE over 49408 tokens; the tiny one keeps the same
scheme and file format with a much smaller vocabulary, so ``CLIPTokenizer.from_pretrained``
loads it offline and any ASCII (indeed any UTF-8) prompt encodes without unknown tokens:

* the 256 byte symbols of GPT-2/CLIP's byte-to-unicode table, then the same with ``</w>``
  (end of word), in CLIP's order, so ``"!"`` is token 0 as in the real vocabulary;
* merges learned by a tiny deterministic BPE trainer on a fixed list of caption words, so
  common words are single tokens and prompts stay short;
* ``<|startoftext|>`` and ``<|endoftext|>`` as the last two ids, as in the real vocabulary.

Run ``python -m para_trainer.models.tiny_tokenizer`` to regenerate the committed files.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 77

# Words the BPE merges are learned from: typical DreamBooth / fine-tuning captions.
CAPTION_WORDS = """
a an the of in on at with and or by for from to is photo photograph picture image painting
drawing sketch illustration render portrait closeup close up style art artwork digital oil
watercolor sks dog cat person man woman girl boy face toy car house tree flower bird sitting
standing lying running red green blue yellow white black orange purple pink brown gray
background foreground beach forest city street room table grass snow water sky mountain
high quality detailed sharp blurry best worst low resolution lighting light dark sunset
""".split()

TOKENIZER_DIR = Path(__file__).resolve().parent / "tiny_configs" / "tokenizer"


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode character table (same order)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    byte_values, code_points = printable[:], printable[:]
    shift = 0
    for byte in range(256):
        if byte not in printable:
            byte_values.append(byte)
            code_points.append(256 + shift)
            shift += 1
    return dict(zip(byte_values, map(chr, code_points)))


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Plain BPE training until every word is one token; ties broken by the pair's text."""
    byte_symbol = bytes_to_unicode()
    segmented = []
    for word in dict.fromkeys(words):
        symbols = [byte_symbol[b] for b in word.encode("utf-8")]
        symbols[-1] += END_OF_WORD
        segmented.append(symbols)
    merges = []
    while True:
        pair_counts = Counter(pair for symbols in segmented for pair in zip(symbols, symbols[1:]))
        if not pair_counts:
            return merges
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        merges.append(best)
        for symbols in segmented:
            i = 0
            while i < len(symbols) - 1:
                if (symbols[i], symbols[i + 1]) == best:
                    symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
                i += 1


def build_vocab_and_merges(words: list[str] = CAPTION_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    byte_symbols = list(bytes_to_unicode().values())
    merges = learn_merges(words)
    tokens = byte_symbols + [s + END_OF_WORD for s in byte_symbols]
    tokens += ["".join(pair) for pair in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}, merges


def tokenizer_files(words: list[str] = CAPTION_WORDS) -> dict[str, str]:
    """File name -> exact file text, for ``CLIPTokenizer.from_pretrained``; ``words`` become single tokens."""
    vocab, merges = build_vocab_and_merges(words)
    special_tokens = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    tokenizer_config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        **special_tokens,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }

    def to_json(obj) -> str:
        return json.dumps(obj, ensure_ascii=False, indent=2) + "\n"

    return {
        "vocab.json": to_json(vocab),
        # Header line as in the real CLIP merges.txt; both transformers loaders skip it.
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "tokenizer_config.json": to_json(tokenizer_config),
        "special_tokens_map.json": to_json(special_tokens),
    }


def write_tokenizer_files(directory=TOKENIZER_DIR, words: list[str] = CAPTION_WORDS) -> Path:
    """Write the tokenizer files into ``directory`` (byte-identical on every run); return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in tokenizer_files(words).items():
        (directory / name).write_bytes(text.encode("utf-8"))
    return directory


if __name__ == "__main__":
    print(write_tokenizer_files())
