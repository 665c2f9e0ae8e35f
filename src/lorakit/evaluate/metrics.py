"""Answer-quality metrics: SQuAD exact match and F1, ROUGE, BLEU, never-stops rate.

Pure functions over strings. Per-example scores are on a 0-100 scale (`score_example`) and corpus
numbers are means on the same scale, so a report's numbers can be recomputed from its predictions.

Normalization has two rule sets, chosen per example:

* SQuAD v1.1 rules (English): lowercase, delete ASCII punctuation (`string.punctuation`), delete
  the articles a/an/the, collapse whitespace. Exactly the official evaluation script, so EM/F1 on
  English data equal its numbers (it keeps curly quotes and other non-ASCII punctuation, and so
  do we here).
* Unicode rules (every other script): NFKC; lowercase; Arabic yeh/alef maksura -> Persian yeh
  and Arabic kaf -> Persian kaf; every decimal digit (Persian, Arabic-Indic, Bengali...) -> ASCII;
  ZWNJ -> space (Persian writers type a space or a ZWNJ between the same morphemes; a space keeps
  both spellings token-equal); other invisible format characters (ZWJ, ZWSP, bidi marks, soft
  hyphen) deleted; Arabic diacritics (harakat, superscript alef...) and tatweel deleted; every
  Unicode punctuation character (category P*, e.g. ، ؛ ؟ « » । ॥) and ASCII punctuation deleted;
  then articles and whitespace as above.

`lang=None` picks the rules from the gold text (the references, or the no-answer text for an
unanswerable question): Unicode rules when it holds a letter of a non-Latin, non-Greek script or a
non-ASCII digit, SQuAD rules otherwise. The prediction never switches the rules, so English data
is always scored exactly as the official script scores it, even when a model copies a Cyrillic
name and a dash. `lang="en"` forces SQuAD rules; any other language code (e.g. "fa", "bn") forces
Unicode rules, which is the safe choice for non-English data whose answers are digits or Latin.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

from ..errors import EvalError

ZWNJ = "\u200c"
TATWEEL = "\u0640"
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ASCII_PUNCTUATION = frozenset(string.punctuation)
_LETTER_CATEGORIES = ("Lu", "Ll", "Lt", "Lo")
FINISH_REASONS = ("stop", "eos", "length")


class _CodepointTable(dict):
    """A `str.translate` table that decides each code point once, on first sight."""

    def __init__(self, decide):
        super().__init__()
        self._decide = decide

    def __missing__(self, code: int):
        value = self._decide(chr(code))
        self[code] = value
        return value


def _fold_char(ch: str) -> str:
    if ch in "\u064a\u0649":  # Arabic yeh, alef maksura
        return "\u06cc"  # Persian yeh
    if ch == "\u0643":  # Arabic kaf
        return "\u06a9"  # Persian kaf
    if ch == ZWNJ:
        return " "
    if ch == TATWEEL:
        return ""
    category = unicodedata.category(ch)
    if category == "Nd":
        return str(unicodedata.decimal(ch))
    if category == "Cf":
        return ""
    if category == "Mn" and unicodedata.name(ch, "").startswith("ARABIC"):
        return ""
    return ch


def _is_punctuation(ch: str) -> bool:
    return ch in _ASCII_PUNCTUATION or unicodedata.category(ch).startswith("P")


_FOLD = _CodepointTable(_fold_char)
_DELETE_PUNCTUATION = _CodepointTable(lambda ch: "" if _is_punctuation(ch) else ch)
# ROUGE splits words at punctuation and symbols, as its own (ASCII-only) tokenizer does.
_SPLIT_AT_PUNCTUATION = _CodepointTable(
    lambda ch: " " if _is_punctuation(ch) or unicodedata.category(ch).startswith("S") else ch
)


def _needs_unicode_rules(text: str) -> bool:
    """True when `text` has a letter of a script other than Latin/Greek, or a non-ASCII digit."""
    if text.isascii():
        return False
    for ch in text:
        if ord(ch) <= 0x24F:  # ASCII, Latin-1 and Latin Extended-A/B
            continue
        category = unicodedata.category(ch)
        if category == "Nd":
            return True
        if category in _LETTER_CATEGORIES and not unicodedata.name(ch, "").startswith(("LATIN", "GREEK")):
            return True
    return False


def _use_unicode_rules(lang: str | None, texts: Iterable[str]) -> bool:
    if lang is None:
        return any(_needs_unicode_rules(text) for text in texts)
    return lang.lower().replace("_", "-").split("-")[0] != "en"


def _fold(text: str) -> str:
    return unicodedata.normalize("NFKC", text).lower().translate(_FOLD)


def _normalize(text: str, unicode_rules: bool) -> str:
    if unicode_rules:
        text = _fold(text).translate(_DELETE_PUNCTUATION)
    else:
        text = "".join(ch for ch in text.lower() if ch not in _ASCII_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_answer(text: str, lang: str | None = None) -> str:
    """Normalize an answer for EM/F1 (see the module docstring for both rule sets)."""
    return _normalize(text, _use_unicode_rules(lang, [text]))


def _check_example(prediction, references, where: str) -> None:
    if not isinstance(prediction, str):
        raise EvalError(
            f"{where}: the prediction is {type(prediction).__name__}, not text.",
            hint="pass each prediction as a string ('' for an empty answer).",
        )
    if isinstance(references, str) or not isinstance(references, (list, tuple)):
        raise EvalError(
            f"{where}: the references must be a list of answers, got {type(references).__name__}.",
            hint="wrap a single answer in a list, e.g. ['Paris']; use [] for an unanswerable question.",
        )
    for index, reference in enumerate(references):
        if not isinstance(reference, str):
            raise EvalError(
                f"{where}: reference {index} is {type(reference).__name__}, not text.",
                hint="give every reference answer as a string.",
            )


def _token_f1(prediction: str, reference: str) -> float:
    pred_tokens, ref_tokens = prediction.split(), reference.split()
    common = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred_tokens)
    recall = common / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def _em_f1(
    prediction: str, references: Sequence[str], no_answer: str, lang: str | None, where: str = "example"
) -> tuple[float, float]:
    """(EM, F1) on 0..1, the best over the references, as the SQuAD v1.1 script computes them.

    No references means unanswerable (SQuAD 2.0): right iff the prediction is empty or no_answer.
    """
    _check_example(prediction, references, where)
    if not references:
        unicode_rules = _use_unicode_rules(lang, [no_answer])
        pred = _normalize(prediction, unicode_rules)
        correct = float(pred == "" or pred == _normalize(no_answer, unicode_rules))
        return correct, correct
    unicode_rules = _use_unicode_rules(lang, references)
    pred = _normalize(prediction, unicode_rules)
    golds = [_normalize(reference, unicode_rules) for reference in references]
    return max(float(pred == gold) for gold in golds), max(_token_f1(pred, gold) for gold in golds)


def exact_match(
    prediction: str, references: Sequence[str], *, no_answer: str = "unanswerable", lang: str | None = None
) -> float:
    """1.0 if the normalized prediction equals a normalized reference, else 0.0.

    With `references == []` (unanswerable) it is 1.0 iff the prediction is empty or `no_answer`.
    """
    return _em_f1(prediction, references, no_answer, lang)[0]


def f1_score(
    prediction: str, references: Sequence[str], *, no_answer: str = "unanswerable", lang: str | None = None
) -> float:
    """Token-level F1 (0..1) of the normalized prediction, the best over the references."""
    return _em_f1(prediction, references, no_answer, lang)[1]


def score_example(
    prediction: str, references: Sequence[str], *, no_answer: str = "unanswerable", lang: str | None = None
) -> dict:
    """{"exact_match": 0 or 100, "f1": 0..100} for one example."""
    exact, f1 = _em_f1(prediction, references, no_answer, lang)
    return {"exact_match": 100.0 * exact, "f1": 100.0 * f1}


class UnicodeWordTokenizer:
    """A tokenizer for `rouge_score` that keeps every script's letters.

    rouge_score's default tokenizer replaces every character outside [a-z0-9] with a space, so
    Persian or Bengali text has no tokens and scores 0. This one folds text as the Unicode rules
    do, splits at punctuation, symbols and whitespace, and keeps words whole (marks included).
    """

    def tokenize(self, text: str) -> list[str]:
        return _fold(text).translate(_SPLIT_AT_PUNCTUATION).split()


def _check_corpus(predictions, references_list) -> None:
    if len(predictions) != len(references_list):
        raise EvalError(
            f"There are {len(predictions)} predictions but {len(references_list)} reference lists.",
            hint="pass one list of reference answers per prediction, in the same order.",
        )
    if not predictions:
        raise EvalError("There are no predictions to score.", hint="evaluate at least one example.")
    for index, (prediction, references) in enumerate(zip(predictions, references_list)):
        _check_example(prediction, references, f"example {index}")
        if not references:
            raise EvalError(
                f"example {index}: has no reference answer, so ROUGE/BLEU cannot score it.",
                hint="give at least one reference, or use corpus_metrics (it scores unanswerable "
                "questions against the no-answer text).",
            )


def rouge_scores(predictions: Sequence[str], references_list: Sequence[Sequence[str]]) -> dict:
    """Mean ROUGE-1/2/L F-measure (x100), each example scored against its best reference."""
    from rouge_score.rouge_scorer import RougeScorer

    _check_corpus(predictions, references_list)
    types = ("rouge1", "rouge2", "rougeL")
    scorer = RougeScorer(list(types), tokenizer=UnicodeWordTokenizer())
    totals = dict.fromkeys(types, 0.0)
    for prediction, references in zip(predictions, references_list):
        best = scorer.score_multi(list(references), prediction)
        for name in types:
            totals[name] += best[name].fmeasure
    return {name: 100.0 * total / len(predictions) for name, total in totals.items()}


_NO_SPACE_SCRIPTS = ("THAI", "LAO", "KHMER", "MYANMAR", "TIBETAN")


def bleu_tokenizer_for(texts: Iterable[str]) -> str:
    """The sacreBLEU tokenizer that suits the scripts in `texts`.

    Japanese kana -> "char" (ja-mecab needs MeCab, not a lorakit dependency); Chinese characters
    -> "zh"; Thai, Lao, Khmer, Myanmar, Tibetan (written without spaces) -> "char"; any other
    non-Latin script (Persian, Arabic, Bengali, Hindi, Cyrillic, Korean...; space-delimited) ->
    "intl", which also splits off Unicode punctuation; Latin only -> "13a", the WMT standard.
    """
    found = set()
    for text in texts:
        if not _needs_unicode_rules(text):
            continue
        for ch in text:
            if ord(ch) > 0x24F and unicodedata.category(ch) in _LETTER_CATEGORIES:
                found.add(unicodedata.name(ch, "").split(" ")[0])
    if found & {"HIRAGANA", "KATAKANA"}:
        return "char"
    if "CJK" in found:
        return "zh"
    if found & set(_NO_SPACE_SCRIPTS):
        return "char"
    if found - {"LATIN", "GREEK"}:
        return "intl"
    return "13a"


def bleu_score(
    predictions: Sequence[str], references_list: Sequence[Sequence[str]], *, tokenize: str = "auto"
) -> float:
    """Corpus BLEU (0..100) with sacreBLEU on the raw text; examples may have different
    numbers of references. `tokenize="auto"` picks one with `bleu_tokenizer_for`."""
    import sacrebleu
    from sacrebleu.metrics.bleu import _TOKENIZERS

    _check_corpus(predictions, references_list)
    if tokenize == "auto":
        tokenize = bleu_tokenizer_for([*predictions, *(r for refs in references_list for r in refs)])
    if tokenize not in _TOKENIZERS:
        raise EvalError(
            f"Unknown BLEU tokenizer {tokenize!r} (eval.bleu_tokenize).",
            hint=f"use 'auto' or one of: {', '.join(sorted(_TOKENIZERS))}.",
        )
    # sacreBLEU wants one stream per reference position; None pads examples with fewer references.
    depth = max(len(refs) for refs in references_list)
    streams = [[refs[k] if k < len(refs) else None for refs in references_list] for k in range(depth)]
    try:
        # the None padding is sacreBLEU's documented way to give examples fewer references; its hints omit it
        return float(sacrebleu.corpus_bleu(list(predictions), streams, tokenize=tokenize).score)  # type: ignore[arg-type]
    except (ImportError, OSError, RuntimeError) as exc:
        raise EvalError(
            f"The BLEU tokenizer {tokenize!r} (eval.bleu_tokenize) could not be loaded: {exc}",
            hint="use 'auto', '13a', 'intl', 'char' or 'zh', which need nothing extra.",
        ) from exc


def never_stops_rate(finish_reasons: Sequence[str]) -> float:
    """Share (0..1) of generations that hit the token limit without EOS or a stop string."""
    for index, reason in enumerate(finish_reasons):
        if reason not in FINISH_REASONS:
            raise EvalError(
                f"generation {index}: unknown finish reason {reason!r}.",
                hint=f"use one of {', '.join(FINISH_REASONS)} ('length' = hit max_new_tokens).",
            )
    if not finish_reasons:
        return 0.0
    return sum(reason == "length" for reason in finish_reasons) / len(finish_reasons)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def corpus_metrics(
    predictions: Sequence[str],
    references_list: Sequence[Sequence[str]],
    *,
    no_answer: str = "unanswerable",
    finish_reasons: Sequence[str] | None = None,
    bleu_tokenize: str = "auto",
    lang: str | None = None,
) -> dict:
    """Every metric for a set of predictions, on 0..100 scales.

    Returns n, exact_match, f1, rouge1, rouge2, rougeL, bleu, bleu_tokenize, never_stops_rate
    (None without finish reasons), and, when some questions are unanswerable, `has_answer` and
    `no_answer` breakdowns ({n, exact_match, f1}) as in the SQuAD 2.0 script. ROUGE and BLEU score
    an unanswerable question against the `no_answer` text, which is what the model is taught.
    """
    if len(predictions) != len(references_list) or not predictions:
        _check_corpus(predictions, references_list)
    if finish_reasons is not None and len(finish_reasons) != len(predictions):
        raise EvalError(
            f"There are {len(predictions)} predictions but {len(finish_reasons)} finish reasons.",
            hint="pass one finish reason per prediction, or none at all.",
        )
    scores = []
    for index, (prediction, references) in enumerate(zip(predictions, references_list)):
        exact, f1 = _em_f1(prediction, references, no_answer, lang, where=f"example {index}")
        scores.append({"exact_match": 100.0 * exact, "f1": 100.0 * f1})
    text_refs = [list(refs) if refs else [no_answer] for refs in references_list]
    if bleu_tokenize == "auto":
        bleu_tokenize = bleu_tokenizer_for([*predictions, *(r for refs in text_refs for r in refs)])
    result = {
        "n": len(predictions),
        "exact_match": _mean([s["exact_match"] for s in scores]),
        "f1": _mean([s["f1"] for s in scores]),
        **rouge_scores(predictions, text_refs),
        "bleu": bleu_score(predictions, text_refs, tokenize=bleu_tokenize),
        "bleu_tokenize": bleu_tokenize,
        "never_stops_rate": None if finish_reasons is None else 100.0 * never_stops_rate(finish_reasons),
    }
    answerable = [bool(refs) for refs in references_list]
    if not all(answerable):
        for key, wanted in (("has_answer", True), ("no_answer", False)):
            group = [s for s, flag in zip(scores, answerable) if flag == wanted]
            result[key] = {
                "n": len(group),
                "exact_match": _mean([s["exact_match"] for s in group]) if group else None,
                "f1": _mean([s["f1"] for s in group]) if group else None,
            }
    return result
