"""Qwen(-VL)'s tiktoken tokenizer (``qwen.tiktoken`` + remote code) -> a ``tokenizers`` ``tokenizer.json``.

Qwen's tokenizer is ``tiktoken.Encoding(pat_str=PAT, mergeable_ranks=ranks, special_tokens=...)``
after NFC normalisation, every special token allowed in text. The equivalent byte-level BPE:

- vocabulary: every rank's bytes through GPT-2's byte -> unicode map, id = rank;
- merges: for every token, each split into two tokens that are themselves in the vocabulary, with
  the token's rank as its priority. tiktoken merges the adjacent pair whose concatenation has the
  lowest rank (leftmost on ties); BPE training makes a token's rank exceed its parts', so merging
  by that priority reproduces tiktoken's choices. ``ignore_merges`` takes a whole pre-token found in
  the vocabulary directly, as tiktoken does;
- pre-tokenizer: Qwen's regex (``Split`` isolated) then byte-level (no prefix space, no GPT-2 regex);
- normalizer NFC; special tokens as added tokens at their exact ids, matched before normalisation.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

# Qwen-1 / Qwen-VL's pre-tokenizer (tokenization_qwen.py ``PAT_STR``): single digits, unlike GPT-4's \p{N}{1,3}
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# Qwen-VL's tokenizer: these ids start right after the ranks (151643 for qwen.tiktoken): <img> is 151857
QWEN_VL_SPECIAL_TOKENS = (
    (ENDOFTEXT, IM_START, IM_END) + tuple(f"<|extra_{i}|>" for i in range(205))
    + ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>")
)


def load_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """A tiktoken BPE file (one ``base64(token) rank`` per line), checked to hold ranks 0..n-1 once each."""
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: not a tiktoken 'base64 rank' line ({e})") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not 0..{len(ranks) - 1} each exactly once")
    if any(bytes([b]) not in ranks for b in range(256)):
        raise ValueError(f"{path}: not a byte-level BPE (some single bytes have no rank)")
    return ranks


def qwen_vl_special_tokens(num_ranks: int) -> dict[str, int]:
    """Qwen-VL's special tokens and their ids: ``<|endoftext|>`` first, right after the ranks."""
    return {token: num_ranks + i for i, token in enumerate(QWEN_VL_SPECIAL_TOKENS)}


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ``ByteLevel`` uses)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def bpe_vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The byte-level vocabulary (id = rank) and merges ordered by the merged token's rank."""
    table = _byte_to_unicode()

    def text(token: bytes) -> str:
        return "".join(table[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            lr, rr = ranks.get(left), ranks.get(right)
            if lr is not None and rr is not None:
                merges.append((rank, lr, rr, left, right))
    merges.sort()
    return vocab, [(text(left), text(right)) for _, _, _, left, right in merges]


def tiktoken_to_tokenizer(ranks: dict[bytes, int], special_tokens: dict[str, int], pattern: str = QWEN_PATTERN):
    """A ``tokenizers.Tokenizer`` that encodes and decodes as ``tiktoken.Encoding(pattern, ranks,
    special_tokens)`` with every special token allowed, after NFC (Qwen's tokenizer normalises first)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab, merges = bpe_vocab_and_merges(ranks)
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    expected = len(ranks)
    for token, token_id in sorted(special_tokens.items(), key=lambda kv: kv[1]):
        if token_id != expected:
            raise ValueError(f"special token {token!r} has id {token_id}; ids must follow the {len(ranks)} "
                             f"ranks contiguously (next free id {expected})")
        tok.add_special_tokens([AddedToken(token, special=True, normalized=False)])
        if tok.token_to_id(token) != token_id:
            raise AssertionError(f"{token!r} landed on {tok.token_to_id(token)}, not {token_id}")
        expected += 1
    return tok


def write_qwen_vl_tokenizer(ranks: dict[bytes, int] | str | os.PathLike, out_dir: str | os.PathLike, *,
                            chat_template: str, model_max_length: int = 8192) -> dict[str, int]:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` (ChatML, eos ``<|im_end|>``, pad
    ``<|endoftext|>``) for Qwen-VL's ranks (or its ``qwen.tiktoken``); returns the special tokens' ids."""
    from transformers import PreTrainedTokenizerFast

    if not isinstance(ranks, dict):
        ranks = load_tiktoken_ranks(ranks)
    special = qwen_vl_special_tokens(len(ranks))
    tok = tiktoken_to_tokenizer(ranks, special)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=ENDOFTEXT,
                                   chat_template=chat_template, model_max_length=model_max_length,
                                   clean_up_tokenization_spaces=False)
    out = Path(out_dir)
    fast.save_pretrained(out)
    config_path = out / "tokenizer_config.json"
    cfg = json.loads(config_path.read_text())
    cfg["chat_template"] = chat_template  # also where older transformers read it
    cfg.pop("auto_map", None)
    config_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    return special
