"""Reading files: every supported container, and errors that name the file and line."""

from __future__ import annotations

import json

import pytest

from lorakit.data import load_examples
from lorakit.data.loaders import read_raw
from lorakit.errors import DataError


def test_missing_file_names_the_path_and_a_fix(tmp_path):
    missing = tmp_path / "nowhere" / "train.json"
    with pytest.raises(DataError) as err:
        read_raw(missing)
    assert str(missing) in str(err.value) and "does not exist" in str(err.value)
    assert err.value.hint  # says how to fix it


def test_missing_relative_file_with_suffix_is_not_taken_for_a_hub_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="'data/train.jsonl' does not exist"):
        read_raw("data/train.jsonl")


def test_malformed_json_reports_the_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"question": "a", "answer": "b"},\n  {"question": "c" "answer": "d"}\n]\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_raw(path)
    assert "broken.json" in str(err.value) and "line 3" in str(err.value)


def test_malformed_jsonl_reports_the_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"question": "a", "answer": "b"}\n\n{"question": "c", "answer": \n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_raw(path)
    assert "broken.jsonl" in str(err.value) and "line 3" in str(err.value)


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"question": "a", "answer": "b"}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 2 is a JSON list"):
        read_raw(path)


def test_json_file_holding_json_lines_is_read_line_by_line(tmp_path):
    path = tmp_path / "lines.json"
    path.write_text('{"question": "a", "answer": "b"}\n{"question": "c", "answer": "d"}\n', encoding="utf-8")
    raw = read_raw(path)
    assert [r["question"] for r in raw.data] == ["a", "c"] and raw.lines == [1, 2]


def test_unknown_suffix(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_bytes(b"PK")
    with pytest.raises(DataError, match="unknown file type '.xlsx'"):
        read_raw(path)


def test_ragged_csv_row_names_the_line(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text("question,answer\nq1,a1\nq2,a2,extra\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 3 has 3 fields but the header has 2 columns"):
        read_raw(path)


def test_folder_that_is_not_a_saved_dataset(tmp_path):
    with pytest.raises(DataError, match="save_to_disk"):
        read_raw(tmp_path)


def test_saved_dataset_dict_picks_the_hub_split(tmp_path):
    import datasets

    folder = tmp_path / "dd"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list([{"question": "q1", "answer": "a1"}]),
            "test": datasets.Dataset.from_list([{"question": "q2", "answer": "a2"}]),
        }
    ).save_to_disk(str(folder))
    assert read_raw(folder, hub_split="test").data == [{"question": "q2", "answer": "a2"}]
    with pytest.raises(DataError, match="hub_split"):
        read_raw(folder, hub_split="validation")


def test_invalid_utf8_drops_only_that_record(tmp_path):
    good = json.dumps({"question": "چه؟", "answer": "این"}, ensure_ascii=False).encode("utf-8")
    bad = b'{"question": "caf\xe9?", "answer": "yes"}'  # Latin-1 byte inside a UTF-8 file
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(good + b"\n" + bad + b"\n" + good.replace("این".encode(), b"that") + b"\n")
    loaded = load_examples(str(path))
    assert [ex.target for ex in loaded.examples] == ["این", "that"]
    assert loaded.report.dropped == [("mixed.jsonl:1", "invalid UTF-8")]


def test_utf8_bom_is_ignored(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffquestion,answer\nq,a\n".encode("utf-8"))
    assert read_raw(path).data == [{"question": "q", "answer": "a"}]


def test_short_csv_row_names_the_line_like_a_ragged_one(tmp_path):
    path = tmp_path / "short.csv"
    path.write_text("question,answer,context\nq1,a1,c1\n\nq2,a2\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 4 has 2 fields but the header has 3 columns"):
        read_raw(path)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32"])
def test_utf16_and_utf32_files_name_the_encoding(tmp_path, encoding):
    path = tmp_path / "wide.json"
    path.write_bytes(json.dumps([{"question": "q", "answer": "a"}]).encode(encoding))
    with pytest.raises(DataError, match=r"encoded as UTF-(16|32)") as err:
        read_raw(path)
    assert "UTF-8" in err.value.hint and "comma" not in str(err.value)


def test_utf16_without_bom_is_found_by_its_nul_bytes(tmp_path):
    path = tmp_path / "wide.jsonl"
    path.write_bytes('{"question": "q", "answer": "a"}\n'.encode("utf-16-le"))
    with pytest.raises(DataError, match="UTF-16 LE"):
        read_raw(path)


@pytest.mark.parametrize(
    "name, text, says",
    [
        ("empty.json", "", "the file is empty"),
        ("blank.jsonl", "\n \n", "the file is empty"),
        ("list.json", "[]", "holds no records"),
        ("header.csv", "question,answer\n", "holds no records"),
        ("wrapped.json", '{"data": []}', "holds no records"),
    ],
)
def test_empty_files_say_they_are_empty(tmp_path, name, text, says):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=says) as err:
        load_examples(str(path))
    assert "(none)" not in str(err.value)


def test_deeply_nested_json_is_a_data_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    with pytest.raises(DataError, match="too deeply"):
        read_raw(path)


def test_huge_integer_names_its_line(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text(
        '{"question": "q", "answer": "a"}\n{"question": "q", "answer": ' + "9" * 5000 + "}\n", encoding="utf-8"
    )
    with pytest.raises(DataError, match="line 2 holds a number with more than"):
        read_raw(path)
    nested = tmp_path / "big.json"
    nested.write_text('[\n{"question": "q",\n "answer": ' + "9" * 5000 + "}]", encoding="utf-8")
    with pytest.raises(DataError, match="line 3 holds a number"):
        read_raw(nested)


def test_duplicate_json_keys_warn_with_file_line_and_key(tmp_path, caplog):
    path = tmp_path / "dup.json"
    path.write_text('[{"question": "q",\n  "answer": "first",\n  "answer": "second"}]', encoding="utf-8")
    with caplog.at_level("WARNING", logger="lorakit.data"):
        raw = read_raw(path)
    assert raw.data == [{"question": "q", "answer": "second"}]  # the last value wins, as in json
    assert "dup.json line 3: duplicate key 'answer'" in caplog.text
    lines = tmp_path / "dup.jsonl"
    lines.write_text(
        '{"question": "q", "answer": "a"}\n{"question": "q", "question": "r", "answer": "b"}\n', encoding="utf-8"
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="lorakit.data"):
        read_raw(lines)
    assert "dup.jsonl line 2: duplicate key 'question'" in caplog.text


def test_unreadable_path_is_a_data_error(tmp_path):
    from lorakit.data.loaders import read_bytes

    with pytest.raises(DataError, match="cannot read the file"):
        read_bytes(tmp_path)  # a folder
