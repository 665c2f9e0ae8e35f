"""What a LoRA training step holds in memory, predicted from the model's shape alone, and measured.

"Peak memory" here is the peak of live tensor storage bytes during training steps (weights,
adapters, gradients, optimizer states, saved activations, logits and their gradients). It is the
quantity a CUDA caching allocator reports as `torch.cuda.max_memory_allocated()`. On the CPU it is
measured exactly by `lorakit.measure.TensorMemoryTracker`, a dispatch mode that sees every tensor
an operation creates and when its storage is freed. What a process needs beyond that (the CUDA context, the
allocator's cached-but-free blocks, the Python and library code) is predicted separately as
"overhead".

The activation model counts, per token and per layer, the tensors autograd saves in a
transformers decoder layer with peft LoRA adapters on frozen weights. Frozen linear layers save
nothing for their own backward; the LoRA branch saves its (dropped-out) input; RMSNorm saves its
float32 input; attention saves q, k, v and its output (plus the probabilities with eager
attention). The counts were read off torch 2.13 / transformers 5 with saved-tensor hooks and are
checked against measured peaks in tests/plan/test_plan.py and bench/bench_plan_accuracy.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import LoraConfig, ModelConfig, TrainConfig
from ..config import default_of as config_default
from .shape import ModelShape

GIB = 1024**3

# Leaf names of linear layers by the role they play in a transformer block.
ATTN_IN = {
    "q_proj",
    "k_proj",
    "v_proj",
    "q",
    "k",
    "v",
    "query_key_value",
    "c_attn",
    "qkv_proj",
    "Wqkv",
    "query",
    "key",
    "value",
}
ATTN_OUT = {"o_proj", "o", "out_proj", "dense", "attn_out"}
MLP_IN = {"gate_proj", "up_proj", "wi", "wi_0", "wi_1", "fc1", "dense_h_to_4h", "c_fc", "w1", "w3", "gate_up_proj"}
MLP_OUT = {"down_proj", "wo", "fc2", "dense_4h_to_h", "w2"}


@dataclass
class MemoryEstimate:
    """Predicted peak bytes by part; `tensor_peak` is what max_memory_allocated would report."""

    parts: dict[str, int]
    overhead: int
    notes: list[str] = field(default_factory=list)

    @property
    def tensor_peak(self) -> int:
        return sum(self.parts.values())

    @property
    def total(self) -> int:
        return self.tensor_peak + self.overhead


@dataclass
class TimeEstimate:
    flops_per_token: float
    device_flops: float  # sustained FLOP/s assumed for training on the device
    seconds_per_step: float
    formula: str


# --- the step: what is held ------------------------------------------------------------------


def lora_modules(shape: ModelShape, target_modules) -> dict[str, tuple[int, int, int]]:
    """The linear layers LoRA wraps, by leaf name, using modeling's rules for auto / all-linear."""
    from ..errors import ModelError
    from ..models.lora import AUTO_TARGETS

    names = set(shape.linear_layers)
    if target_modules == "all-linear":
        chosen = names
    elif target_modules == "auto":
        family = next((f for f in AUTO_TARGETS if all(n in names for n in f)), None)
        if family is None:
            raise ModelError(
                f"lora.target_modules=auto does not know the attention layers of this {shape.model_type} model.",
                hint=f"set lora.target_modules to a list of these linear modules: {', '.join(sorted(names))}; or use all-linear",
            )
        chosen = set(family)
    else:
        unknown = [n for n in target_modules if n.rsplit(".", 1)[-1] not in names]
        if unknown:
            raise ModelError(
                f"lora.target_modules: {', '.join(unknown)} not found in this {shape.model_type} model.",
                hint=f"choose from its linear modules: {', '.join(sorted(names))} (or auto / all-linear)",
            )
        chosen = {n.rsplit(".", 1)[-1] for n in target_modules}
    return {n: shape.linear_layers[n] for n in sorted(chosen)}


def lora_param_count(shape: ModelShape, modules: dict, r: int, use_dora: bool = False) -> int:
    return sum((r * (i + o) + (o if use_dora else 0)) * n for i, o, n in modules.values())


def layer_activation_bytes(
    shape, modules, *, r, dropout, attn, seq, act_bytes, layers, checkpointing
) -> tuple[float, float]:
    """Bytes per token (saved for backward by `layers` layers, recomputed for one layer in backward
    when checkpointing). See the module docstring for what is counted."""
    h, i, nh = shape.hidden_size, shape.intermediate_size, shape.num_heads
    q_dim, kv_dim = nh * shape.head_dim, shape.num_kv_heads * shape.head_dim
    per_layer_modules = modules
    roles = {n: _role(n) for n in per_layer_modules}
    eager = attn == "eager"
    # RMSNorm upcasts: its input and 1/rms are saved in float32, twice per layer
    norm = (2 * h + 2) * 4
    mlp = (3 if shape.gated_mlp else 2) * i
    core = (2 * q_dim + 2 * kv_dim + mlp) * act_bytes + nh * 4
    if eager:  # the probabilities (softmax in float32, then cast) instead of the log-sum-exp
        core += nh * seq * (4 + (act_bytes if act_bytes != 4 else 0)) - nh * 4
    lora = r * len(per_layer_modules) * act_bytes
    shared = {"attn_in": h, "attn_out": q_dim if eager else 0, "mlp_in": h, "mlp_out": i}
    if dropout > 0:  # each adapter saves its own dropout output and mask; the shared input is freed
        lora += sum(2 * per_layer_modules[n][0] for n in per_layer_modules) * act_bytes
    else:  # the adapters save the block input they share (once per role), unknown roles their own
        lora += sum(shared[role] for role in set(roles.values()) if role != "other") * act_bytes
        lora += sum(per_layer_modules[n][0] for n, role in roles.items() if role == "other") * act_bytes
    full = norm + core + lora
    if checkpointing:  # each layer keeps only its input; layers are recomputed one at a time
        return layers * h * act_bytes, full
    return layers * full, 0.0


