"""Every input format, written by the test itself, becomes the same canonical examples."""

from __future__ import annotations

import csv
import json

import pytest

from lorakit.data import load_examples
from lorakit.data.formats import detect_format, to_examples
from lorakit.data.loaders import read_raw
from lorakit.errors import DataError

# Two QA pairs, one Persian, each with a passage.
PAIRS = [
    {"id": "fa-1", "question": "پایتخت ایران کجاست؟", "answer": "تهران", "context": "تهران پایتخت ایران است."},
    {"id": "en-1", "question": "How many legs has a spider?", "answer": "eight", "context": "A spider has eight legs."},
]


def canonical(examples, with_context=True):
    return [(ex.messages, ex.context if with_context else None, ex.answers) for ex in examples]


def expected(with_context=True):
    return [
        (
            [{"role": "user", "content": p["question"]}, {"role": "assistant", "content": p["answer"]}],
            p["context"] if with_context else None,
            [p["answer"]],
        )
        for p in PAIRS
    ]


def write_json(path, data):
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    return path


def write_csv(path, rows, delimiter=","):
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def squad_doc(pairs=PAIRS):
    return {
        "version": "1.1",
        "data": [
            {
                "title": f"Article {i}",
                "paragraphs": [
                    {
                        "context": p["context"],
                        "qas": [
                            {
                                "id": p["id"],
                                "question": p["question"],
                                "answers": [{"text": p["answer"], "answer_start": p["context"].index(p["answer"])}],
                            },
                        ],
                    }
                ],
            }
            for i, p in enumerate(pairs)
        ],
    }


# --- files with a passage -------------------------------------------------------------------


def make_squad(tmp_path):
    return write_json(tmp_path / "squad.json", squad_doc()), "squad"


def make_squad_flat_json(tmp_path):
    records = [
        {
            "id": p["id"],
            "title": "t",
            "question": p["question"],
            "context": p["context"],
            "answers": {"text": [p["answer"]], "answer_start": [p["context"].index(p["answer"])]},
        }
        for p in PAIRS
    ]
    return write_json(tmp_path / "flat.json", records), "squad_flat"


def make_squad_flat_csv(tmp_path):
    rows = [
        {
            "id": p["id"],
            "question": p["question"],
            "context": p["context"],
            "answers.text": json.dumps([p["answer"]], ensure_ascii=False),
            "answers.answer_start": "[0]",
        }
        for p in PAIRS
    ]
    return write_csv(tmp_path / "flat.csv", rows), "squad_flat"


def make_squad_flat_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [
        {
            "id": p["id"],
            "question": p["question"],
            "context": p["context"],
            "answers": {"text": [p["answer"]], "answer_start": [0]},
        }
        for p in PAIRS
    ]
    path = tmp_path / "flat.parquet"
    pq.write_table(pa.Table.from_pylist(records), path)
    return path, "squad_flat"


def make_qa_jsonl(tmp_path):
    return write_jsonl(tmp_path / "qa.jsonl", PAIRS), "qa"


def make_qa_tsv(tmp_path):
    rows = [{"Q": p["question"], "A": p["answer"], "Passage": p["context"]} for p in PAIRS]
    return write_csv(tmp_path / "qa.tsv", rows, delimiter="\t"), "qa"


def make_saved_dataset(tmp_path):
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_list(
        [{"query": p["question"], "response": p["answer"], "context": p["context"]} for p in PAIRS]
    ).save_to_disk(str(folder))
    return folder, "qa"


@pytest.mark.parametrize(
    "make",
    [
        make_squad,
        make_squad_flat_json,
        make_squad_flat_csv,
        make_squad_flat_parquet,
        make_qa_jsonl,
        make_qa_tsv,
        make_saved_dataset,
    ],
)
def test_formats_with_context_give_the_same_examples(tmp_path, make):
    path, fmt = make(tmp_path)
    loaded = load_examples(str(path))
    assert loaded.format == fmt
    assert canonical(loaded.examples) == expected()
    assert loaded.examples[0].group  # grouped by article title or passage


def test_columns_format_uses_the_column_map(tmp_path):
    rows = [{"Frage": p["question"], "Antwort": p["answer"], "Text": p["context"], "key": p["id"]} for p in PAIRS]
    path = write_csv(tmp_path / "custom.csv", rows)
    column_map = {"question": "Frage", "answer": "Antwort", "context": "Text", "id": "key"}
    loaded = load_examples(str(path), column_map=column_map)
    assert loaded.format == "columns"
    assert canonical(loaded.examples) == expected()
    assert [ex.id for ex in loaded.examples] == ["fa-1", "en-1"]
    assert loaded.examples[0].group == PAIRS[0]["context"]


# --- files without a passage ----------------------------------------------------------------


def make_faq(tmp_path):
    doc = {"Questions": [{"question": p["question"], "answer": p["answer"]} for p in PAIRS]}
    return write_json(tmp_path / "faq.json", doc), "faq"


