"""`lorakit eval` and `lorakit score`: generate answers (or read them), score them, write reports.

The evaluation split is re-created from the run's own config.yaml (the same seeded split as
training), so no training record is ever scored as held-out data. Answers are generated with the
run's stored template; `compare_base` runs the very same prompts and decoding with the adapter off.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data.example import Example
from ..errors import EvalError

if TYPE_CHECKING:
    from ..inference.predictor import Predictor
    from ..run_metadata import RunInfo

SPLITS = ("train", "validation", "test")
logger = logging.getLogger("lorakit.evaluate")


def _references(example: Example) -> list[str]:
    """Every acceptable answer; [] means unanswerable (scored against the no-answer text)."""
    if example.is_impossible:
        return []
    if example.answers:
        return list(example.answers)
    return [example.target] if example.target else []


def _examples(
    path: str, info: RunInfo | None, data: str | None, split: str, no_answer: str
) -> tuple[list[Example], str]:
    """(examples, a description of where they came from)."""
    from ..data import load_examples, load_splits

    if data is not None:
        return load_examples(data, no_answer=no_answer).examples, str(data)
    if split not in SPLITS:
        raise EvalError(f"--split '{split}' is not a split.", hint=f"use one of {', '.join(SPLITS)}")
    if info is None or info.config is None:
        raise EvalError(
            f"'{path}' has no config.yaml, so its {split} split cannot be re-created.",
            hint="pass the examples to evaluate with --data FILE",
        )
    examples = getattr(load_splits(info.config.data), split)
    if not examples:
        raise EvalError(
            f"the run's {split} split is empty (data.split.{split} = {getattr(info.config.data.split, split)} of {info.config.data.path}).",
            hint="evaluate another split with --split, or pass a file with --data FILE",
        )
    return examples, f"{split} split of {info.config.data.path}"


def _scored_record(example: Example, prediction: str, *, no_answer: str, lang: str | None = None) -> dict[str, Any]:
    """One line of predictions.jsonl: the example, its references, the prediction and its scores."""
    from .metrics import score_example

    references = _references(example)
    return {
        "id": example.id,
        "question": example.question,
        "context": example.context,
        "references": references,
        "prediction": prediction,
        **score_example(prediction, references, no_answer=no_answer, lang=lang),
    }


def score_examples(
    predictor: Predictor,
    examples: list[Example],
    *,
    decoding: dict[str, Any],
    no_answer: str,
    bleu_tokenize: str = "auto",
    lang: str | None = None,
    perplexity: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Generate, extract answers, score: (records, corpus metrics, with perplexity unless asked not to).

    Used by `lorakit eval` and by the generation-based validation during training.

    Args:
        predictor: the model to evaluate, with its template (inference.load_predictor).
        examples: the examples to answer; their references are `answers` (or `target`).
        decoding: Predictor.generate's options; needs "max_new_tokens" and "batch_size".
        no_answer: the text that means "no answer".
        bleu_tokenize, lang: see config.EvalConfig.
        perplexity: also compute the perplexity of the reference answers.

    Returns:
        (one record per example: prediction, references, scores, finish reason, token counts;
        the corpus metrics: exact_match, f1, rougeL, bleu, never_stops_rate, perplexity...).

    Raises:
        ModelError: a prompt does not fit the model's context.
    """
    from .answers import extract_answer
    from .metrics import corpus_metrics
    from .shared_perplexity import reference_perplexity_shared

    conversations = [ex.prompt_messages() for ex in examples]
    contexts = [ex.context for ex in examples]
    generations = predictor.generate(conversations, contexts, **decoding)
    records = []
    for example, generation in zip(examples, generations):
        prediction = extract_answer(generation.text, predictor.template.stop_strings)
        records.append(
            {
                **_scored_record(example, prediction, no_answer=no_answer, lang=lang),
                "finish_reason": generation.finish_reason,
                "raw_output": generation.raw_text,
                "prompt_tokens": generation.prompt_tokens,
                "completion_tokens": generation.completion_tokens,
            }
        )
    metrics = corpus_metrics(
        [r["prediction"] for r in records],
        [r["references"] for r in records],
        no_answer=no_answer,
        finish_reasons=[r["finish_reason"] for r in records],
        bleu_tokenize=bleu_tokenize,
        lang=lang,
    )
    if not perplexity:
        return records, metrics
    # perplexity of what training taught: the target reply (or the no-answer text)
    prompts = [
        predictor.prompt_ids(m, c, max_new_tokens=decoding["max_new_tokens"]) for m, c in zip(conversations, contexts)
    ]
    targets = [ex.target or (ex.answers[0] if ex.answers else no_answer) for ex in examples]
    metrics["perplexity"] = reference_perplexity_shared(
        predictor.model,
        predictor.tokenizer,
        prompts,
        targets,
        task_type=predictor.task_type,
        batch_size=decoding["batch_size"],
    )
    return records, metrics


