"""Answer-quality metrics: hand-computed cases, other scripts, and the official SQuAD script."""

import collections
import re
import string

import pytest

from lorakit.errors import EvalError
from lorakit.evaluate.metrics import (
    UnicodeWordTokenizer,
    bleu_score,
    bleu_tokenizer_for,
    corpus_metrics,
    exact_match,
    f1_score,
    never_stops_rate,
    normalize_answer,
    rouge_scores,
    score_example,
)


# The official SQuAD v1.1 evaluation script's definitions, written out as the reference.
def official_normalize(s):
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def official_f1(prediction, truth):
    pred, gold = official_normalize(prediction).split(), official_normalize(truth).split()
    same = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if same == 0:
        return 0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def official_em(prediction, truth):
    return official_normalize(prediction) == official_normalize(truth)


TRICKY_ENGLISH = [
    "The Eiffel Tower",
    "  an  apple,\ta PEAR\nand the  theatre ",
    "“Ode to Joy”",
    "don’t stop",
    "rock 'n' roll",
    "1,000–2,000 km",
    "U.S.A.",
    "Bronisław Malinowski",
    "naïve café…",
    "€5 (approx.)",
    "the ﬁrst ½",
    "5 µm",
    "Hawaiʻi",
    "Theory of π",
    "a.m. / p.m.",
    "Nikola Tesla (Serbian Cyrillic: Никола Тесла; 10 July 1856 – 7 January 1943)",
    "",
]


@pytest.mark.parametrize("text", TRICKY_ENGLISH)
def test_english_normalization_is_the_official_script(text):
    if re.search(r"[А-я]", text):  # a Cyrillic string alone is normalized by the Unicode rules
        assert normalize_answer(text, lang="en") == official_normalize(text)
    else:
        assert normalize_answer(text) == official_normalize(text)


def test_english_scores_equal_the_official_script_on_every_pair():
    # Any prediction (even one in Cyrillic) against English references scores as officially.
    for prediction in TRICKY_ENGLISH:
        for truth in TRICKY_ENGLISH[:-1]:
            assert exact_match(prediction, [truth]) == float(official_em(prediction, truth))
            assert f1_score(prediction, [truth]) == pytest.approx(official_f1(prediction, truth), abs=0)


def test_curly_quotes_are_kept_on_english_as_the_official_script_does():
    assert normalize_answer("“Ode”") == "“ode”"
    assert exact_match("Ode", ["“Ode”"]) == 0.0
    assert normalize_answer("“Ode”", lang="fa") == "ode"


def test_articles_and_punctuation():
    assert normalize_answer("The Cat, a Dog & an Owl!") == "cat dog owl"
    assert normalize_answer("Theatre anthem") == "theatre anthem"  # only whole words
    assert exact_match("the  Louvre.", ["Louvre"]) == 1.0


def test_multiple_references_take_the_max():
    refs = ["Denver Broncos", "the Broncos", "Carolina"]
    assert exact_match("Broncos", refs) == 1.0
    assert f1_score("Denver", refs) == pytest.approx(2 / 3)  # P=1, R=1/2 vs 'denver broncos'


def test_partial_overlap_f1_by_hand():
    # pred tokens: in, 1905, paris (3); gold: paris, france, 1905, summer (4); common 2
    precision, recall = 2 / 3, 2 / 4
    expected = 2 * precision * recall / (precision + recall)
    assert f1_score("in 1905, Paris", ["Paris France 1905 summer"]) == pytest.approx(expected)
    assert score_example("in 1905, Paris", ["Paris France 1905 summer"]) == {
        "exact_match": 0.0,
        "f1": pytest.approx(100 * expected),
    }


def test_repeated_tokens_count_once_each():
    # pred "the the cat cat" -> "cat cat"; gold "cat" -> common 1; P=1/2, R=1
    assert f1_score("the the cat cat", ["cat"]) == pytest.approx(2 / 3)


def test_unanswerable_right_and_wrong():
    assert exact_match("unanswerable", []) == 1.0
    assert exact_match("  Unanswerable. ", []) == 1.0
    assert exact_match("", []) == 1.0
    assert f1_score("Paris", []) == 0.0
    assert exact_match("Paris", []) == 0.0
    assert exact_match("no answer", [], no_answer="No answer!") == 1.0


def test_persian_letter_variants_diacritics_tatweel_and_zwnj():
    persian = "کتاب‌های ایرانی"
    arabic_letters = "كتاب‌هاي ايراني"  # Arabic kaf and yeh
    assert normalize_answer(arabic_letters) == normalize_answer(persian) == "کتاب های ایرانی"
    assert exact_match("ايرانى", ["ایرانی"]) == 1.0  # alef maksura and Arabic yeh
    assert exact_match("کِتـــابْ", ["کتاب"]) == 1.0  # kasra, sukun and tatweel
    assert exact_match("کتاب های", ["کتاب‌های"]) == 1.0  # ZWNJ written as a space
    assert normalize_answer("مي\u200dخواهم") == "میخواهم"  # other zero-width characters go
    assert exact_match("«تهران»، ایران؟", ["تهران ایران"]) == 1.0  # Persian punctuation
    assert exact_match("۱۳۹۹", ["1399"], lang="fa") == 1.0
    assert exact_match("1399", ["۱۳۹۹"]) == 1.0  # Persian digits select the Unicode rules


def test_bengali_danda_removed():
    assert normalize_answer("আমি ভাত খাই।") == "আমি ভাত খাই"
    assert normalize_answer("সে আসবে॥") == "সে আসবে"
    assert f1_score("আমি ভাত খাই।", ["আমি ভাত"]) == pytest.approx(0.8)