def make_faq_other_key(tmp_path):
    doc = {"faqs": [{"question": p["question"], "answer": p["answer"]} for p in PAIRS], "version": 2}
    return write_json(tmp_path / "faq.json", doc), "faq"


def make_alpaca(tmp_path):
    return write_json(
        tmp_path / "alpaca.json", [{"instruction": p["question"], "input": "", "output": p["answer"]} for p in PAIRS]
    ), "alpaca"


def make_sharegpt(tmp_path):
    records = [
        {"conversations": [{"from": "human", "value": p["question"]}, {"from": "gpt", "value": p["answer"]}]}
        for p in PAIRS
    ]
    return write_jsonl(tmp_path / "sharegpt.jsonl", records), "sharegpt"


def make_messages(tmp_path):
    records = [
        {"messages": [{"role": "user", "content": p["question"]}, {"role": "assistant", "content": p["answer"]}]}
        for p in PAIRS
    ]
    return write_jsonl(tmp_path / "chat.jsonl", records), "messages"


def make_prompt_completion_csv(tmp_path):
    return write_csv(tmp_path / "pc.csv", [{"prompt": p["question"], "completion": p["answer"]} for p in PAIRS]), "qa"


@pytest.mark.parametrize(
    "make", [make_faq, make_faq_other_key, make_alpaca, make_sharegpt, make_messages, make_prompt_completion_csv]
)
def test_formats_without_context_give_the_same_examples(tmp_path, make):
    path, fmt = make(tmp_path)
    loaded = load_examples(str(path))
    assert loaded.format == fmt
    assert canonical(loaded.examples) == expected(with_context=False)
    assert all(ex.group is None and ex.context is None for ex in loaded.examples)
    stem = path.stem
    assert [ex.id for ex in loaded.examples] == [f"{stem}-0", f"{stem}-1"]
    assert [ex.source for ex in loaded.examples] == [f"{path.name}:0", f"{path.name}:1"]


# --- format details -------------------------------------------------------------------------


def test_squad_v2_unanswerable_and_reference_answers(tmp_path):
    doc = {
        "data": [
            {
                "title": "باشگاه",
                "paragraphs": [
                    {
                        "context": "رئال مادرید در مادرید است.",
                        "qas": [
                            {
                                "id": 7,
                                "question": "رئال کجاست؟",
                                "is_impossible": False,
                                "answers": [
                                    {"text": "مادرید", "answer_start": 14},
                                    {"text": "مادرید ", "answer_start": 14},
                                    {"text": "در مادرید", "answer_start": 11},
                                ],
                            },
                            {"id": 8, "question": "بارسلونا چند بار قهرمان شده؟", "is_impossible": True, "answers": []},
                        ],
                    }
                ],
            }
        ]
    }
    path = write_json(tmp_path / "pqa.json", doc)
    loaded = load_examples(str(path), no_answer="پاسخی وجود ندارد")
    answerable, impossible = loaded.examples
    assert loaded.format == "squad"
    assert answerable.answers == ["مادرید", "در مادرید"]  # de-duplicated, order kept
    assert answerable.target == "مادرید" and answerable.id == "7" and answerable.group == "باشگاه"
    assert impossible.is_impossible and impossible.answers == []
    assert impossible.target == "پاسخی وجود ندارد"
    assert impossible.source == "pqa.json:1"


def test_squad_without_title_groups_by_passage(tmp_path):
    doc = squad_doc()
    for article in doc["data"]:
        del article["title"]
    loaded = load_examples(str(write_json(tmp_path / "s.json", doc)))
    assert [ex.group for ex in loaded.examples] == [p["context"] for p in PAIRS]


def test_squad_flat_empty_answer_list_is_unanswerable(tmp_path):
    records = [{"question": "q?", "context": "c", "answers": {"text": [], "answer_start": []}}]
    (example,) = load_examples(str(write_json(tmp_path / "v2.json", records)), no_answer="none").examples
    assert example.is_impossible and example.target == "none" and example.answers == []


def test_alpaca_input_and_system(tmp_path):
    records = [
        {"instruction": "Translate to Persian.", "input": "Good morning", "output": "صبح بخیر", "system": "Be brief."}
    ]
    (example,) = load_examples(str(write_json(tmp_path / "a.json", records))).examples
    assert example.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Translate to Persian.\n\nGood morning"},
        {"role": "assistant", "content": "صبح بخیر"},
    ]
    assert example.answers == ["صبح بخیر"]