def evaluate_path(
    path: str | os.PathLike[str],
    *,
    data: str | None = None,
    split: str = "test",
    compare_base: bool = False,
    max_examples: int | None = None,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    device: str | None = None,
    extractive: bool | None = None,
    perplexity: bool = True,
    verbose: bool = True,
) -> dict[str, Any]:
    """Evaluate a run (or merged) folder: generate answers with its stored template, score them,
    write predictions.jsonl, metrics.json and the reports (`lorakit.evaluate`, `lorakit eval`).

    Each evaluation gets its own folder, <run>/eval/<split or data name>-<UTC time>/, listed in
    <run>/eval/index.json (see evaluate.history); with out_dir, exactly that folder (new or empty)
    and nothing else. Decoding options not given here come from the run's `eval` config section.

    Args:
        path: a run folder, its adapter folder, a merged folder, or a plain model folder.
        data: a data file to evaluate on instead of the run's own split.
        split: "train", "validation" or "test": re-created from the run's config.yaml (same seed).
        compare_base: also evaluate the base model (adapter off), same prompts and decoding.
        max_examples, batch_size, max_new_tokens: override the run's eval.* values.
        out_dir: write exactly this (new or empty) folder instead of <run>/eval/<label>-<time>/.
        device: "cpu", "cuda", ...; default: the best available.
        extractive: keep answers inside spans of their passage, or not (None: the run's setting).
        perplexity: also score the references' perplexity. verbose: log a summary ("lorakit.evaluate").

    Returns:
        What metrics.json holds ("n", "adapter" metrics, "base" with compare_base...), + "folder".

    Raises:
        EvalError: unknown split, empty split, no config.yaml without --data, nothing to evaluate,
            out_dir is a file or a folder that is not empty.
        RunError / ModelError / DataError: the folder, model or data cannot be loaded.
    """
    from ..config import EvalConfig
    from ..inference.predictor import _is_plain_model, load_predictor
    from ..run_metadata import read_run
    from ..runs import read_metrics
    from .history import check_out_dir, label_for, publish_new, publish_to, staging, write_index
    from .report import write_eval_outputs

    out = Path(out_dir) if out_dir else None
    if out is not None:
        check_out_dir(out)
    folder = Path(path)
    info = None if _is_plain_model(folder) else read_run(folder)
    config = info.config if info is not None else None
    eval_config = config.eval if config is not None else EvalConfig()
    no_answer = config.data.no_answer if config is not None else "unanswerable"

    examples, source = _examples(str(path), info, data, split, no_answer)
    limit = max_examples or eval_config.max_examples
    examples = examples[:limit] if limit else examples
    if not examples:
        raise EvalError(
            f"{source}: there are no examples to evaluate.", hint="pass a data file with records via --data"
        )

    predictor = load_predictor(folder, device=device)
    decoding: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens or eval_config.max_new_tokens,
        batch_size=batch_size or eval_config.batch_size,
        temperature=eval_config.temperature,
        top_p=eval_config.top_p,
        seed=config.train.seed if config is not None else 0,
        extractive=predictor.extractive_for(extractive),
    )
    scoring: dict[str, Any] = dict(decoding=decoding, no_answer=no_answer, lang=eval_config.lang)
    scoring.update(perplexity=perplexity, bleu_tokenize=eval_config.bleu_tokenize)
    records, metrics = score_examples(predictor, examples, **scoring)
    base_records = base_metrics = None
    if compare_base:
        if predictor.has_adapter:
            with predictor.base_model():
                base_records, base_metrics = score_examples(predictor, examples, **scoring)
        elif info is not None and info.is_merged:
            del predictor  # free the merged weights before loading the base
            base_records, base_metrics = score_examples(
                load_predictor(folder, device=device, adapter=False), examples, **scoring
            )
        else:
            raise EvalError(
                f"--compare base: '{path}' is a plain model folder, so there is no base model to compare with.",
                hint="evaluate a run folder (or merged folder) written by lorakit",
            )

    root = info.root if info is not None else folder
    about = {
        "model": str(folder),
        "source": source,
        "split": None if data is not None else split,
        "data": data,
        "max_examples": limit or None,
        "decoding": decoding,
    }
    eval_root = root / "eval"
    with staging(out.parent if out is not None else eval_root) as tmp:
        write_eval_outputs(
            tmp,
            records=records,
            metrics=metrics,
            base_records=base_records,
            base_metrics=base_metrics,
            loss_history=read_metrics(info.paths.metrics) if info is not None else None,
            title=f"{root.resolve().name}: {source}",
            about=about,
        )
        final = publish_to(tmp, out) if out is not None else publish_new(tmp, eval_root, label_for(split, data))
    if out is None:
        write_index(eval_root, final.name)
    summary = json.loads((final / "metrics.json").read_text(encoding="utf-8"))
    index = None if out is not None else eval_root / "index.json"
    if verbose:
        _log_summary(summary, final, index)
    return {**summary, "folder": str(final)}


