import open_clip
import torch

from clipfast.tokenizer import get_tokenizer

CAPTIONS = [
    "a photo of the number seven",
    "Handwritten 7!!",
    "café &amp; naïve résumé",
    "  lots   of\tspaces \n",
    "it's a dog's life, isn't it?",
    "x" * 300,
    "",
    "Ünïcödé 日本語 テスト 🙂",
    "CamelCase and UPPER and 12345 digits",
    # ASCII that ftfy changes: entities unescaped until none is left (no "<"), control characters removed
    "tom &amp;amp;amp; jerry",
    "tom &amp;amp; jerry <b>",
    "a\x00b c\x7fd e\x08f",
    "x\x0by x\x1cy x\x1fy",
    "hello\x1b[31mred\x1b[0m world",
    "form\x0cfeed and\r\nline breaks",
]


def test_same_ids_as_open_clip():
    ours = get_tokenizer()(CAPTIONS, context_length=77)
    ref = open_clip.get_tokenizer("ViT-B-16")(CAPTIONS)
    assert torch.equal(ours, ref)


def test_truncation_keeps_eot_last():
    tok = get_tokenizer()
    ids = tok(["one two three four five six seven eight nine ten"], context_length=6)[0]
    assert ids[0] == tok.sot_token_id and ids[-1] == tok.eot_token_id
    assert torch.equal(ids, open_clip.get_tokenizer("ViT-B-16")(["one two three four five six seven eight nine ten"],
                                                                  context_length=6)[0])


def test_encode_words_and_decode_roundtrip():
    tok = get_tokenizer()
    words = tok.encode_words("A red bicycle, leaning")
    assert [w for w, _ in words] == ["a", "red", "bicycle", ",", "leaning"]
    assert [i for _, ids in words for i in ids] == tok.encode("A red bicycle, leaning")
    assert tok.decode(tok.encode("a red bicycle")).strip() == "a red bicycle"


def test_same_ids_as_open_clip_on_random_ascii():
    """Every ASCII character, entities among words: the ASCII path that skips ftfy must give open_clip's ids."""
    import random

    rng = random.Random(0)
    pieces = [chr(i) for i in range(128)] + ["&amp;", "&amp;amp;", "&lt;", "<", " photo ", "&#39;", "\x1b[1m"]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 40))) for _ in range(300)]
    ours = get_tokenizer()(texts, context_length=77)
    ref = open_clip.get_tokenizer("ViT-B-16")(texts)
    bad = [t for t, a, b in zip(texts, ours, ref) if not torch.equal(a, b)]
    assert not bad, f"{len(bad)} of {len(texts)} differ, e.g. {bad[:3]!r}"


def test_special_tokens_written_in_a_caption_are_text_where_clipfast_trains():
    """open_clip maps `<end_of_text>` typed in a caption to the end token (specials=True keeps its ids); the captions
    clipfast trains and evaluates on (TextReducer) take it as text, so a caption holds one end token, its last: the
    packed text pools there, argmax pooling (open_clip's, and clipfast's padded path) at the first."""
    from clipfast.reduce import TextReducer

    tok = get_tokenizer()
    cap = "a <end_of_text> photo of a <start_of_text> dog"
    assert tok.encode(cap).count(tok.eot_token_id) == 1  # open_clip's ids, as test_same_ids_as_open_clip
    for strategy in ("truncate", "random", "block", "syntax"):
        ids = TextReducer(strategy, 77)(cap)
        assert ids.count(tok.eot_token_id) == 1 and ids[-1] == tok.eot_token_id, strategy
        assert ids.count(tok.sot_token_id) == 1 and ids[0] == tok.sot_token_id, strategy
    assert TextReducer("truncate", 77)("a photo of a dog") == [tok.sot_token_id, *tok.encode("a photo of a dog"),
                                                               tok.eot_token_id]  # ordinary captions: the same ids
