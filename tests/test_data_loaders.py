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
    with pytest.raises(DataError, match="line 3 has more fields"):
        read_raw(path)


def test_folder_that_is_not_a_saved_dataset(tmp_path):
    with pytest.raises(DataError, match="save_to_disk"):
        read_raw(tmp_path)


def test_saved_dataset_dict_picks_the_hub_split(tmp_path):
    import datasets

    folder = tmp_path / "dd"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"question": "q1", "answer": "a1"}]),
        "test": datasets.Dataset.from_list([{"question": "q2", "answer": "a2"}]),
    }).save_to_disk(str(folder))
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
