"""Tiny models and tokenizers built offline from config, for tests. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Question: Who wrote the book? Answer: the author. Context: passage text here.",
    "Human: hello there Assistant: hi, how can I help you today?",
    "### Question: ### Answer: ### Instruction: ### Input: ### Response: ### Context:",
    "The quick brown fox jumps over the lazy dog 0123456789 , . ; : ! ? ' \" ( ) [ ] { } - _",
    "پایتخت ایران تهران است. کتاب را چه کسی نوشت؟",
    "বাংলাদেশের রাজধানী ঢাকা। আমি ভালো আছি।",
    "system user assistant You are a helpful assistant.",
]

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer(out_dir: Path, *, chat_template: bool = True, pad_is_eos: bool = True):
    """A byte-level BPE tokenizer (handles any Unicode) trained on a tiny corpus, saved to out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        bos_token=None,
        unk_token="<unk>",
        pad_token="<|im_end|>" if pad_is_eos else "<|endoftext|>",
    )
    if chat_template:
        fast.chat_template = CHATML
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_llama(out_dir: Path, *, seed: int = 0, **tokenizer_kwargs) -> Path:
    """A 2-layer Llama with random weights plus the tiny tokenizer, saved like a hub checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(out_dir, **tokenizer_kwargs)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a std-0.02 output layer is too flat for LoRA to ever predict confidently
        model.lm_head.weight.mul_(20.0)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    return out_dir


def build_tiny_t5(out_dir: Path, *, seed: int = 0) -> Path:
    """A 2-layer T5 (encoder-decoder) with random weights plus the tiny tokenizer."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = build_tokenizer(out_dir, chat_template=False, pad_is_eos=False)
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = T5ForConditionalGeneration(config)
    model.save_pretrained(out_dir)
    return out_dir


SYSTEM = "Answer briefly."


def make_run(
    root: Path,
    base_dir: Path,
    *,
    template_name: str = "question_answer",
    seed: int = 1,
    quantization: str = "none",
    task_type: str = "causal",
    extractive: bool = False,
) -> Path:
    """A run folder as `lorakit train` writes it, with a random non-zero LoRA adapter (no training);
    extractive: the run keeps answers inside spans of their passage (lorakit.json's decoding)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from lorakit.config_loading import validate_config
    from lorakit.files import atomic_write_text
    from lorakit.models.identity import base_model_identity
    from lorakit.prompting.templates import resolve_template
    from lorakit.run_metadata import write_metadata
    from lorakit.runs import RunPaths

    config = validate_config(
        {
            "data": {"path": "unused.jsonl"},
            "model": {"name_or_path": str(base_dir), "quantization": quantization},
            "template": {"name": template_name, "system_prompt": SYSTEM},
        }
    )
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    template = resolve_template(config.template, tokenizer, task_type)
    seq2seq = task_type == "seq2seq"
    model = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_pretrained(base_dir, dtype=torch.float32)
    targets = ["q", "v", "o"] if seq2seq else ["q_proj", "v_proj", "o_proj"]
    peft_model = get_peft_model(
        model,
        LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM"),
    )
    torch.manual_seed(seed)
    with torch.no_grad():  # lora_B starts at zero; make the adapter change the outputs clearly
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.3)
    paths = RunPaths(root)
    peft_model.save_pretrained(paths.adapter)
    tokenizer.save_pretrained(paths.adapter)
    write_metadata(
        paths.adapter,
        base=base_model_identity(config.model),
        task_type=task_type,
        template=template,
        precision="float32",
        max_length=256,
        extractive=extractive,
        no_answer=config.data.no_answer,
    )
    atomic_write_text(paths.config, config.to_yaml())
    return root
