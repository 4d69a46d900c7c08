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
