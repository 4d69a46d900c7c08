"""Token reduction semantics: image keep indices (random / grid / block / resize) and text reducers."""
import math
import sys
import types

import pytest
import torch

from clipfast import pos
from clipfast.reduce import (
    TextReducer,
    block_shape,
    grid_cell,
    image_keep_indices,
    keep_count,
    num_kept,
)
from clipfast.tokenizer import get_tokenizer
from tests.conftest import DEVICE, requires_cuda

MASKS = ("random", "grid", "block")


def _keep(strategy, batch, grid, ratio, seed=0):
    gen = torch.Generator(device=DEVICE)
    gen.manual_seed(seed)
    return image_keep_indices(strategy, batch, grid, ratio, device=DEVICE, generator=gen)


# ---------------------------------------------------------------- image


@pytest.mark.parametrize("strategy", MASKS)
@pytest.mark.parametrize("grid", [2, 5, 7, 14])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.75, 0.9])
def test_keep_shape_dtype_sorted_unique_in_range(strategy, grid, ratio):
    keep = _keep(strategy, 64, grid, ratio)
    k = keep_count(strategy, grid, ratio)
    if k == grid * grid:
        assert keep is None
        return
    assert keep.shape == (64, k) and keep.dtype == torch.int64 and keep.device.type == torch.device(DEVICE).type
    assert bool((keep[:, 1:] > keep[:, :-1]).all()), "ascending and unique"
    assert int(keep.min()) >= 0 and int(keep.max()) < grid * grid


@pytest.mark.parametrize("n,ratio,k", [(196, 0.5, 98), (196, 0.75, 49), (196, 0.3, 137), (49, 0.5, 24), (16, 1.0, 1),
                                       (16, 0.0, 16), (9, 0.01, 9), (4, 0.99, 1)])
def test_num_kept(n, ratio, k):
    assert num_kept(n, ratio) == k


def test_random_exact_count_and_uniform():
    keep = _keep("random", 4000, 4, 0.75)  # K = 4 of 16
    assert keep.shape == (4000, 4)
    counts = torch.bincount(keep.flatten().cpu(), minlength=16).float()
    # each patch kept with probability 1/4: 1000 expected, binomial sd ~27; 12% is > 4 sd
    assert bool(((counts - 1000).abs() < 120).all()), counts


@pytest.mark.parametrize("grid,ratio,g,k", [(14, 0.75, 2, 49), (14, 8 / 9, 3, 25), (6, 0.75, 2, 9), (7, 0.75, 3, 9),
                                            (4, 0.75, 2, 4), (5, 1.0, 5, 1), (14, 0.5, 2, 49)])
def test_grid_cell_choice(grid, ratio, g, k):
    assert grid_cell(grid, ratio) == g and keep_count("grid", grid, ratio) == k


