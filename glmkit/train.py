"""Train a GLM-4, XGLM or Persimmon causal LM from scratch, or fine-tune a checkpoint fully or with LoRA / QLoRA
(`glmkit train`).

From scratch, the tokenizer is trained the way the family's own works (GLM-4: byte-level BPE
tokenizer.json; XGLM: sentencepiece BPE with the fairseq id offset; Persimmon: sentencepiece unigram
with byte fallback, Llama convention). Text is tokenized, packed into fixed-length blocks with EOS between
documents and trained with AdamW, warmup + cosine decay and gradient accumulation. Chat (`{"messages"}`) and
`{"prompt", "completion"}` rows are supervised fine-tuning examples instead (glmkit.sft: loss on the assistant
/ completion tokens only). Checkpoints are the Hugging Face layout (config, safetensors, tokenizer; with
`lora`, the PEFT adapter instead of the weights) plus `trainer_state.pt` for `resume`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from . import lora as lora_mod
from . import train_dist
from .auto import AutoModelForCausalLM
from .chat import GLM4_CHAT_TEMPLATE, PERSIMMON_CHAT_TEMPLATE
from .checkpoint import check_writable_output, remove_stale_checkpoint_files
from .config import PretrainedConfig
from .modeling import PreTrainedModel
from .models.glm import GlmConfig
from .models.persimmon import PersimmonConfig
from .models.xglm import XGLMConfig
from .sft import BlockData, Completion, Conversation, ExampleData, count_targets, encode_examples
from .tokenization import GLM4_PATTERN, AutoTokenizer, FastTokenizer, LlamaTokenizer, Tokenizer, XGLMTokenizer

FAMILIES = ("glm", "xglm", "persimmon")
STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"  # one JSON object per logged point, appended (a resumed run continues it)
GLM_SPECIAL_TOKENS = (
    "<|endoftext|> [MASK] [gMASK] [sMASK] <sop> <eop> <|system|> <|user|> <|assistant|> <|observation|>".split()
)

# Size presets. "small" (~1.1-1.3M parameters with a 2k vocabulary) is what the bundled models use;
# GLM keeps GLM-4's grouped-query attention (2 query heads per KV head) and half-dim partial RoPE.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "glm": {
        "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16),
        "small": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32),
        "base": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=6, num_attention_heads=8,
                     num_key_value_heads=2, head_dim=32),
    },
    "xglm": {
        "tiny": dict(d_model=64, ffn_dim=256, num_layers=2, attention_heads=4),
        "small": dict(d_model=128, ffn_dim=512, num_layers=4, attention_heads=4),
        "base": dict(d_model=256, ffn_dim=1024, num_layers=6, attention_heads=8),
    },
    "persimmon": {
        "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
        "small": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4),
        "base": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8),
    },
}  # fmt: skip


@dataclass
class TrainOptions:
    """Everything `train()` needs; the CLI flags map one to one (`--max-steps` -> max_steps)."""

    data: str | os.PathLike  # text, or .jsonl lines: {"text"}, {"messages", "tools"}, {"prompt", "completion"}
    out: str | os.PathLike  # checkpoint directory, rewritten at every save
    family: str = "glm"  # from scratch: glm | xglm | persimmon
    preset: str = "tiny"  # from scratch: a key of PRESETS[family]
    model: str | os.PathLike | None = None  # fine-tune this checkpoint directory instead
    separator: str | None = None  # plain text: split it into documents at this string (e.g. "\n\n")
    resume: bool = False  # continue from `out` (its weights, tokenizer and trainer_state.pt)
    force: bool = False  # write into a non-empty `out` (its checkpoint files are replaced, other files kept)
    vocab_size: int = 2048  # from scratch: tokenizer size (an upper bound on small corpora)
    block_size: int = 128
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 200
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_fraction: float = 0.05  # the held-out tail of the token stream
    eval_every: int = 100
    eval_batches: int = 20
    save_every: int = 0  # 0: save only at the end
    log_every: int = 10
    seed: int = 0
    gradient_checkpointing: bool = False
    device: str | None = None  # default: cuda when available, else cpu
    lora: bool = False  # fine-tune `model` through a LoRA adapter (saved in the PEFT format) instead of fully
    rank: int = 8  # LoRA rank
    alpha: float = 16.0  # LoRA scaling is alpha / rank
    dropout: float = 0.0  # LoRA dropout on the adapter's input
    target_modules: str = "all"  # comma-separated linear names (q_proj,v_proj), or all (every linear but the head)
    quantization: str | None = None  # with lora: int8 | int4 base (QLoRA), quantized as it is loaded
    parallel: str = "ddp"  # under torchrun (WORLD_SIZE > 1): ddp | fsdp; batch_size is the global batch
    packing: bool = False  # SFT rows: a batch's examples end to end in one row, padding-free (see glmkit.sft)


@dataclass
class TrainResult:
    out: Path
    step: int
    train_loss: float | None  # mean over the last logged window
    eval_loss: float | None
    unigram_eval_loss: float | None  # eval cross-entropy under the training split's unigram distribution
    num_parameters: int
    seconds: float
    history: list[dict[str, float]]  # the logged points: {"step", "loss"} and {"step", "eval_loss"}


# ---- data -----------------------------------------------------------------------------------------
Record = str | Conversation | Completion  # a text document or a supervised fine-tuning example


def read_records(path: str | os.PathLike, separator: str | None = None) -> list[Record]:
    """JSONL (.jsonl/.json) lines with "text" or "messages", else plain text: one document, or one per
    `separator`-delimited part (a play or a book is one stream; a file of short texts would be split)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training data not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix not in (".jsonl", ".json"):
        parts = text.split(separator) if separator else [text]
        records: list[Record] = [d.strip("\n") for d in parts if d.strip()]
    else:
        lines = enumerate(text.splitlines(), 1)
        records = [_parse_jsonl_line(line, f"{path}:{n}") for n, line in lines if line.strip()]
    if not records:
        raise ValueError(f"{path} holds no text to train on")
    return records