def _role(name: str) -> str:
    for role, names in (("attn_in", ATTN_IN), ("attn_out", ATTN_OUT), ("mlp_in", MLP_IN), ("mlp_out", MLP_OUT)):
        if name in names:
            return role
    return "other"


def weight_bytes(shape: ModelShape, quantization: str, weight_dtype_bytes: int) -> tuple[int, str]:
    """Bytes of the frozen base weights, and how they are stored."""
    if quantization == "none":
        return shape.n_params * weight_dtype_bytes, f"{weight_dtype_bytes * 8}-bit floats"
    linear = shape.linear_params
    # prepare_model_for_kbit_training keeps every parameter it does not quantize in float32
    rest = (shape.n_params - linear) * 4
    if quantization == "4bit":
        # NF4: 4 bits per weight, one 8-bit absmax per 64 weights, one fp32 constant per 256 blocks
        per_weight = 0.5 + 1 / 64 + 4 / (64 * 256)
        return int(linear * per_weight + rest), "NF4 4-bit, double-quantized (embeddings, norms, head in fp32)"
    rows = sum(o * n for _, o, n in shape.linear_layers.values())
    return int(linear + rows * 4 + rest), "int8 with per-row fp32 scales (embeddings, norms, head in fp32)"


OPTIMIZER_STATE_BYTES = [  # (substring of the optimizer name, bytes per trainable parameter, description)
    ("8bit", 2, "two 8-bit states"),
    ("adafactor", 4, "factored second moment (about one fp32 state)"),
    ("sgd", 0, "no state"),
    ("adam", 8, "two fp32 states (AdamW)"),
    ("lion", 4, "one fp32 state"),
]


def optimizer_state_bytes(optimizer: str) -> tuple[int, str]:
    for key, nbytes, what in OPTIMIZER_STATE_BYTES:
        if key in optimizer.lower():
            return nbytes, what + (" in paged (CPU-spillable) memory" if "paged" in optimizer.lower() else "")
    return 8, f"unknown optimizer '{optimizer}': assumed two fp32 states like AdamW"


