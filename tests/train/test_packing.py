"""Packing: several examples per row, a shared passage once; the same logits, loss and gradients."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorakit.config import LoraConfig
from lorakit.models.lora import apply_lora
from lorakit.prompting.encoding import IGNORE
from lorakit.prompting.packing import (
    MIN_SHARED_TOKENS,
    PackedCollator,
    ShiftedLabelsCollator,
    build_units,
    group_by_prefix,
    plan_micro_batches,
)
from lorakit.train.loss import causal_loss, model_inputs

EPS = torch.finfo(torch.float32).eps


def feature(prompt: list[int], answer: list[int]) -> dict:
    ids = prompt + answer
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORE] * len(prompt) + answer}


def qa_features(seed: int = 0, vocab: int = 500, header: int = 3) -> list[dict]:
    """Three passages (30, 24 and 40 tokens) with 4, 3 and 1 questions, after a header they all share."""
    rng = random.Random(seed)
    header_ids = [7 + i for i in range(header)]
    out = []
    for passage_len, questions in ((30, 4), (24, 3), (40, 1)):
        passage = header_ids + [rng.randrange(10, vocab) for _ in range(passage_len)]
        for _ in range(questions):
            question = [rng.randrange(10, vocab) for _ in range(rng.randrange(3, 7))]
            answer = [rng.randrange(10, vocab) for _ in range(rng.randrange(1, 4))] + [2]
            out.append(feature(passage + question, answer))
    rng.shuffle(out)
    return out


# --- planning ------------------------------------------------------------------------------------


def test_questions_on_one_passage_share_it_and_no_shared_position_predicts_a_label():
    features = qa_features()
    groups = group_by_prefix(features)
    sizes = sorted(len(g) for g in groups)
    assert sizes == [1, 3, 4]  # the common 3-token header alone is not worth sharing
    # a long common header (a system prompt) does not chain the passages into one group
    assert sorted(len(g) for g in group_by_prefix(qa_features(header=20))) == [1, 3, 4]
    for unit in build_units(features, max_length=512, share=True):
        assert len(unit.branches) == 1 or len(unit.prefix) >= MIN_SHARED_TOKENS
        for ids, _targets in unit.branches:
            assert ids  # every member keeps a token of its own
    # a prefix position never predicts a labelled token: with train-on-prompt labels nothing is shared
    everything = [dict(f, labels=list(f["input_ids"])) for f in features]
    assert all(len(g) == 1 for g in group_by_prefix(everything))


def test_micro_batches_cover_each_example_once_within_both_budgets():
    features = qa_features()
    for budget in (10_000, 80):
        batches = plan_micro_batches(
            features, micro_batch_size=3, batch_tokens=budget, max_length=64, share=True, seed=1
        )
        assert sorted(i for b in batches for i in b) == list(range(len(features)))
        assert all(len(b) <= 3 for b in batches)
        for b in batches:
            units = build_units([features[i] for i in b], 64, share=True)
            assert len(b) == 1 or sum(map(len, units)) <= budget
            assert all(len(u) <= 64 for u in units)
    again = plan_micro_batches(features, micro_batch_size=3, batch_tokens=10_000, max_length=64, share=True, seed=1)
    assert again == plan_micro_batches(
        features, micro_batch_size=3, batch_tokens=10_000, max_length=64, share=True, seed=1
    )


@pytest.mark.parametrize("share", [True, False])
def test_each_token_sees_exactly_its_own_example_in_order(share):
    features = qa_features()
    batch = PackedCollator(pad_token_id=0, max_length=64, share=share)([features])
    ids, mask, pos, targets = batch["input_ids"], batch["attention_mask"], batch["position_ids"], batch["shift_labels"]
    assert batch["labels"] is targets and ids.shape[1] <= 64
    seen = []  # (visible ids in position order, target) for every real token
    for r in range(ids.shape[0]):
        real = mask[r, 0].diagonal()
        for q in torch.nonzero(real).flatten().tolist():
            keys = torch.nonzero(mask[r, 0, q]).flatten()
            assert pos[r, keys].tolist() == list(range(int(pos[r, q]) + 1))  # positions 0..p, each once
            seen.append((tuple(ids[r, keys].tolist()), int(targets[r, q])))
    expected = []
    for f in features:
        next_labels = [*f["labels"][1:], IGNORE]
        expected += [(tuple(f["input_ids"][: t + 1]), next_labels[t]) for t in range(len(f["input_ids"]))]
    labelled = sorted(x for x in seen if x[1] != IGNORE)
    assert labelled == sorted(x for x in expected if x[1] != IGNORE)
    # shared positions appear once, so only the unlabelled part shrinks
    assert set(seen) == set(expected) and (len(seen) < len(expected)) == share


# --- equality with unpacked training on a real (tiny) model ---------------------------------------


@pytest.fixture(scope="module")
def lora_model(tiny_llama_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model = apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"), "causal")
    for name, param in model.named_parameters():  # LoRA B starts at zero: give the adapter an effect
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    return model.eval()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_logits_equal_each_example_alone(lora_model, attention):
    features = qa_features()
    base = lora_model.get_base_model()
    base.config._attn_implementation = attention
    packed = PackedCollator(pad_token_id=0, max_length=64, share=True)([features])
    with torch.no_grad():
        logits = lora_model(**model_inputs(lora_model, packed)).logits
        scale = logits.abs().max().item()
        mask, ids, pos = packed["attention_mask"], packed["input_ids"], packed["position_ids"]
        for f in features:
            alone = lora_model(input_ids=torch.tensor([f["input_ids"]])).logits[0]
            n = len(f["input_ids"])
            # find the example's last token: the real token whose visible ids are exactly the example
            hits = [
                (r, q)
                for r in range(ids.shape[0])
                for q in torch.nonzero(mask[r, 0].diagonal()).flatten().tolist()
                if int(pos[r, q]) == n - 1 and ids[r, torch.nonzero(mask[r, 0, q]).flatten()].tolist() == f["input_ids"]
            ]
            assert len(hits) == 1
            r, last = hits[0]
            rows = torch.nonzero(mask[r, 0, last]).flatten()  # the example's own positions, in order
            # the same products summed in another order: float32 rounding at the logits' scale
            assert (logits[r, rows] - alone).abs().max().item() <= 64 * EPS * max(scale, 1.0)
    base.config._attn_implementation = "sdpa"


def unpacked_loss_and_grads(model, features):
    batch = ShiftedLabelsCollator(pad_token_id=0)(features)
    model.zero_grad()
    loss, _ = causal_loss(model, batch, labelled_logits_only=False)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("labelled_only", [True, False])
def test_packed_loss_and_gradients_equal_unpacked(lora_model, share, labelled_only):
    features = qa_features(seed=3)
    want_loss, want_grads = unpacked_loss_and_grads(lora_model, features)
    batch = PackedCollator(pad_token_id=0, max_length=64, share=share)([features])
    lora_model.zero_grad()
    loss, _ = causal_loss(lora_model, batch, labelled_logits_only=labelled_only)
    loss.backward()
    assert abs(loss.item() - want_loss) <= 64 * EPS * max(abs(want_loss), 1.0)
    for name, grad in want_grads.items():
        got = dict(lora_model.named_parameters())[name].grad
        assert (got - grad).abs().max().item() <= 256 * EPS * max(grad.abs().max().item(), 1e-3), name


# --- end to end -----------------------------------------------------------------------------------


@pytest.fixture()
def squad_file(tmp_path):
    words = [
        "the",
        "river",
        "city",
        "bridge",
        "north",
        "tower",
        "old",
        "king",
        "built",
        "stone",
        "market",
        "long",
        "year",
    ]
    rng = random.Random(5)
    paragraphs = []
    for p in range(2):
        context = " ".join(rng.choice(words) for _ in range(40))
        qas = []
        for q in range(4):
            answer = context.split()[5 * q + 2]
            qas.append(
                {
                    "id": f"p{p}q{q}",
                    "question": f"Which word {q} in part {p}?",
                    "answers": [{"text": answer, "answer_start": context.index(answer)}],
                }
            )
        paragraphs.append({"context": context, "qas": qas})
    path = tmp_path / "squad.json"
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "T", "paragraphs": paragraphs}]}))
    return path


def first_step(tmp_path, squad_file, model_dir, packing):
    from lorakit.config_loading import validate_config
    from lorakit.runs import read_metrics
    from lorakit.train.recipe import train

    config = validate_config(
        {
            "data": {"path": str(squad_file), "split": {"train": 1.0, "validation": 0.0, "test": 0.0}},
            "model": {"name_or_path": str(model_dir)},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "template": {"max_length": 256},
            "train": {
                "output_dir": str(tmp_path / "runs"),
                "run_name": packing,
                "micro_batch_size": 8,  # the whole file: both runs take the same examples in step 1
                "max_steps": 1,
                "logging_steps": 1,
                "packing": packing,
            },
        }
    )
    paths = train(config)
    return next(r for r in read_metrics(paths.metrics) if "loss" in r)


def test_training_packed_logs_the_unpacked_loss_and_gradient_norm(tmp_path, squad_file, tiny_llama_dir, caplog):
    caplog.set_level("INFO", logger="lorakit.train")
    off = first_step(tmp_path, squad_file, tiny_llama_dir, "off")
    passages = first_step(tmp_path, squad_file, tiny_llama_dir, "passages")
    assert "packing: passages: 8 examples in 1 micro-batches" in caplog.text
    fewer = float(caplog.text.split("x fewer)")[0].rsplit("(", 1)[1])
    assert fewer > 1.5  # two passages asked four questions each: most prompt tokens are computed once
    assert abs(passages["loss"] - off["loss"]) <= 64 * EPS * max(abs(off["loss"]), 1.0)
    # the norm adds up every LoRA gradient entry, each rounded differently in the two layouts
    assert abs(passages["grad_norm"] - off["grad_norm"]) <= 1024 * EPS * max(off["grad_norm"], 1e-3)