def _parse_jsonl_line(line: str, source: str) -> Record:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        row = {}
    if isinstance(row.get("text"), str):
        return row["text"]
    if isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        return Completion(row["prompt"], row["completion"], source)
    messages, tools = row.get("messages"), row.get("tools")
    if (
        isinstance(messages, list)
        and messages
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in messages)
        and (tools is None or isinstance(tools, list))
    ):
        return Conversation(messages, tools, source)
    raise ValueError(f'{source}: expected {{"text": str}}, {{"prompt": str, "completion": str}} or '
                     '{"messages": [{"role", "content"}, ...], "tools": [...] (optional)}')  # fmt: skip


def _plain_texts(records: list[Record]) -> Iterator[str]:
    """What the tokenizer trainer sees: paragraphs of the documents, and the contents of chat messages."""
    for r in records:
        if isinstance(r, str):
            yield from (p for p in r.split("\n\n") if p.strip())  # sentencepiece wants short "sentences"
        elif isinstance(r, Completion):
            yield from (r.prompt, r.completion)
        else:
            yield from (str(m.get("content") or "") for m in r.messages)


def encode_records(texts: list[str], tokenizer: Tokenizer) -> list[int]:
    """One token stream: each document as the tokenizer encodes it (its prefix included), EOS after each,
    never two EOS in a row (XGLM's `</s> X` already starts with EOS)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token: documents could not be separated")
    stream: list[int] = []
    for ids in tokenizer(texts)["input_ids"]:
        if stream and stream[-1] == eos and ids[:1] == [eos]:
            ids = ids[1:]
        stream += ids
        if not ids or ids[-1] != eos:
            stream.append(eos)
    return stream


def make_blocks(stream: list[int], opts: TrainOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, eval) blocks of block_size tokens; eval is the tail eval_fraction of the stream."""
    n = len(stream) // opts.block_size
    n_eval = max(1, round(n * opts.eval_fraction)) if opts.eval_fraction > 0 else 0
    if n - n_eval < 1:
        need = (n_eval + 1) * opts.block_size
        raise ValueError(f"too little data: {len(stream)} tokens; block_size {opts.block_size} needs at least {need}")
    blocks = torch.tensor(stream[: n * opts.block_size], dtype=torch.long).view(n, opts.block_size)  # (N, T)
    return blocks[: n - n_eval], blocks[n - n_eval :]


