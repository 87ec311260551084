"""Candidate phrases of a caption: a small noun-phrase chunker (spaCy's noun chunks when a model is installed).

The rule chunker needs no model: it cuts the caption at punctuation, conjunctions, prepositions, verbs it
knows and participles, keeps "X of Y" together when X is a container or quantity ("a cup of coffee", "a pile
of coins"), and drops phrases about the picture itself ("a photo of ..."). It is meant for captioning-model
output (short descriptive sentences), not for arbitrary prose.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Literal

_SPLIT_WORDS = frozenset("""
and or but nor with without on in at into onto near beside besides next by from to under over above below behind
beneath between among around against along across through inside outside atop upon while where which who that
is are was were be been being has have had there here it its this these those they them their it's
""".split())
_FUNCTION_WORDS = frozenset("a an the some two three four five several many few one of".split())
_VERBS = frozenset("""
sits sit stands stand lies lie hangs hang rests rest shows show holds hold looks look flies fly floats float
appears appear covers cover features feature contains contain
""".split())
# nouns that look like participles ("a cat sitting on grass" splits at "sitting", "a tall building" does not)
_ING_NOUNS = frozenset("""
building buildings ceiling ceilings painting paintings clothing ring rings king kings wing wings string strings
thing things morning evening swing swings railing railings awning icing pudding bedding stocking stockings
sling spring springs ping ding lightning sibling siblings duckling ducklings seedling seedlings sapling
""".split())
# "X of Y" stays one phrase when X measures or contains Y; otherwise "of" ends the phrase
_PARTITIVE = frozenset("""
cup cups glass glasses bottle bottles bowl bowls plate plates pile piles stack stacks heap heaps bunch bunches
group groups pair pairs piece pieces slice slices set sets row rows field fields wall walls box boxes bag bags
lot lots couple herd herds flock flocks crowd crowds pot pots jar jars loaf mug mugs handful kind kinds type
""".split())
# heads that describe the picture, not its content: "a photo of a cat" yields "a cat" only
_PICTURE_WORDS = frozenset("photo photograph picture image scene view shot snapshot close-up closeup".split())
_TOKEN = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*|[,.;:!?()]")


@dataclass(frozen=True)
class PhraseConfig:
    """backend: "auto" (spaCy's noun chunks when `spacy_model` loads, else the rules), "rules", or "spacy"
    (an error when spaCy or the model is missing)."""

    backend: Literal["auto", "rules", "spacy"] = "auto"
    spacy_model: str = "en_core_web_sm"

    def __post_init__(self) -> None:
        if self.backend not in ("auto", "rules", "spacy"):
            raise ValueError(f"PhraseConfig.backend={self.backend!r}: use 'auto', 'rules' or 'spacy'")


def chunk_phrases(caption: str, config: PhraseConfig = PhraseConfig()) -> list[str]:
    """The noun phrases of `caption`, lower-cased, in order, each once (e.g. 'a cat', 'a cup of coffee')."""
    nlp = None if config.backend == "rules" else _spacy(config.spacy_model)
    if nlp is None and config.backend == "spacy":
        raise ValueError(f"PhraseConfig(backend='spacy') needs spaCy and its model {config.spacy_model!r}: "
                         f"pip install spacy && python -m spacy download {config.spacy_model}, or use backend='auto'")
    chunks = _spacy_chunks(nlp, caption) if nlp is not None else _rule_chunks(caption)
    return list(dict.fromkeys(c for c in chunks if c))


def normalise_phrase(phrase: str) -> str:
    """A phrase as a bank label: lower-cased words, leading articles and counts dropped ("A tabby cat" →
    "tabby cat", "two dogs" → "dogs", "a pile of coins" → "pile of coins"); "" when nothing is left."""
    tokens = [t for t in _TOKEN.findall(phrase.lower()) if t[0].isalnum()]
    while tokens and tokens[0] in _FUNCTION_WORDS and tokens[0] != "of":
        tokens = tokens[1:]
    return " ".join(tokens)


@functools.lru_cache(maxsize=4)
def _spacy(model: str) -> Any:
    """The loaded spaCy pipeline `model`, or None when spaCy or the model is not installed."""
    try:
        import spacy
    except ImportError:
        return None
    try:
        return spacy.load(model)
    except OSError:  # spaCy is there, the model package is not
        return None


def _spacy_chunks(nlp: Any, caption: str) -> list[str]:
    """spaCy's noun chunks, with the picture-describing ones ("a photo") dropped."""
    return [" ".join(_TOKEN.findall(chunk.text.lower())) for chunk in nlp(caption).noun_chunks
            if chunk.root.text.lower() not in _PICTURE_WORDS]


def _rule_chunks(caption: str) -> list[str]:
    """Runs of words between split words, "X of Y" merged for partitive X, picture phrases dropped."""
    runs: list[list[str]] = [[]]
    for token in _TOKEN.findall(caption.lower()):
        if token in _SPLIT_WORDS or token in _VERBS or not token[0].isalnum() or _participle(token):
            runs.append([])
        elif token == "of":
            # "a cup of coffee" stays whole; "a photo of a cat" loses "a photo"; any other "of" splits
            head = _head(runs[-1])
            if head in _PARTITIVE:
                runs[-1].append(token)
            else:
                if head in _PICTURE_WORDS:
                    runs[-1] = []
                runs.append([])
        else:
            runs[-1].append(token)
    runs = [_trim_participles(run) for run in runs]
    return [" ".join(run) for run in runs if _head(run) and _head(run) not in _PICTURE_WORDS]


def _trim_participles(run: list[str]) -> list[str]:
    """The run without trailing past participles after its noun ("a motorcycle parked" → "a motorcycle")."""
    while len(run) > 1 and len(run[-1]) > 4 and run[-1].endswith("ed") and _head(run[:-1]):
        run = run[:-1]
    return run


def _participle(token: str) -> bool:
    """Whether a word reads as an -ing verb form ("sitting", "holding") rather than a noun ("building")."""
    return len(token) > 4 and token.endswith("ing") and token not in _ING_NOUNS


def _head(run: list[str]) -> str | None:
    """The last content word of a run of tokens (the head noun of a simple English noun phrase)."""
    content = [t for t in run if t not in _FUNCTION_WORDS]
    return content[-1] if content else None