def test_multi_turn_chat_keeps_every_turn(tmp_path):
    records = [
        {
            "id": "c1",
            "conversations": [
                {"from": "system", "value": "You are kind."},
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello!"},
                {"from": "human", "value": "Bye"},
                {"from": "gpt", "value": "Goodbye!"},
            ],
        }
    ]
    (example,) = load_examples(str(write_jsonl(tmp_path / "c.jsonl", records))).examples
    assert [m["role"] for m in example.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert example.answers == ["Goodbye!"] and example.id == "c1"


def test_detect_format_names_each_format(tmp_path):
    assert detect_format(read_raw(make_squad(tmp_path)[0])) == "squad"
    assert detect_format(read_raw(make_faq(tmp_path)[0])) == "faq"
    assert detect_format(read_raw(make_alpaca(tmp_path)[0])) == "alpaca"
    assert detect_format(read_raw(make_sharegpt(tmp_path)[0])) == "sharegpt"
    assert detect_format(read_raw(make_messages(tmp_path)[0])) == "messages"
    assert detect_format(read_raw(make_qa_jsonl(tmp_path)[0])) == "qa"
    assert detect_format(read_raw(make_squad_flat_json(tmp_path)[0])) == "squad_flat"


# --- errors ---------------------------------------------------------------------------------


def test_unknown_format_lists_keys_formats_and_column_map(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"text": "hello", "label": 1}])
    with pytest.raises(DataError) as err:
        load_examples(str(path))
    message = str(err.value)
    assert "odd.jsonl" in message and "text" in message and "label" in message
    assert "squad" in message and "alpaca" in message and "sharegpt" in message
    assert "column_map" in message


def test_sharegpt_unknown_role_names_file_record_and_field(tmp_path):
    records = [
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
        {"conversations": [{"from": "human", "value": "a"}, {"from": "function_call", "value": "{}"}]},
    ]
    with pytest.raises(DataError) as err:
        load_examples(str(write_jsonl(tmp_path / "tools.jsonl", records)))
    message = str(err.value)
    assert "tools.jsonl record 1 (line 2)" in message
    assert "conversations[1].from" in message and "function_call" in message


def test_messages_unknown_role(tmp_path):
    records = [{"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}]}]
    with pytest.raises(DataError, match=r"record 0.*messages\[1\]\.role.*tool"):
        load_examples(str(write_jsonl(tmp_path / "m.jsonl", records)))


def test_column_map_naming_a_missing_column(tmp_path):
    path = write_csv(tmp_path / "t.csv", [{"Q": "q", "A": "a"}])
    with pytest.raises(DataError) as err:
        load_examples(str(path), column_map={"question": "Q", "answer": "Answer"})
    assert "column_map.answer" in str(err.value) and "Q, A" in str(err.value)
    with pytest.raises(DataError, match="unknown field"):
        load_examples(str(path), column_map={"question": "Q", "response": "A"})


def test_explicit_format_that_does_not_match(tmp_path):
    path, _ = make_faq(tmp_path)
    with pytest.raises(DataError, match="format alpaca needs the key"):
        load_examples(str(path), format="alpaca")
    with pytest.raises(DataError, match="format squad needs"):
        to_examples(read_raw(path), "squad")


def test_wrong_field_type_names_record_and_field(tmp_path):
    path = write_jsonl(
        tmp_path / "bad.jsonl", [{"question": "ok", "answer": "ok"}, {"question": {"nested": 1}, "answer": "x"}]
    )
    with pytest.raises(DataError, match=r"bad.jsonl record 1 \(line 2\): field 'question' is a dict"):
        load_examples(str(path))


def test_unparseable_structured_answers_cell(tmp_path):
    rows = [{"question": "q", "context": "c", "answers": "{'text': array(['x'], dtype=object)}"}]
    with pytest.raises(DataError, match=r"u.csv record 0 \(line 2\): field 'answers' looks like a list"):
        load_examples(str(write_csv(tmp_path / "u.csv", rows)))


def test_squad_answer_offsets_are_repaired_and_counted(tmp_path):
    from lorakit.data.converters import ANSWER_NOT_IN_CONTEXT, ANSWER_START_FIXED, _check_starts

    context = "A cat sat. The cat ran. A dog slept."
    qas = [
        {"id": "ok", "question": "Who sat?", "answers": [{"text": "cat", "answer_start": 2}]},
        {"id": "off", "question": "Who ran?", "answers": [{"text": "cat", "answer_start": 13}]},
        {"id": "gone", "question": "Who flew?", "answers": [{"text": "bird", "answer_start": 0}]},
    ]
    path = write_json(
        tmp_path / "squad.json", {"data": [{"title": "t", "paragraphs": [{"context": context, "qas": qas}]}]}
    )
    loaded = load_examples(str(path))
    assert [ex.id for ex in loaded.examples] == ["ok", "off", "gone"]  # suspect answers are kept, only counted
    assert dict(loaded.report.repaired) == {ANSWER_START_FIXED: 1, ANSWER_NOT_IN_CONTEXT: 1}
    assert f"kept, {ANSWER_START_FIXED}: 1" in loaded.report.summary()
    # the nearest occurrence wins: offset 13 is 2 away from "cat" at 15 and 11 away from the one at 2
    assert _check_starts(read_raw(path), context, ["cat", "cat", "bird"], [2, 13, 0]) == [2, 15, None]
    flat = write_json(
        tmp_path / "flat.json",
        [
            {"question": "Who ran?", "context": context, "answers": {"text": ["cat"], "answer_start": [14]}},
        ],
    )
    assert dict(load_examples(str(flat)).report.repaired) == {ANSWER_START_FIXED: 1}