Data = BlockData | ExampleData


def make_datasets(records: list[Record], tokenizer: Tokenizer, opts: TrainOptions) -> tuple[Data, Data, float | None]:
    """(train, eval, unigram eval loss): text is packed into blocks; SFT rows (any chat or prompt/completion row)
    make one example each, cut to block_size, with the tail eval_fraction held out."""
    if all(isinstance(r, str) for r in records):
        train_blocks, eval_blocks = make_blocks(encode_records(records, tokenizer), opts)
        eval_blocks = eval_blocks[: opts.eval_batches * opts.batch_size]
        unigram = unigram_cross_entropy(train_blocks, eval_blocks[:, 1:], len(tokenizer)) if len(eval_blocks) else None
        return BlockData(train_blocks), BlockData(eval_blocks), unigram
    examples, dropped = encode_examples(records, tokenizer, opts.block_size)
    if dropped:
        _log(f"dropped {dropped} example(s) with nothing to learn in their first {opts.block_size} tokens")
    n_eval = max(1, round(len(examples) * opts.eval_fraction)) if opts.eval_fraction > 0 else 0
    if len(examples) - n_eval < 1:
        raise ValueError(f"too little data: {len(examples)} usable example(s); {n_eval} held out for eval")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    held_out = examples[len(examples) - n_eval :][: opts.eval_batches * opts.batch_size]
    train_part = examples[: len(examples) - n_eval]
    return ExampleData(train_part, pad, opts.packing), ExampleData(held_out, pad, opts.packing), None


def unigram_cross_entropy(train: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats) of `targets` under the add-one-smoothed unigram distribution of `train`."""
    counts = torch.bincount(train.flatten(), minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    return float(-logp[targets.flatten()].mean())


# ---- tokenizers -----------------------------------------------------------------------------------
def train_tokenizer(family: str, texts: list[str], vocab_size: int, model_max_length: int, work: Path) -> Tokenizer:
    """A new tokenizer of the family's kind, saved into `work` and loaded back through AutoTokenizer."""
    work.mkdir(parents=True, exist_ok=True)
    if family == "glm":
        _glm_tokenizer(texts, vocab_size, model_max_length).save_pretrained(work)
    else:
        import sentencepiece as spm

        kind = {"model_type": "bpe"} if family == "xglm" else {"model_type": "unigram", "byte_fallback": True}
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_prefix=str(work / "sp"),
            vocab_size=vocab_size - 8 * (family == "xglm"),  # XGLM adds <pad> and seven <madeupword>s
            character_coverage=1.0, normalization_rule_name="identity",
            remove_extra_whitespaces=family == "xglm",  # what transformers' XGLM fast converter assumes
            split_digits=True, hard_vocab_limit=False, max_sentence_length=1 << 16, minloglevel=2,
            num_threads=max(1, torch.get_num_threads()), **kind,
        )  # fmt: skip
        if family == "xglm":
            tok: Tokenizer = XGLMTokenizer(work / "sp.model", model_max_length=model_max_length)
        else:
            tok = LlamaTokenizer(
                work / "sp.model", legacy=True, model_max_length=model_max_length,
                chat_template=PERSIMMON_CHAT_TEMPLATE,
            )  # fmt: skip
        tok.save_pretrained(work)
        for name in ("sp.model", "sp.vocab"):
            (work / name).unlink()
    return AutoTokenizer.from_pretrained(work)