def test_rouge_on_bengali_where_the_default_tokenizer_scores_zero():
    from rouge_score.rouge_scorer import RougeScorer

    text = "আমি প্রতিদিন ভাত খাই"
    default = RougeScorer(["rouge1"]).score(text, text)["rouge1"].fmeasure
    assert default == 0.0
    assert rouge_scores([text], [[text]]) == {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0}
    assert UnicodeWordTokenizer().tokenize("খাই। Café-Bar") == ["খাই", "café", "bar"]


def test_rouge_by_hand_and_max_over_references():
    # 'the cat sat' vs 'the cat ran': unigrams 2/3 both ways -> 66.67; bigrams 1/2 -> 50
    scores = rouge_scores(["the cat sat"], [["a dog", "the cat ran"]])
    assert scores["rouge1"] == pytest.approx(200 / 3)
    assert scores["rouge2"] == pytest.approx(50.0)
    assert scores["rougeL"] == pytest.approx(200 / 3)


def test_rouge_agrees_with_the_default_tokenizer_on_english():
    from rouge_score.rouge_scorer import RougeScorer

    pred, ref = "The U.S. economy grew 3% in 2019.", "the us economy grew by 3 percent in 2019"
    default = RougeScorer(["rouge1", "rougeL"]).score(ref, pred)
    ours = rouge_scores([pred], [[ref]])
    assert ours["rouge1"] == pytest.approx(100 * default["rouge1"].fmeasure)
    assert ours["rougeL"] == pytest.approx(100 * default["rougeL"].fmeasure)


def test_bleu_identical_persian_is_100_and_tokenizer_choice():
    text = "رئال مادرید در سال ۱۹۰۲ در شهر مادرید تأسیس شد"
    assert bleu_score([text], [[text]]) == pytest.approx(100.0)
    assert bleu_tokenizer_for([text]) == "intl"
    assert bleu_tokenizer_for(["আমি ভাত খাই"]) == "intl"
    assert bleu_tokenizer_for(["The cat sat on the mat."]) == "13a"
    assert bleu_tokenizer_for(["我喜欢猫"]) == "zh"
    assert bleu_tokenizer_for(["猫が好きです"]) == "char"
    assert bleu_tokenizer_for(["ผมชอบแมว"]) == "char"


def test_bleu_with_varying_reference_counts():
    import sacrebleu

    preds = ["the cat is on the mat today", "there is a dog in the garden now"]
    refs = [["the cat is on the mat today"], ["a dog is in the garden", "there is a dog in the garden now"]]
    padded = [[refs[0][0], refs[1][0]], [None, refs[1][1]]]
    expected = sacrebleu.corpus_bleu(preds, padded, tokenize="13a").score
    assert bleu_score(preds, refs) == pytest.approx(expected)
    assert bleu_score(preds, refs) == pytest.approx(100.0)  # each matches one of its references
    assert bleu_score(preds, [refs[0], refs[1][:1]]) < 100.0


def test_bleu_unknown_tokenizer_is_a_clear_error():
    with pytest.raises(EvalError, match="eval.bleu_tokenize"):
        bleu_score(["a b"], [["a b"]], tokenize="klingon")


def test_never_stops_rate():
    assert never_stops_rate(["stop", "length", "stop", "length"]) == 0.5
    assert never_stops_rate([]) == 0.0
    with pytest.raises(EvalError, match="finish reason"):
        never_stops_rate(["stop", "max_tokens"])


def test_corpus_metrics_with_unanswerable_breakdown():
    preds = ["Denver Broncos", "in 1905, Paris", "unanswerable", "Paris"]
    refs = [["Denver Broncos", "Broncos"], ["Paris France 1905 summer"], [], []]
    result = corpus_metrics(preds, refs, finish_reasons=["stop", "stop", "stop", "length"])
    f1_second = 100 * (2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2))
    assert result["n"] == 4
    assert result["exact_match"] == pytest.approx(50.0)
    assert result["f1"] == pytest.approx((100 + f1_second + 100 + 0) / 4)
    assert result["never_stops_rate"] == pytest.approx(25.0)
    assert result["has_answer"] == {"n": 2, "exact_match": 50.0, "f1": pytest.approx((100 + f1_second) / 2)}
    assert result["no_answer"] == {"n": 2, "exact_match": 50.0, "f1": 50.0}
    assert result["bleu_tokenize"] == "13a"
    for key in ("rouge1", "rouge2", "rougeL", "bleu"):
        assert 0.0 <= result[key] <= 100.0


def test_corpus_metrics_without_finish_reasons_or_unanswerables():
    result = corpus_metrics(["a b"], [["a b"]])
    assert result["never_stops_rate"] is None
    assert "has_answer" not in result and "no_answer" not in result
    assert result["exact_match"] == 100.0


def test_bad_inputs_are_eval_errors_naming_the_example():
    with pytest.raises(EvalError, match="example 1: the references must be a list"):
        corpus_metrics(["a", "b"], [["a"], "b"])
    with pytest.raises(EvalError, match="example 0: the prediction is NoneType"):
        corpus_metrics([None], [["a"]])
    with pytest.raises(EvalError, match="2 predictions but 1 reference"):
        corpus_metrics(["a", "b"], [["a"]])
    with pytest.raises(EvalError, match="no predictions"):
        corpus_metrics([], [])
    with pytest.raises(EvalError, match="finish reasons"):
        corpus_metrics(["a"], [["a"]], finish_reasons=[])