@pytest.mark.parametrize("grid,ratio", [(14, 0.75), (7, 0.75), (14, 8 / 9), (5, 0.75)])
def test_grid_one_patch_per_cell_same_offset(grid, ratio):
    g = grid_cell(grid, ratio)
    cells = math.ceil(grid / g)
    keep = _keep("grid", 200, grid, ratio).cpu()
    rows, cols = keep // grid, keep % grid
    cell_id = (rows // g) * cells + cols // g
    assert bool((cell_id == torch.arange(cells * cells)).all()), "exactly one patch in each cell, cells in order"
    full = (rows // g < grid // g) & (cols // g < grid // g)  # cells not cut by the grid's edge
    for b in range(keep.shape[0]):
        assert len(set((rows[b][full[b]] % g).tolist())) == 1 and len(set((cols[b][full[b]] % g).tolist())) == 1
    offsets = {(int(rows[b, 0]), int(cols[b, 0])) for b in range(keep.shape[0])}
    assert offsets == {(dy, dx) for dy in range(g) for dx in range(g)}, "every offset is drawn"


@pytest.mark.parametrize("grid,ratio,shape", [(14, 0.75, (7, 7)), (14, 0.5, (10, 10)), (7, 0.5, (5, 5)),
                                             (4, 0.75, (2, 2)), (4, 1.0, (1, 1)), (6, 0.3, (5, 5))])
def test_block_shape(grid, ratio, shape):
    assert block_shape(grid, ratio) == shape and keep_count("block", grid, ratio) == shape[0] * shape[1]


@pytest.mark.parametrize("grid,ratio", [(14, 0.75), (7, 0.5), (5, 0.6)])
def test_block_is_one_contiguous_rectangle(grid, ratio):
    h, w = block_shape(grid, ratio)
    keep = _keep("block", 1500, grid, ratio).cpu()
    corners = set()
    for b in range(keep.shape[0]):
        rows, cols = keep[b] // grid, keep[b] % grid
        y0, x0 = int(rows.min()), int(cols.min())
        expect = [(y0 + i) * grid + x0 + j for i in range(h) for j in range(w)]
        assert keep[b].tolist() == expect
        corners.add((y0, x0))
    assert corners == {(y, x) for y in range(grid - h + 1) for x in range(grid - w + 1)}, "every place is drawn"


@pytest.mark.parametrize("strategy", MASKS)
def test_keep_one(strategy):
    keep = _keep(strategy, 50, 5, 1.0)
    assert keep.shape == (50, 1)
    assert len(set(keep.flatten().tolist())) > 1, "the single kept patch moves between images"


@pytest.mark.parametrize("strategy", MASKS + ("resize",))
def test_keep_all_is_none(strategy):
    assert _keep(strategy, 4, 7, 0.0) is None
    if strategy != "resize":
        assert _keep(strategy, 4, 3, 0.01) is None  # K = round(9 * 0.99) = 9 = N


def test_invalid_settings():
    with pytest.raises(ValueError, match="unknown image reduction"):
        _keep("checkerboard", 2, 4, 0.5)
    with pytest.raises(ValueError, match="mask_ratio"):
        _keep("random", 2, 4, 1.5)
    with pytest.raises(ValueError, match="resize"):
        _keep("resize", 2, 4, 0.5)


@pytest.mark.parametrize("strategy", MASKS)
def test_image_deterministic_for_a_seed(strategy):
    a, b, c = _keep(strategy, 16, 14, 0.75, seed=1), _keep(strategy, 16, 14, 0.75, seed=1), _keep(strategy, 16, 14,
                                                                                                  0.75, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


@requires_cuda
@pytest.mark.parametrize("strategy", MASKS)
def test_no_host_device_sync(strategy):
    gen = torch.Generator(device="cuda")
    gen.manual_seed(0)
    image_keep_indices(strategy, 8, 14, 0.75, device="cuda", generator=gen)  # warm-up (lazy init may sync)
    torch.cuda.set_sync_debug_mode("error")
    try:
        keep = image_keep_indices(strategy, 256, 14, 0.75, device="cuda", generator=gen)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert keep.is_cuda


# ---------------------------------------------------------------- text

TOK = get_tokenizer()
LONG = "a red dog running on the green grass next to a small wooden house under a cloudy sky at noon"


def _words(ids):
    return TOK.decode(ids).split()


def _is_subsequence(sub, seq):
    it = iter(seq)
    return all(x in it for x in sub)


@pytest.mark.parametrize("strategy", ["truncate", "random", "block", "syntax"])
@pytest.mark.parametrize("length", [2, 3, 8, 16])
def test_text_counts_ends_and_order(strategy, length):
    ids = TOK.encode(LONG)
    out = TextReducer(strategy, length, seed=3)(LONG)
    assert out[0] == TOK.sot_token_id and out[-1] == TOK.eot_token_id
    kept = out[1:-1]
    assert len(kept) == min(len(ids), length - 2)
    assert _is_subsequence(kept, ids), "kept tokens appear in caption order"
    if strategy == "truncate":
        assert kept == ids[: length - 2]
    if strategy == "block" and kept:
        starts = [i for i in range(len(ids) - len(kept) + 1) if ids[i : i + len(kept)] == kept]
        assert starts, "block keeps one contiguous span"


@pytest.mark.parametrize("strategy", ["truncate", "random", "block", "syntax"])
def test_text_short_and_empty_captions(strategy):
    r = TextReducer(strategy, 16)
    assert r("a dog") == [TOK.sot_token_id, *TOK.encode("a dog"), TOK.eot_token_id]
    assert r("") == [TOK.sot_token_id, TOK.eot_token_id]
    assert r("   ") == [TOK.sot_token_id, TOK.eot_token_id]


def test_text_invalid():
    with pytest.raises(ValueError, match="at least 2"):
        TextReducer("truncate", 1)
    with pytest.raises(ValueError, match="unknown text reduction"):
        TextReducer("nouns", 8)


@pytest.mark.parametrize("strategy", ["random", "block", "syntax"])
def test_text_deterministic_for_a_seed(strategy):
    caps = [LONG, LONG[::-1], "two dogs playing in the snow near a frozen lake", LONG]
    a = [TextReducer(strategy, 6, seed=1)(c) for c in caps]
    b = [TextReducer(strategy, 6, seed=1)(c) for c in caps]
    assert a == b
    if strategy != "syntax":
        many = {tuple(TextReducer(strategy, 6, seed=s)(LONG)) for s in range(20)}
        assert len(many) > 5, "the seed changes the draw"


def test_text_random_is_a_spread_subset():
    r = TextReducer("random", 5, seed=0)  # 3 of the caption's tokens
    ids = TOK.encode(LONG)
    hits = torch.zeros(len(ids))
    for _ in range(2000):
        kept = r(LONG)[1:-1]
        pos_ = [ids.index(t) for t in kept if ids.count(t) == 1]
        hits[pos_] += 1
    seen = hits[[i for i, t in enumerate(ids) if ids.count(t) == 1]]
    p = 3 / len(ids)
    assert bool(((seen / 2000 - p).abs() < 0.05).all()), seen / 2000


SYNTAX = [  # caption, length, expected words (lexicon tagger)
    ("a red dog running on the green grass", 4, "dog grass"),
    ("a red dog running on the green grass", 6, "red dog green grass"),
    ("a red dog running on the green grass", 7, "red dog running green grass"),
    ("a red dog running on the green grass", 8, "a red dog running green grass"),
    ("a man riding a horse on the beach at sunset", 6, "man horse beach sunset"),
    ("a man riding a horse on the beach at sunset", 7, "man riding horse beach sunset"),
    ("a white cat sitting on a blue sofa", 5, "white cat sofa"),
    ("a white cat sitting on a blue sofa", 7, "white cat sitting blue sofa"),
    ("a white cat sitting on a blue sofa", 6, "white cat blue sofa"),
    ("they walk to the old church", 4, "old church"),
]


@pytest.mark.parametrize("caption,length,expect", SYNTAX)
def test_syntax_keeps_nouns_then_adjectives_then_verbs(caption, length, expect):
    out = TextReducer("syntax", length, tagger=pos.lexicon_tags)(caption)
    got = _words(out[1:-1])
    assert sorted(got) == sorted(expect.split()) and _is_subsequence(got, caption.split())


def test_syntax_keeps_a_word_tokens_together():
    # "hippopotamus" is 3 BPE tokens; "dog" 1
    cap = "a hippopotamus and a dog"
    r = TextReducer("syntax", 2 + 4, tagger=pos.lexicon_tags)
    assert _words(r(cap)[1:-1]) == ["hippopotamus", "dog"]
    # budget 2: the 3-token noun does not fit and is passed over; whole words come first ("dog", then "a")
    assert _words(TextReducer("syntax", 2 + 2, tagger=pos.lexicon_tags)(cap)[1:-1]) == ["a", "dog"]
    # no whole word left to take: the budget left goes to the first tokens of the passed-over noun
    kept = TextReducer("syntax", 2 + 2, tagger=pos.lexicon_tags)("hippopotamus dog")[1:-1]
    assert kept == [TOK.encode("hippopotamus")[0], *TOK.encode("dog")]


def test_lexicon_tags_known_sentences():
    N, A, V, R = pos.NOUN, pos.ADJ, pos.VERB, pos.REST
    cases = {
        "a red dog running on the green grass": [R, A, N, V, R, R, A, N],
        "two dogs playing in the snow": [R, N, V, R, R, N],
        "the number seven drawn with a pen": [R, N, R, V, R, R, N],
        "they walk to the old church": [R, V, R, R, A, N],
        "a photo of zyxqvorp , 1970s": [R, N, R, N, R, R, R, R, R, R],
    }
    for sentence, tags in cases.items():
        words = [w for w, _ in TOK.encode_words(sentence)]
        assert pos.lexicon_tags(words) == tags, (sentence, words)


def test_nltk_used_when_installed_and_import_guarded(monkeypatch):
    fake = types.ModuleType("nltk")
    table = {"dog": "NN", "red": "JJ", "runs": "VBZ", "fast": "RB"}
    fake.pos_tag = lambda words: [(w, table.get(w, "DT")) for w in words]
    monkeypatch.setitem(sys.modules, "nltk", fake)
    pos.get_tagger.cache_clear()
    try:
        tagger = pos.get_tagger("auto")
        assert tagger(["the", "red", "dog", "runs", "fast"]) == [pos.REST, pos.ADJ, pos.NOUN, pos.VERB, pos.REST]

        def missing(words):
            raise LookupError("Resource averaged_perceptron_tagger_eng not found")

        fake.pos_tag = missing  # nltk installed, tagger data not: fall back to the lexicon
        pos.get_tagger.cache_clear()
        assert pos.get_tagger("auto") is pos.lexicon_tags
        with pytest.raises(RuntimeError, match="tagger data"):
            pos.get_tagger("nltk")
        monkeypatch.setitem(sys.modules, "nltk", None)  # not installed at all: import fails
        pos.get_tagger.cache_clear()
        assert pos.get_tagger("auto") is pos.lexicon_tags
    finally:
        pos.get_tagger.cache_clear()