def _log_summary(summary: dict[str, Any], folder: Path, index: Path | None = None) -> None:
    from .history import summary_lines

    for text in summary_lines(summary, folder, index):
        logger.info(text)


# --- predictions made elsewhere --------------------------------------------------------------------


def _read_predictions(path: Path) -> dict[str, str]:
    """{id: prediction} from a JSONL of {"id", "prediction"} or an official SQuAD {"qid": "answer"} file."""
    if not path.is_file():
        raise EvalError(f"predictions file '{path}' does not exist.", hint="check the path")
    text = path.read_text(encoding="utf-8")
    whole = None
    if path.suffix.lower() != ".jsonl":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            pass
    if isinstance(whole, dict) and "prediction" in whole:  # a JSONL file with a single line
        whole = [whole]
    if isinstance(whole, dict):  # the official SQuAD format
        for key, value in whole.items():
            if not isinstance(value, str):
                raise EvalError(
                    f"{path}: the prediction for id '{key}' is {type(value).__name__}, not text.",
                    hint='a SQuAD prediction file maps each question id to its answer text: {"id": "answer"}',
                )
        return dict(whole)
    rows = whole if isinstance(whole, list) else None
    if rows is None:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise EvalError(
                    f"{path}, line {number}: not valid JSON ({exc.msg}).",
                    hint='write one object per line: {"id": "...", "prediction": "..."}',
                ) from None
    out: dict[str, str] = {}
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or "id" not in row or not isinstance(row.get("prediction"), str):
            raise EvalError(
                f"{path}, record {number}: needs the fields 'id' and 'prediction' (text).",
                hint='write one object per line: {"id": "...", "prediction": "..."}',
            )
        key = str(row["id"])
        if key in out:
            raise EvalError(f"{path}, record {number}: id '{key}' appears twice.", hint="keep one prediction per id")
        out[key] = row["prediction"]
    return out


def _few(ids: list[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:5])
    return shown + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")


def score_predictions(
    predictions_file: str | os.PathLike[str],
    data_file: str | os.PathLike[str],
    *,
    out_dir: str | os.PathLike[str] | None = None,
    no_answer: str = "unanswerable",
    verbose: bool = True,
) -> dict[str, Any]:
    """Score predictions made elsewhere against a dataset's references (`lorakit.score`, `lorakit score`).

    Args:
        predictions_file: JSONL of {"id", "prediction"}, or an official SQuAD {"id": "answer"} file.
        data_file: the dataset holding the reference answers (any format lorakit reads).
        out_dir: where metrics.json, predictions.jsonl and the reports go; default
            `<predictions file stem>-eval/` beside the predictions file.
        no_answer: the text that means "no answer" (SQuAD v2 unanswerable questions).
        verbose: log the summary lines (logger "lorakit.evaluate", level INFO).

    Returns:
        What metrics.json holds ("n", "adapter": the metrics), plus "folder": where the outputs went.

    Raises:
        EvalError: unreadable predictions, or ids that do not match the data (both ways).
        DataError: the data file cannot be read.
    """
    from ..data import load_examples
    from .metrics import corpus_metrics
    from .report import write_eval_outputs

    predictions_file = Path(predictions_file)
    predictions = _read_predictions(predictions_file)
    # keep every record: dropping duplicates would make their ids look unknown
    examples = load_examples(str(data_file), no_answer=no_answer, deduplicate=False).examples
    by_id: dict[str, Example] = {}
    for example in examples:
        if example.id in by_id:
            raise EvalError(
                f"{data_file}: the id '{example.id}' is used by two records ({example.source}), so predictions cannot be matched.",
                hint="give every record a distinct id",
            )
        by_id[example.id] = example
    missing = [i for i in by_id if i not in predictions]
    unknown = [i for i in predictions if i not in by_id]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"{len(missing)} example id(s) have no prediction: {_few(missing)}")
        if unknown:
            parts.append(f"{len(unknown)} predicted id(s) are not in the data: {_few(unknown)}")
        raise EvalError(
            f"{predictions_file} does not match {data_file}: {'; '.join(parts)}.",
            hint="predict every example of this data file, using the ids the data file gives its records",
        )
    records = [_scored_record(example, predictions[example.id], no_answer=no_answer) for example in examples]
    metrics = corpus_metrics(
        [r["prediction"] for r in records], [r["references"] for r in records], no_answer=no_answer
    )
    out = Path(out_dir) if out_dir else predictions_file.parent / f"{predictions_file.stem}-eval"
    paths = write_eval_outputs(
        out, records=records, metrics=metrics, title=f"{predictions_file.name} on {Path(data_file).name}"
    )
    summary = json.loads(paths["metrics"].read_text(encoding="utf-8"))
    if verbose:
        _log_summary(summary, paths["report_md"].parent)
    return {**summary, "folder": str(paths["report_md"].parent)}
