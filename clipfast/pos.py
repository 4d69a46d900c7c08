"""Part-of-speech classes for syntax-aware text reduction (CLIPA): 0 noun, 1 adjective, 2 verb, 3 the rest.

Offline, two sources, picked by `get_tagger("auto")`:

- `nltk`: NLTK's averaged-perceptron tagger (Penn tags NN* -> noun, JJ* -> adjective, VB* -> verb), used
  when nltk is importable *and* its tagger data is installed (`nltk.download("averaged_perceptron_tagger_eng")`);
  this is what CLIPA and open_clip's `syntax_mask_tokenize` use.
- `lexicon` (fallback, always there): the lemma table shipped inside the `lemminflect` wheel — for a word,
  `lemminflect.getAllLemmas(word)` gives the universal POS tags it can have — plus a closed-class word list
  and a few context rules to pick one tag for ambiguous words (below). No data download, deterministic.

Lexicon rules, per word (w, with neighbours p before and n after):
1. punctuation, digits, and closed-class words (determiners, pronouns, prepositions, conjunctions,
   auxiliaries and modals, number words, common adverbs) -> rest (number words: Penn's CD, rest in CLIPA too);
2. w's open-class tags (NOUN/PROPN, ADJ, VERB); none known to lemminflect -> noun if w is unknown to it
   (names, rare nouns), rest if it only knows w as another class (ADV, AUX, ...); one tag -> that one;
3. ambiguous w: verb after "to", a modal, an auxiliary or a subject pronoun ("they walk"); adjective when
   the next word can be a noun ("red dog"); noun after a determiner ("the number"); verb for an
   inflected verb form not ending in s ("dog running", "drawn"); else noun, then adjective, then verb.
"""
from __future__ import annotations

import logging
from functools import lru_cache

log = logging.getLogger("clipfast.pos")

NOUN, ADJ, VERB, REST = 0, 1, 2, 3

DETERMINERS = frozenset(
    "a an the this that these those my your his her its our their some any no every each either neither all both "
    "another such what which whose".split()
)
SUBJECTS = frozenset("i you he she it we they who".split())
AUXILIARIES = frozenset(
    "is are was were be been being am 's 're 'm do does did has have had having 've 'd 'll can could may might must "
    "shall should will would".split()
)
CLOSED = DETERMINERS | SUBJECTS | AUXILIARIES | frozenset(
    # pronouns
    "me him us them mine yours hers ours theirs myself yourself himself herself itself ourselves themselves whom "
    "someone something somebody anyone anything nobody nothing everyone everything one ones "
    # prepositions, particles, conjunctions
    "about above across after against along among around as at before behind below beneath beside between beyond "
    "by down during except for from in inside into like near of off on onto out outside over past per since "
    "through throughout till to toward towards under underneath until up upon via with within without "
    "and or but nor so yet if then than because while although though whether "
    # adverbs and other function words
    "not n't very too also just only even still there here where when why how again ever never always often "
    "more most less least much many few several lot lots "
    # number words
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand million "
    "first second third".split()
)
VERB_CUES = AUXILIARIES | SUBJECTS | {"to"}


@lru_cache(maxsize=1 << 18)
def _info(word: str) -> tuple[bool, frozenset, bool, bool, bool]:
    """(open-class word, its open-class tags, known to lemminflect, inflected verb form not ending in s, can be a
    noun), one cached look-up per word: the data loader calls this for every word of every caption."""
    if len(word) < 2 or not word.isalpha() or word in CLOSED:  # single letters ("s" of "1970s"): rest
        return False, frozenset(), False, False, False
    import lemminflect

    lemmas = lemminflect.getAllLemmas(word)
    tags = set()
    for upos in lemmas:
        if upos in ("NOUN", "PROPN"):
            tags.add(NOUN)
        elif upos == "ADJ":
            tags.add(ADJ)
        elif upos == "VERB":
            tags.add(VERB)
    inflected_verb = "VERB" in lemmas and word not in lemmas["VERB"] and not word.endswith("s")
    return True, frozenset(tags), bool(lemmas), inflected_verb, NOUN in tags or not lemmas


def lexicon_tags(words: list[str]) -> list[int]:
    """Class of each word (lower-case pieces of clipfast.tokenizer's pre-tokeniser) by the lexicon rules."""
    infos = [_info(w) for w in words]
    out = []
    for i, (is_open, tags, known, inflected_verb, _) in enumerate(infos):
        if not is_open:
            out.append(REST)
        elif not tags:
            out.append(REST if known else NOUN)
        elif len(tags) == 1:
            out.append(next(iter(tags)))
        else:
            p = words[i - 1] if i else None
            if VERB in tags and p in VERB_CUES:
                out.append(VERB)
            elif ADJ in tags and i + 1 < len(words) and infos[i + 1][4]:
                out.append(ADJ)
            elif p in DETERMINERS:
                out.append(NOUN if NOUN in tags else ADJ)
            elif VERB in tags and inflected_verb:
                out.append(VERB)
            else:
                out.append(min(tags))  # noun, then adjective, then verb
    return out


def _penn_class(tag: str) -> int:
    if tag.startswith("NN"):
        return NOUN
    if tag.startswith("JJ"):
        return ADJ
    if tag.startswith("VB"):
        return VERB
    return REST


def nltk_tagger():
    """NLTK's tagger as a class function, or None when nltk or its tagger data is not installed."""
    try:
        import nltk
    except ImportError:
        return None
    try:
        nltk.pos_tag(["a", "test"])
    except LookupError:
        return None

    def tags(words: list[str]) -> list[int]:
        return [_penn_class(t) for _, t in nltk.pos_tag(words)] if words else []

    return tags


@lru_cache(maxsize=4)
def get_tagger(name: str = "auto"):
    """words -> classes. "auto": NLTK when usable, else the lexicon; "nltk" fails if NLTK is not usable."""
    if name not in ("auto", "nltk", "lexicon"):
        raise ValueError(f"unknown part-of-speech source {name!r}; valid: auto, nltk, lexicon")
    if name in ("auto", "nltk"):
        tagger = nltk_tagger()
        if tagger is not None:
            log.info("syntax text reduction: part of speech from NLTK's tagger")
            return tagger
        if name == "nltk":
            raise RuntimeError("NLTK or its tagger data is not installed "
                               "(nltk.download('averaged_perceptron_tagger_eng'))")
    log.info("syntax text reduction: part of speech from the lemminflect lexicon (NLTK tagger not available)")
    return lexicon_tags