def _glm_tokenizer(texts: list[str], vocab_size: int, model_max_length: int) -> Tokenizer:
    """GLM-4 -hf style: byte-level BPE over GLM-4's pre-tokenizer regex, special tokens after the vocabulary,
    `[gMASK]<sop>` prepended by the post-processor, the GLM-4 chat template."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
    from tokenizers import Tokenizer as Backend

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GLM4_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(GLM_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in GLM_SPECIAL_TOKENS])
    gmask, sop = backend.token_to_id("[gMASK]"), backend.token_to_id("<sop>")
    backend.post_processor = processors.TemplateProcessing(
        single="[gMASK]:0 <sop>:0 $A:0",
        pair="[gMASK]:0 <sop>:0 $A:0 $B:1",
        special_tokens=[("[gMASK]", gmask), ("<sop>", sop)],
    )
    return FastTokenizer(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=GLM_SPECIAL_TOKENS[1:],
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
        chat_template=GLM4_CHAT_TEMPLATE,
    )


# ---- models ---------------------------------------------------------------------------------------
def check_preset(family: str, preset: str) -> None:
    if family not in PRESETS:
        raise ValueError(f"unknown family {family!r}: choose one of {', '.join(FAMILIES)}")
    if preset not in PRESETS[family]:
        raise ValueError(f"unknown preset {preset!r} for {family}: choose one of {', '.join(PRESETS[family])}")


def build_config(family: str, preset: str, tokenizer: Tokenizer, max_positions: int) -> PretrainedConfig:
    """A family config of the preset's shape, with the tokenizer's vocabulary and special ids."""
    check_preset(family, preset)
    shape, vocab = PRESETS[family][preset], len(tokenizer)
    if family == "glm":
        # GLM-4 chat stops on <|endoftext|>, <|user|> and <|observation|>
        eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
        return GlmConfig(vocab_size=vocab, max_position_embeddings=max_positions, pad_token_id=eos[0],
                         eos_token_id=eos, **shape)  # fmt: skip
    if family == "xglm":
        return XGLMConfig(vocab_size=vocab, max_position_embeddings=max_positions, dropout=0.0,
                          attention_dropout=0.0, **shape)  # fmt: skip
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    return PersimmonConfig(vocab_size=vocab, max_position_embeddings=max_positions, **ids, **shape)


def _lr_factor(step: int, opts: TrainOptions) -> float:
    """Linear warmup to 1, then cosine decay to min_lr_ratio at max_steps."""
    if step < opts.warmup_steps:
        return (step + 1) / opts.warmup_steps
    progress = min(1.0, (step - opts.warmup_steps) / max(1, opts.max_steps - opts.warmup_steps))
    return opts.min_lr_ratio + (1 - opts.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _optimizer(model: PreTrainedModel, opts: TrainOptions) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, norms)."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()  # tied weights once
    decay = [p for p in params if p.dim() >= 2]
    other = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": opts.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=opts.lr, betas=(0.9, 0.95))


# ---- training -------------------------------------------------------------------------------------
class _Sampler:
    """Block indices for any global micro-batch: a fresh seeded permutation per epoch, so a resumed run
    draws exactly the batches the uninterrupted one would have."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perm: dict[int, torch.Tensor] = {}

    def batch(self, index: int) -> torch.Tensor:
        out = []
        for i in range(index * self.batch_size, (index + 1) * self.batch_size):
            epoch, pos = divmod(i, self.n)
            if epoch not in self._perm:
                self._perm = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))}
            out.append(self._perm[epoch][pos])
        return torch.stack(out)


def _autocast(device: torch.device) -> Any:
    """bf16 autocast on CUDA (weights and optimizer stay fp32); nothing elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


@torch.no_grad()
def evaluate(model: PreTrainedModel, data: Data, batch_size: int, device: torch.device) -> float:
    """Mean next-token loss over every labelled token of `data`."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        batch = {k: v.to(device) for k, v in data.batch(range(i, min(i + batch_size, len(data)))).items()}
        with _autocast(device):  # num_items_in_batch=1: the loss comes back as a sum
            total += float(model(**batch, num_items_in_batch=1, use_cache=False).loss)
        count += count_targets(batch)
    model.train(was_training)
    return total / max(count, 1)


