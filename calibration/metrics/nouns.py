"""Noun extraction for AQ-MAP: one head noun per noun phrase of the prompt.

``spacy`` follows the official AQ-MAP (Q-Refine / Q-Sched ``src/metrics/aqmap.py``) recipe: split the prompt at
the starts of spaCy's noun chunks (one part when there are fewer than two chunks) and keep, per part, the last
NOUN/PROPN token that is not in NLTK's English stop-word list (function words only, compared case-sensitively as
the official code does) or punctuation ('' when there is none). spaCy's own, much longer stop list is not used: it
drops real nouns ("front", "side", "top", "bottom", "name"). It needs ``spacy`` and the ``en_core_web_sm`` package
installed by the user (nothing is downloaded; NLTK is not needed, its list is below).

``rules`` is our offline fallback that needs nothing: English noun phrases are head-final, so the prompt is
cut at function words (articles, prepositions, conjunctions, pronouns, auxiliaries), punctuation and verb
forms (-ing/-ed words not preceded by an article), and the last word of each remaining run is taken as its
head noun. Words are Unicode letter runs ("café", "Zürich", "東京"). It is an approximation of the tagger
(adjective-final runs such as "is fluffy" give "fluffy").

``auto`` uses spacy when ``en_core_web_sm`` is installed, else rules.
"""

from __future__ import annotations

import importlib.util
import re
from functools import lru_cache

FUNCTION_WORDS = frozenset("""
a an the this that these those some any each every no all both either neither another such what which whose
whom who whoever whatever my your his her its our their mine yours hers ours theirs i me you he him she it we
us they them myself yourself himself herself itself ourselves themselves one ones
of in on at by for with without within into onto upon from to toward towards over under above below beneath
between among through across along around behind beyond near beside besides against about after before
during since until till via per like unlike inside outside off out up down than as next
and or but nor so yet if then else while when where whereas because although though unless whether
is are was were be been being am do does did doing done have has had having will would shall should can
could may might must not very too also just only really quite rather almost more most less least much many
few several there here how why
""".split())
#: NLTK's English stop-word list (``nltk.corpus.stopwords.words("english")``, 179 words), which the official AQ-MAP
#: filters with: pronouns, determiners, prepositions, conjunctions, auxiliaries and contraction pieces only.
NLTK_STOPWORDS = frozenset("""
i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves he him his
himself she she's her hers herself it it's its itself they them their theirs themselves what which who whom this
that that'll these those am is are was were be been being have has had having do does did doing a an the and but
if or because as until while of at by for with about against between into through during before after above below
to from up down in out on off over under again further then once here there when where why how all any both each
few more most other some such no nor not only own same so than too very s t can will just don don't should
should've now d ll m o re ve y ain aren aren't couldn couldn't didn didn't doesn doesn't hadn hadn't hasn hasn't
haven haven't isn isn't ma mightn mightn't mustn mustn't needn needn't shan shan't shouldn shouldn't wasn wasn't
weren weren't won won't wouldn wouldn't
""".split())
ARTICLES = frozenset("a an the this that these those my your his her its our their some any each every".split())
WORD = re.compile(r"[^\W\d_][\w'\-]*|[^\w\s]|_|\d+")  # a word starts with a letter of any script
TITLE_DOT = re.compile(r"\b(Mr|Mrs|Ms|Dr|St|Prof|Jr|Sr)\.")  # "Mr. Beans" is one phrase


def rule_nouns(prompt: str) -> list[str]:
    heads, run, prev = [], [], ""
    for tok in WORD.findall(TITLE_DOT.sub(r"\1", prompt)):
        low = tok.lower()
        is_word = tok[0].isalpha()
        verb_like = low.endswith(("ing", "ed")) and len(low) > 4 and prev not in ARTICLES
        if not is_word or low in FUNCTION_WORDS or verb_like or low.endswith("ly"):
            if run:
                heads.append(run[-1])
            run = []
        else:
            run.append(tok)
        prev = low if is_word else ""
    if run:
        heads.append(run[-1])
    return heads or [""]


@lru_cache(maxsize=1)
def _spacy():
    import spacy

    return spacy.load("en_core_web_sm")


def spacy_nouns(prompt: str) -> list[str]:
    doc = _spacy()(prompt)
    starts = [c.start for c in doc.noun_chunks]
    bounds = [0, len(doc)] if len(starts) < 2 else [0, *starts[1:], len(doc)]
    nouns = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        cand = [t.text for t in doc[lo:hi]
                if t.pos_ in ("NOUN", "PROPN") and t.text not in NLTK_STOPWORDS and not t.is_punct]
        nouns.append(cand[-1] if cand else "")
    return nouns


@lru_cache(maxsize=4096)
def extract_nouns(prompt: str, method: str = "auto") -> tuple[str, ...]:
    """Head nouns of ``prompt`` (cached: calibration scores the same prompts many times)."""
    return tuple(_extract(prompt, method))


def _extract(prompt: str, method: str) -> list[str]:
    if method == "auto":
        method = "spacy" if importlib.util.find_spec("en_core_web_sm") is not None else "rules"
    if method == "rules":
        return rule_nouns(prompt)
    if method == "spacy":
        return spacy_nouns(prompt)
    raise ValueError(f"noun extractor must be 'auto', 'spacy' or 'rules', got {method!r}")