def estimate_step_memory(
    shape: ModelShape,
    *,
    micro_batch: int,
    seq_len: int,
    target_len: int | None = None,
    lora_r: int = config_default(LoraConfig, "r"),
    lora_dropout: float = config_default(LoraConfig, "dropout"),
    target_modules=config_default(LoraConfig, "target_modules"),
    use_dora: bool = config_default(LoraConfig, "use_dora"),
    quantization: str = config_default(ModelConfig, "quantization"),
    weight_bytes_per_param: int = 4,
    act_bytes: int = 4,
    optimizer: str = config_default(TrainConfig, "optimizer"),
    gradient_checkpointing: bool = config_default(TrainConfig, "gradient_checkpointing"),
    attn: str = "sdpa",
    device: str = "cpu",
    labelled_logits_only: bool = config_default(TrainConfig, "labelled_logits_only"),
    labelled_tokens: int | None = None,
    packed: bool = False,
) -> MemoryEstimate:
    """Peak memory of one LoRA training step, by part. `target_len` is the decoder length of a
    seq2seq model (its labels); causal models use `seq_len` for everything.

    `micro_batch` x `seq_len` is the batch tensor's shape: for packed rows (`packed`), the rows and
    the longest row of the micro-batch, which then also carries a [rows, 1, L, L] boolean attention
    mask and its additive copy in the compute dtype. `labelled_logits_only` (causal models whose
    logits are a plain projection): only the `labelled_tokens` labelled positions (None: all of
    them) reach the output projection, in chunks of LOGIT_CHUNK_BYTES of float32 logits."""
    notes = []
    modules = lora_modules(shape, target_modules)
    n_lora = lora_param_count(shape, modules, lora_r, use_dora)
    weights, how = weight_bytes(shape, quantization, weight_bytes_per_param)
    notes.append(f"weights: {how}")
    state, what = optimizer_state_bytes(optimizer)
    notes.append(f"optimizer: {what}")
    tokens = micro_batch * seq_len
    kw = dict(r=lora_r, dropout=lora_dropout, act_bytes=act_bytes, checkpointing=gradient_checkpointing)
    if shape.is_seq2seq:
        # encoder layers over the source, decoder layers (with cross-attention, ~1.5x) over the target
        tgt = target_len or seq_len
        enc, enc_re = layer_activation_bytes(shape, modules, attn="eager", seq=seq_len, layers=shape.num_layers, **kw)
        dec, dec_re = layer_activation_bytes(
            shape, modules, attn="eager", seq=tgt, layers=shape.num_decoder_layers, **kw
        )
        saved = enc * tokens + 1.5 * dec * micro_batch * tgt
        recompute = max(enc_re * tokens, 1.5 * dec_re * micro_batch * tgt)
        logit_tokens = micro_batch * tgt
        notes.append("seq2seq activations are a rougher estimate than causal ones (not measured)")
    else:
        per_token, recompute_per_token = layer_activation_bytes(
            shape, modules, attn=attn, seq=seq_len, layers=shape.num_layers, **kw
        )
        saved, recompute = per_token * tokens, recompute_per_token * tokens
        logit_tokens = tokens
    # logits in the compute dtype, upcast to fp32, log-softmax, and its gradient (fp32, x2)
    per_logit = 12 + (act_bytes if act_bytes != 4 else 0)
    if labelled_logits_only and not shape.is_seq2seq and shape.plain_logits:
        labelled = logit_tokens if labelled_tokens is None else min(labelled_tokens, logit_tokens)
        logits = labelled_logits_bytes(shape, labelled, act_bytes)
        notes.append(
            f"logits: only the {labelled} labelled positions reach the output projection, "
            f"{min(labelled, chunk_rows(shape.vocab_size))} at a time (train.labelled_logits_only)"
        )
    else:
        logits = logit_tokens * shape.vocab_size * per_logit
    # the loss backward (logits phase) comes first and is freed before the layers' backward,
    # which needs the gradients flowing through one layer (plus its recomputation if checkpointing)
    working = tokens * (2 * shape.hidden_size + 2 * shape.intermediate_size) * act_bytes + recompute
    parts = {
        "weights": int(weights),
        "lora parameters": n_lora * 4,  # peft keeps adapter weights in fp32
        "gradients": n_lora * 4,
        "optimizer states": n_lora * state,
        "activations": int(saved),
        "logits + loss": int(logits),
        "backward beyond logits": int(max(0.0, working - logits)),
    }
    if packed:  # the collator's boolean [rows, 1, L, L] mask and the loss's additive copy of it
        parts["attention mask"] = micro_batch * seq_len * seq_len * (1 + act_bytes)
    if device == "cpu":
        overhead = int(0.6 * GIB)
        notes.append("overhead: Python, torch and transformers code and CPU allocator slack (~0.6 GiB, fixed)")
    else:
        overhead = int(0.5 * GIB + 0.1 * sum(parts.values()))
        notes.append("overhead: CUDA context (~0.5 GiB) + caching-allocator fragmentation (~10%)")
    return MemoryEstimate(parts=parts, overhead=overhead, notes=notes)


# train/loss.py's chunk of float32 logits (plan cannot import train; tests/plan checks they agree).
LOGIT_CHUNK_BYTES = 64 * 2**20


def chunk_rows(vocab_size: int) -> int:
    """Positions per chunk of the labelled-logits loss: LOGIT_CHUNK_BYTES of float32 logits."""
    return max(1, LOGIT_CHUNK_BYTES // (4 * vocab_size))


def labelled_logits_bytes(shape: ModelShape, labelled: int, act_bytes: int) -> int:
    """ "logits + loss" when only labelled positions are projected: one chunk's logits in backward
    (recomputed, upcast, log-softmax and its gradient, as for all positions) plus the gathered
    hidden states of every labelled position and their gradient."""
    rows = min(labelled, chunk_rows(shape.vocab_size))
    return (
        rows * shape.vocab_size * (12 + (act_bytes if act_bytes != 4 else 0))
        + 2 * labelled * shape.hidden_size * act_bytes
    )


def flops_per_token(
    shape: ModelShape, n_lora: int, seq_len: int, gradient_checkpointing: bool, head: bool = True
) -> tuple[float, str]:
    """Training FLOPs per token for LoRA on frozen weights.

    N = matmul parameters (every linear layer plus the output head unless `head` is False;
    embeddings are lookups). Forward 2N; backward 2N for the activation gradients only (frozen
    weights get no weight gradients); LoRA weights 6 per parameter; attention scores 4*s*d_attn per
    layer forward, x3 with backward; checkpointing adds one more forward.
    """
    n_matmul = shape.linear_params + (shape.vocab_size * shape.hidden_size if head else 0)
    layers = shape.num_layers + shape.num_decoder_layers
    attn = 4 * seq_len * shape.num_heads * shape.head_dim * layers
    forward = 2 * n_matmul + attn
    total = forward + (2 * n_matmul + 2 * attn) + 6 * n_lora + (forward if gradient_checkpointing else 0)
    formula = "4N + 6*N_lora + 12*s*d*L" + (" + 2N + 4*s*d*L (recompute)" if gradient_checkpointing else "")
    return float(total), formula


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