def _log(message: str) -> None:
    """Progress on stderr, from the first process only under torchrun."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)


def save_checkpoint(out: Path, model: PreTrainedModel, tokenizer: Tokenizer, state: dict[str, Any]) -> None:
    """Write into out/.partial, then move each file over: an interrupted save leaves the last one whole.
    A LoRA run saves its adapter (PEFT format), not the base weights."""
    partial = out / ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    if lora_mod.lora_modules(model):
        lora_mod.save_adapter(model, partial, base_model_name_or_path=state["options"]["model"])
    else:
        model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    torch.save(state, partial / STATE_FILE)
    written = {f.name for f in partial.iterdir()}
    for f in partial.iterdir():
        os.replace(f, out / f.name)
    partial.rmdir()
    remove_stale_checkpoint_files(out, written)  # an older save's other shards / another tokenizer's files


def _setup(
    opts: TrainOptions, out: Path, records: list[Record], rank: int = 0
) -> tuple[PreTrainedModel, Tokenizer, dict | None]:
    """Model, tokenizer and (when resuming) the saved trainer state. From scratch under torchrun, every process
    trains the same tokenizer (deterministic) in a work directory of its own."""
    if opts.resume:
        if not (out / STATE_FILE).is_file():
            raise FileNotFoundError(f"nothing to resume: {out / STATE_FILE} does not exist")
        state = torch.load(out / STATE_FILE, weights_only=True)
        if opts.lora:  # the base as it was loaded, then the adapter saved so far
            base = AutoModelForCausalLM.from_pretrained(opts.model, quantization=opts.quantization, adapter=out)
            return base, AutoTokenizer.from_pretrained(out), state
        return AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out), state
    if opts.model is not None:
        model = AutoModelForCausalLM.from_pretrained(opts.model, quantization=opts.quantization)
        if opts.lora:
            targets = opts.target_modules
            targets = targets if targets in lora_mod.ALL_LINEAR else [t.strip() for t in targets.split(",")]
            lora_mod.apply(model, opts.rank, opts.alpha, opts.dropout, targets)
        return model, AutoTokenizer.from_pretrained(opts.model), None
    check_preset(opts.family, opts.preset)  # before the (slow) tokenizer training
    max_positions = max(2048, opts.block_size)
    t0 = time.perf_counter()
    work = out / f".tok{rank or ''}"
    tokenizer = train_tokenizer(opts.family, list(_plain_texts(records)), opts.vocab_size, max_positions, work)
    shutil.rmtree(work)
    _log(f"trained a {len(tokenizer)}-token {type(tokenizer).__name__} in {time.perf_counter() - t0:.1f}s")
    config = build_config(opts.family, opts.preset, tokenizer, max_positions)
    torch.manual_seed(opts.seed)
    return AutoModelForCausalLM.from_config(config), tokenizer, None


def train(opts: TrainOptions | None = None, **kwargs: Any) -> TrainResult:
    """Train (from scratch, fine-tune or resume) per `opts` (or TrainOptions(**kwargs)); returns the final losses.

    Progress goes to stderr: `step N/M | loss | lr | tokens/s`, and eval lines every eval_every steps.
    """
    opts = opts or TrainOptions(**kwargs)
    _check(opts)
    ctx, device = train_dist.setup(opts.parallel, opts.device)
    if opts.batch_size % ctx.world:
        raise ValueError(f"batch_size {opts.batch_size} (the global batch) must be a multiple of the process count "
                         f"{ctx.world}")  # fmt: skip
    out = Path(opts.out)
    if not opts.resume and not opts.force and ((out / STATE_FILE).is_file() or (out / "config.json").is_file()):
        raise FileExistsError(f"{out} already holds a checkpoint: pass resume=True (--resume) to continue it, "
                              "force=True (--force) to replace it, or choose another directory")  # fmt: skip
    if not opts.resume:
        check_writable_output(out, opts.force, "force=True (--force)")
    ctx.barrier()  # every process has checked `out` before the first one writes there
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(opts.seed)
    records = read_records(opts.data, opts.separator)
    model, tokenizer, state = _setup(opts, out, records, ctx.rank)
    model.to(device).train()
    model.base_model.gradient_checkpointing = opts.gradient_checkpointing
    train_data, eval_data, unigram = make_datasets(records, tokenizer, opts)
    name, (trainable, total) = type(model).__name__, lora_mod.trainable_parameters(model)  # before FSDP2 shards it
    run = _Run(opts, model, device, state, ctx)
    kind = "blocks" if isinstance(train_data, BlockData) else "examples"
    _log(
        f"{name}: {total:,} parameters ({trainable:,} trained) on {device}; {len(train_data)} train /"
        f" {len(eval_data)} eval {kind} of up to {opts.block_size} tokens; starting at step {run.step}/{opts.max_steps}"
        + (f"; unigram eval loss {unigram:.4f}" if unigram is not None else "")
    )
    sampler = _Sampler(len(train_data), opts.batch_size, opts.seed)
    eval_loss = None
    while run.step < opts.max_steps:
        micro = [sampler.batch(run.step * opts.grad_accum + m) for m in range(opts.grad_accum)]
        n_items = sum(train_data.targets(idx) for idx in micro)  # predicted tokens across the whole global group
        run.train_step([{k: v.to(device) for k, v in train_data.batch(ctx.shard(idx)).items()} for idx in micro],
                       n_items)  # fmt: skip
        if len(eval_data) and (run.step % opts.eval_every == 0 or run.step == opts.max_steps):
            eval_loss = evaluate(model, eval_data, opts.batch_size, device)
            run.log({"step": run.step, "eval_loss": eval_loss})
            _log(f"step {run.step} | eval loss {eval_loss:.4f}")
        if opts.save_every and run.step % opts.save_every == 0 and run.step < opts.max_steps:
            run.save(out, tokenizer)
    if eval_loss is None and len(eval_data):
        eval_loss = evaluate(model, eval_data, opts.batch_size, device)
    run.save(out, tokenizer)
    train_dist.shutdown(ctx)
    seconds = time.perf_counter() - run.t_start
    _log(f"saved {out} at step {run.step} ({seconds:.0f}s)")
    train_loss = next((h["loss"] for h in reversed(run.history) if "loss" in h), None)
    return TrainResult(out, run.step, train_loss, eval_loss, unigram, model.num_parameters(), seconds, run.history)


class _Run:
    """Optimizer, schedule, step counter and progress window of one training run (restored on resume)."""

    def __init__(self, opts: TrainOptions, model: PreTrainedModel, device: torch.device, state: dict | None,
                 ctx: train_dist.Dist | None = None):  # fmt: skip
        self.opts, self.model, self.device = opts, model, device
        self.ctx = ctx or train_dist.Dist()
        self.trained = train_dist.wrap(model, self.ctx, device)  # what the step runs (DDP / FSDP2 / the model)
        self.optimizer = _optimizer(model, opts)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: _lr_factor(s, opts))
        self.step, self.history = 0, []
        if state is not None:
            train_dist.load_optimizer_state(model, self.optimizer, state["optimizer"], self.ctx)
            self.scheduler.load_state_dict(state["scheduler"])
            self.step = int(state["step"])
            torch.set_rng_state(state["rng"])
            if device.type == "cuda" and "cuda_rng" in state:
                torch.cuda.set_rng_state(state["cuda_rng"], device)
        self.t_start = self.t_window = time.perf_counter()
        self.start_step = self.step
        self.window_loss, self.window_steps, self.window_tokens = 0.0, 0, 0
        self.metrics = Path(opts.out) / METRICS_FILE
        if state is None and self.ctx.is_main:
            self.metrics.unlink(missing_ok=True)

    def log(self, point: dict[str, float]) -> None:
        """Keep a logged point in the history and append it to metrics.jsonl (the first process writes)."""
        self.history.append({k: point[k] for k in ("step", "loss", "eval_loss") if k in point})
        if self.ctx.is_main:
            with self.metrics.open("a", encoding="utf-8") as f:
                f.write(json.dumps(point) + "\n")

    def save(self, out: Path, tokenizer: Tokenizer) -> None:
        """The checkpoint, written by the first process (FSDP2 gathers the full weights onto it first)."""
        full, state = train_dist.full_state_dict(self.model, self.ctx), self.state()  # collectives under FSDP2
        if self.ctx.is_main:
            save_checkpoint(out, self.model if full is None else _unsharded_copy(self.model, full), tokenizer, state)
        self.ctx.barrier()

    def train_step(self, batches: list[dict[str, torch.Tensor]], n_items: int) -> None:
        """One optimizer step over this process's accumulated micro-batches (input_ids, labels, maybe
        attention_mask); `n_items` counts the predicted tokens of the whole global group."""
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            sync = self.trained.no_sync() if isinstance(self.trained, DDP) and not last else contextlib.nullcontext()
            with sync, _autocast(self.device):
                loss = self.trained(**batch, num_items_in_batch=n_items, use_cache=False).loss * self.ctx.world
            # divided by the global group's token count: summed over micro-batches and (the all-reduce averages
            # over the world, hence * world) over processes, the gradients are the global mean's
            loss.backward()
            self.window_loss += float(loss.detach()) / self.ctx.world
        if self.opts.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.opts.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.window_steps += 1
        self.window_tokens += sum(int(b.get("attention_mask", b["input_ids"]).bool().sum()) for b in batches)
        if self.step % self.opts.log_every == 0 or self.step == self.opts.max_steps:
            self._report()

    def _report(self) -> None:
        now = time.perf_counter()
        loss, lr = self.ctx.mean(self.window_loss) * self.ctx.world / self.window_steps, self.scheduler.get_last_lr()[0]
        tokens_per_s = self.window_tokens * self.ctx.world / max(now - self.t_window, 1e-9)
        elapsed = now - self.t_start
        eta = elapsed / (self.step - self.start_step) * (self.opts.max_steps - self.step)
        self.log({"step": self.step, "loss": loss, "lr": lr, "tokens_per_s": tokens_per_s, "elapsed_s": elapsed})
        _log(
            f"step {self.step}/{self.opts.max_steps} | loss {loss:.4f} | lr {lr:.2e} | {tokens_per_s:,.0f} tok/s | "
            f"{elapsed:.0f}s, ETA {eta:.0f}s"
        )
        self.window_loss, self.window_steps, self.window_tokens, self.t_window = 0.0, 0, 0, now

    def state(self) -> dict[str, Any]:
        """What trainer_state.pt holds: plain tensors and Python values (torch.load(weights_only=True) reads it)."""
        s = {
            "step": self.step,
            "optimizer": train_dist.optimizer_state(self.model, self.optimizer, self.ctx),
            "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "options": {k: _plain(v) for k, v in asdict(self.opts).items()},
        }
        if self.device.type == "cuda":
            s["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return s


def _unsharded_copy(model: PreTrainedModel, state: dict[str, torch.Tensor]) -> PreTrainedModel:
    """A plain (unsharded) model holding `state`, for saving what FSDP2 trained; LoRA modules are rebuilt
    the same way so the adapter saves as usual."""
    with torch.device("meta"):
        copy = type(model)(model.config)
    config = getattr(model, "lora_config", None)
    if config is not None:
        lora_mod.apply(copy, config=config)
    copy.load_state_dict(state, assign=True)
    return copy


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, os.PathLike) else value


def _check(opts: TrainOptions) -> None:
    positive = ("block_size", "batch_size", "grad_accum", "max_steps", "eval_every", "eval_batches", "log_every")
    for name in positive:
        if getattr(opts, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(opts, name)}")
    if not 0 <= opts.eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {opts.eval_fraction}")
    if opts.block_size < 2:
        raise ValueError("block_size must be at least 2 (a token and the one it predicts)")
    if opts.warmup_steps < 0 or opts.save_every < 0:
        raise ValueError("warmup_steps and save_every must not be negative")
    if opts.lora and opts.model is None:
        raise ValueError("lora fine-tunes a checkpoint: pass model (--model DIR) as its base")
    if opts.quantization is not None and not opts.lora:
        raise ValueError("a quantized base trains only through an adapter: pass lora=True (--lora) with quantization")
    if opts.lora and (opts.rank < 1 or not 0 <= opts.dropout < 1):
        raise ValueError(f"LoRA needs rank >= 1 and dropout in [0, 1), got rank {opts.rank}, dropout {opts.dropout}")


__all__ = ["FAMILIES", "PRESETS", "TrainOptions", "TrainResult", "train", "train_tokenizer", "read_records"]
