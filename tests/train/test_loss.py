"""Loss only where labelled: the same loss and gradients as the model's own, far fewer logits."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    TrainingArguments,
)

from lorakit.config import LoraConfig
from lorakit.models.lora import apply_lora
from lorakit.train import loss as lossmod
from lorakit.train.generation_eval import GenerationEvalTrainer

VOCAB = 97
EPS = torch.finfo(torch.float32).eps
SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=None,
    eos_token_id=1,
)


def lora_model(config_class=LlamaConfig, model_class=LlamaForCausalLM, *, gc=False, attn="sdpa", **extra):
    """A tiny random model with LoRA on all linear layers; B randomised so every A gets a gradient."""
    torch.manual_seed(0)
    model = model_class(config_class(**SHAPE, **extra))
    model.config._attn_implementation = attn
    model = apply_lora(
        model, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"), "causal", gradient_checkpointing=gc
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    model.train()  # train mode: gradient checkpointing is on; dropout is 0 everywhere
    return model


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_close(a: torch.Tensor, b: torch.Tensor, k: float = 256.0):
    """Equal up to float32 rounding at the tensors' scale."""
    tol = k * EPS * max(a.abs().max().item(), b.abs().max().item(), 1e-30)
    assert (a - b).abs().max().item() <= tol, ((a - b).abs().max().item(), tol)


def assert_grads_close(ga: dict, gb: dict):
    assert ga.keys() == gb.keys() and len(ga) > 0
    for name in ga:
        assert ga[name].abs().max() > 0, name  # a gradient that could differ
        assert_close(ga[name], gb[name])


def shift(labels: torch.Tensor) -> torch.Tensor:
    """HF labels (a target at each position) -> shift_labels (the target predicted from each position)."""
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)


def padded_batch():
    """Two examples, the second right-padded; the last tokens of each are labelled (the answer)."""
    torch.manual_seed(1)
    ids = torch.randint(2, VOCAB, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    ids[1, 8:] = 0
    labels = torch.full((2, 12), -100)
    labels[0, 8:] = ids[0, 8:]
    labels[1, 5:8] = ids[1, 5:8]
    return ids, mask, labels


def contract(ids, mask, labels, position_ids=None, *, shifted=False):
    """The collator contract's keys from HF labels (or from shift_labels when `shifted`)."""
    shift_labels = labels if shifted else shift(labels)
    batch = {"input_ids": ids, "attention_mask": mask, "shift_labels": shift_labels, "labels": shift_labels}
    if position_ids is not None:
        batch["position_ids"] = position_ids
    return batch


@pytest.mark.parametrize("gc", [False, True])
def test_labelled_path_equals_the_models_own_loss_and_gradients(gc):
    model = lora_model(gc=gc)
    ids, mask, labels = padded_batch()
    reference = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    ref_grads = grads(model, reference)

    batch = contract(ids, mask, labels)
    assert lossmod.plain_projection(model, ids)[0]
    loss, outputs = lossmod.causal_loss(model, batch)
    assert "logits" not in outputs  # the labelled path never builds the full logits
    assert_close(loss.detach(), reference.detach())
    assert_grads_close(grads(model, loss), ref_grads)


def packed_and_unpacked():
    """Examples of 5 and 6 tokens: one packed row (block-diagonal mask, restarting positions, one pad
    slot that attends only itself) and the same two examples right-padded in two rows."""
    torch.manual_seed(2)
    a, b = torch.randint(2, VOCAB, (5,)), torch.randint(2, VOCAB, (6,))
    la, lb = torch.full((5,), -100), torch.full((6,), -100)
    la[3:], lb[2:] = a[3:], b[2:]

    unpacked_ids = torch.zeros(2, 6, dtype=torch.long)
    unpacked_ids[0, :5], unpacked_ids[1] = a, b
    unpacked_mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1] * 6])
    unpacked_labels = torch.full((2, 6), -100)
    unpacked_labels[0, :5], unpacked_labels[1] = la, lb

    ids = torch.cat([a, b, torch.zeros(1, dtype=torch.long)])[None]
    allowed = torch.zeros(12, 12, dtype=torch.bool)
    allowed[:5, :5] = torch.ones(5, 5).tril().bool()
    allowed[5:11, 5:11] = torch.ones(6, 6).tril().bool()
    allowed[11, 11] = True
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 0]])
    shift_labels = torch.cat([shift(la[None])[0], shift(lb[None])[0], torch.tensor([-100])])[None]
    packed = contract(ids, allowed[None, None], shift_labels, position_ids, shifted=True)
    return packed, contract(unpacked_ids, unpacked_mask, unpacked_labels)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("labelled_logits_only", [True, False])
def test_packed_row_equals_the_examples_unpacked(attn, labelled_logits_only):
    model = lora_model(attn=attn)
    packed, unpacked = packed_and_unpacked()
    n = int((unpacked["shift_labels"] != -100).sum())
    assert n == int((packed["shift_labels"] != -100).sum()) == 6
    reference, _ = lossmod.causal_loss(model, unpacked, n)
    ref_grads = grads(model, reference)
    loss, _ = lossmod.causal_loss(model, packed, n, labelled_logits_only=labelled_logits_only)
    assert_close(loss.detach(), reference.detach())
    assert_grads_close(grads(model, loss), ref_grads)


