"""Cleaning: NFC normalisation, and every dropped record has a stated reason."""

from __future__ import annotations

import unicodedata

from lorakit.data.clean import clean_examples
from lorakit.data.example import Example


def qa(question, answer, source, context=None):
    return Example(
        messages=[{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        context=context,
        answers=[answer] if answer.strip() else [],
        source=source,
    )


def chat(roles, source):
    return Example(messages=[{"role": r, "content": f"{r} text"} for r in roles], source=source)


def test_text_is_nfc_normalised():
    decomposed_persian = "\u0627\u0653"  # alef + madda above; NFC composes it to U+0622 (آ)
    decomposed_latin = "cafe\u0301"
    example = qa(f"{decomposed_latin}?", decomposed_persian, "f:0", context=decomposed_latin)
    (cleaned,), report = clean_examples([example])
    assert cleaned.question == "caf\u00e9?" and cleaned.context == "caf\u00e9"
    assert cleaned.target == "\u0622" and cleaned.answers == ["\u0622"]
    assert all(unicodedata.is_normalized("NFC", m["content"]) for m in cleaned.messages)
    assert report.kept == 1 and report.dropped == []


def test_each_problem_is_dropped_with_its_reason():
    examples = [
        qa("What?", "This.", "f:0"),
        qa("   ", "an answer", "f:1"),
        qa("A question?", " \n", "f:2"),
        chat(["user"], "f:3"),
        chat(["user", "assistant", "user"], "f:4"),
        chat(["system", "assistant"], "f:5"),
        qa("caf\udce9?", "yes", "f:6"),  # what surrogateescape makes of a Latin-1 byte
        qa("What?", "This.", "f:7"),  # duplicate of f:0
        qa("What?", "This.", "f:8", context="another passage"),  # same question, other passage: kept
    ]
    kept, report = clean_examples(examples)
    assert [ex.source for ex in kept] == ["f:0", "f:8"]
    assert dict(report.dropped) == {
        "f:1": "empty question",
        "f:2": "empty answer",
        "f:3": "no assistant turn",
        "f:4": "does not end with an assistant turn",
        "f:5": "no user turn",
        "f:6": "invalid UTF-8",
        "f:7": "duplicate",
    }
    assert report.kept == 2 and report.total == 9
    assert report.counts["duplicate"] == 1
    summary = report.summary()
    assert "kept 2 of 9" in summary and "invalid UTF-8: 1 (f:6)" in summary


def test_duplicates_kept_when_deduplication_is_off():
    kept, report = clean_examples([qa("q", "a", "f:0"), qa("q", "a", "f:1")], deduplicate=False)
    assert len(kept) == 2 and report.dropped == []


def test_duplicates_found_after_normalisation():
    kept, report = clean_examples([qa("cafe\u0301", "a", "f:0"), qa("caf\u00e9", "a", "f:1")])
    assert len(kept) == 1 and report.dropped == [("f:1", "duplicate")]


def test_empty_middle_turn_is_dropped():
    example = Example(
        messages=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": "ok"},
        ],
        source="f:0",
    )
    kept, report = clean_examples([example])
    assert kept == [] and report.dropped == [("f:0", "empty turn")]
