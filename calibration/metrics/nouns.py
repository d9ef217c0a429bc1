"""Noun extraction for AQ-MAP: one head noun per noun phrase of the prompt.

``spacy`` follows the official AQ-MAP (Q-Refine) recipe: split the prompt at the starts of spaCy's noun
chunks (one part when there are fewer than two chunks) and keep, per part, the last NOUN/PROPN token that
is not a stop word or punctuation ('' when there is none). It needs ``spacy`` and the ``en_core_web_sm``
package installed by the user (nothing is downloaded).

``rules`` is our offline fallback that needs nothing: English noun phrases are head-final, so the prompt is
cut at function words (articles, prepositions, conjunctions, pronouns, auxiliaries), punctuation and verb
forms (-ing/-ed words not preceded by an article), and the last word of each remaining run is taken as its
head noun. It is an approximation of the tagger (adjective-final runs such as "is fluffy" give "fluffy").

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
ARTICLES = frozenset("a an the this that these those my your his her its our their some any each every".split())
WORD = re.compile(r"[A-Za-z][A-Za-z'\-]*|[^\sA-Za-z]")
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
        cand = [t.text for t in doc[lo:hi] if t.pos_ in ("NOUN", "PROPN") and not t.is_stop and not t.is_punct]
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