def test_boolean_mask_becomes_additive_in_the_compute_dtype():
    allowed = torch.tensor([[True, False], [True, True]])[None, None]
    mask = lossmod.additive_mask(allowed, torch.bfloat16)
    assert mask.dtype == torch.bfloat16
    assert mask[0, 0].tolist() == [[0.0, torch.finfo(torch.bfloat16).min], [0.0, 0.0]]
    two_d = torch.ones(1, 2, dtype=torch.long)
    assert lossmod.additive_mask(two_d, torch.float32) is two_d


def test_chunks_bound_the_logits_and_are_recomputed_in_backward(monkeypatch):
    model = lora_model()
    ids, mask, labels = padded_batch()
    batch = contract(ids, mask, labels)
    whole = lossmod.labelled_loss(model, batch)
    whole_grads = grads(model, whole)

    rows = 3
    monkeypatch.setattr(lossmod, "LOGIT_CHUNK_BYTES", 4 * VOCAB * rows)
    seen: list[int] = []
    head = model.get_base_model().get_output_embeddings()
    handle = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[0]))
    try:
        chunked = lossmod.labelled_loss(model, batch)
        forward_calls = len(seen)
        chunked_grads = grads(model, chunked)
    finally:
        handle.remove()
    labelled = int((batch["shift_labels"] != -100).sum())
    assert forward_calls == math.ceil(labelled / rows) > 1
    assert len(seen) == 2 * forward_calls  # each chunk's logits recomputed in backward, not kept
    assert max(seen) <= rows and sum(seen[:forward_calls]) == labelled
    assert_close(chunked.detach(), whole.detach())
    assert_grads_close(chunked_grads, whole_grads)


def test_num_items_in_batch_scales_as_the_trainer_does():
    model = lora_model()
    ids, mask, labels = padded_batch()
    batch = contract(ids, mask, labels)
    labelled = int((batch["shift_labels"] != -100).sum())
    total = 3 * labelled  # as if the step's other micro-batches held twice as many labels
    reference = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(total))
    loss, _ = lossmod.causal_loss(model, batch, torch.tensor(total))
    mean, _ = lossmod.causal_loss(model, batch)
    assert_close(loss.detach(), reference.loss.detach())
    assert_close(loss.detach() * total, mean.detach() * labelled)


@pytest.mark.parametrize(
    ("config_class", "model_class", "extra"),
    [
        (Gemma2Config, Gemma2ForCausalLM, {"final_logit_softcapping": 30.0, "head_dim": 8}),
        (GraniteConfig, GraniteForCausalLM, {"logits_scaling": 4.0}),
    ],
)
@pytest.mark.parametrize("config_check", [True, False])
def test_logits_that_are_not_a_plain_projection_keep_the_models_loss(
    monkeypatch, caplog, config_class, model_class, extra, config_check
):
    if not config_check:  # the numeric self-check alone must see the scaling or the cap
        monkeypatch.setattr(lossmod, "_LOGIT_TRANSFORMS", ())
    model = lora_model(config_class, model_class, attn="eager", **extra)
    ids, mask, labels = padded_batch()
    with caplog.at_level(logging.INFO, logger="lorakit.train"):
        supported, reason = lossmod.plain_projection(model, ids)
    assert not supported
    assert "model's own loss" in caplog.text and reason in caplog.text
    reference = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    ref_grads = grads(model, reference)
    loss, outputs = lossmod.causal_loss(model, contract(ids, mask, labels))
    assert "logits" in outputs  # it went through the model
    assert_close(loss.detach(), reference.detach())
    assert_grads_close(grads(model, loss), ref_grads)


class ContractCollator:
    """Right-pads causal examples and emits the contract keys (shift_labels, labels = the same)."""

    def __call__(self, features):
        length = max(len(f["input_ids"]) for f in features)
        ids = torch.zeros(len(features), length, dtype=torch.long)
        mask = torch.zeros(len(features), length, dtype=torch.long)
        labels = torch.full((len(features), length), -100)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n], mask[row, :n] = torch.tensor(f["input_ids"]), 1
            labels[row, :n] = torch.tensor(f["labels"])
        return contract(ids, mask, labels)


def test_trainer_trains_and_evaluates_on_the_labelled_path(tmp_path, caplog):
    model = lora_model(gc=True)
    with torch.no_grad():  # as tests/tiny.py: a std-0.02 head is too flat for LoRA to learn quickly
        model.get_base_model().get_output_embeddings().weight.mul_(20.0)
    torch.manual_seed(3)
    examples = []
    for i in range(8):  # a random prompt, then a fixed answer to learn
        prompt = torch.randint(2, VOCAB, (6 + i % 3,)).tolist()
        answer = [5, 6, 7, 1]
        examples.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=30,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=5e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        remove_unused_columns=False,
        prediction_loss_only=True,
    )
    trainer = GenerationEvalTrainer(
        model=model,
        args=args,
        train_dataset=examples,
        eval_dataset=examples[:4],
        data_collator=ContractCollator(),
        labelled_logits_only=True,
    )
    with caplog.at_level(logging.INFO, logger="lorakit.train"):
        before = trainer.evaluate()["eval_loss"]
        trainer.train()
        after = trainer.evaluate()["eval_loss"]
    assert "logits only at labelled positions" in caplog.text
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.5 * losses[0] and after < 0.5 * before

    batch = ContractCollator()(examples[:4])
    model.eval()
    loss, logits, _ = trainer.prediction_step(model, batch, prediction_loss_only=True)
    expected, _ = lossmod.causal_loss(model, batch)
    assert logits is None
    assert_close(loss, expected.detach())
