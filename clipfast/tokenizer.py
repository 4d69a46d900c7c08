"""CLIP byte-level BPE, the same ids as open_clip's SimpleTokenizer, built for the data loader's hot path.

The vocabulary is open_clip's `bpe_simple_vocab_16e6.txt.gz` (read from the installed package). Faster
than open_clip's tokenizer because: each word's id list is cached (not its merged string, which must be
split and looked up again), ftfy runs only where it can change something (non-ASCII text, an '&' it may unescape,
a control character it removes), and merges use an integer-rank loop without `min()` over a freshly built pair set
per step.
"""
from __future__ import annotations

import gzip
import html
import importlib.resources
import re as std_re
from functools import lru_cache

import regex as re

SOT, EOT = "<start_of_text>", "<end_of_text>"
# what ftfy.fix_text can change in ASCII text, beyond line breaks (whitespace here either way): HTML entities (where
# the text has no "<" it unescapes them until none is left, so "&amp;amp;amp;" ends as "&", where open_clip's own two
# html.unescape alone leave "&amp;") and the control characters it removes (ftfy.chardata.CONTROL_CHARS below 128:
# ESC, so terminal escapes, NUL, DEL, and \x0b, \x1c-\x1f, which str.split() would take as spaces). ASCII text
# without any of them skips ftfy (~20 us a caption)
_FTFY_ASCII = std_re.compile(r"[&\x00-\x08\x0b\x0e-\x1f\x7f]")


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def default_vocab_path() -> str:
    return str(importlib.resources.files("open_clip") / "bpe_simple_vocab_16e6.txt.gz")


class Tokenizer:
    def __init__(self, bpe_path: str | None = None):
        merges = gzip.open(bpe_path or default_vocab_path()).read().decode("utf-8").split("\n")
        merges = [tuple(m.split()) for m in merges[1 : 49152 - 256 - 2 + 1]]
        self.byte_encoder = _bytes_to_unicode()
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {t: i for i, t in enumerate(vocab)}
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.vocab_size = len(vocab)
        self.sot_token_id, self.eot_token_id = self.encoder[SOT], self.encoder[EOT]
        words = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
        self.pat = re.compile(rf"{SOT}|{EOT}|{words}", re.IGNORECASE)  # open_clip's: the special tokens as text too
        self.pat_text = re.compile(words, re.IGNORECASE)  # (specials=False) "<end_of_text>" in a caption is text
        self._word_ids = lru_cache(maxsize=1 << 18)(self._word_ids_uncached)

    @staticmethod
    def clean(text: str) -> str:
        if not text.isascii() or _FTFY_ASCII.search(text):
            import ftfy

            text = ftfy.fix_text(text)
        text = html.unescape(html.unescape(text))
        return " ".join(text.split()).lower()

    def _bpe(self, token: str) -> list[str]:
        word = list(token[:-1]) + [token[-1] + "</w>"]
        ranks = self.bpe_ranks
        while len(word) > 1:
            best, best_rank = -1, None
            for i in range(len(word) - 1):
                r = ranks.get((word[i], word[i + 1]))
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best < 0:
                break
            first, second = word[best], word[best + 1]
            merged, i = [], 0
            while i < len(word):  # merge every occurrence of the best pair, left to right
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def _word_ids_uncached(self, token: str) -> tuple[int, ...]:
        if token in (SOT, EOT):
            return (self.encoder[token],)
        enc = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
        return tuple(self.encoder[t] for t in self._bpe(enc))

    def encode(self, text: str, specials: bool = True) -> list[int]:
        """BPE ids of `text`, without start/end tokens. specials=True (open_clip's ids): `<start_of_text>` and
        `<end_of_text>` written in the text become those tokens; False (clipfast's training and evaluation captions):
        plain text, so that a caption holds one end token, its last (which packed text pools at, and argmax pooling
        finds first)."""
        ids: list[int] = []
        for token in (self.pat if specials else self.pat_text).findall(self.clean(text)):
            ids.extend(self._word_ids(token))
        return ids

    def encode_words(self, text: str, specials: bool = True) -> list[tuple[str, tuple[int, ...]]]:
        """(word, its BPE ids) for each pre-tokenised piece: what syntax-aware text reduction needs."""
        return [(w, self._word_ids(w)) for w in (self.pat if specials else self.pat_text).findall(self.clean(text))]

    def decode(self, ids) -> str:
        text = "".join(self.decoder[int(i)] for i in ids)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(self, texts: list[str], context_length: int = 77):
        """open_clip-compatible padded batch (B, context_length) int64, truncated with EOT kept last."""
        import torch

        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [self.sot_token_id] + self.encode(t) + [self.eot_token_id]
            if len(ids) > context_length:
                ids = ids[:context_length]
                ids[-1] = self.eot_token_id
            out[i, : len(ids)] = torch.tensor(ids)
        return out


@lru_cache(maxsize=1)
def get_tokenizer() -> Tokenizer:
    return Tokenizer()
