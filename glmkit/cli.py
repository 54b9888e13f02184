"""The `glmkit` command. Each subcommand is one function registered with `@subcommand`, which names it,
adds its arguments and runs it; new ones (generate, chat, train, bench) plug in the same way."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

Configure = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]
# name -> (one-line help, add the subcommand's arguments, run it and return the exit status)
COMMANDS: dict[str, tuple[str, Configure, Run]] = {}


def subcommand(name: str, help: str, configure: Configure) -> Callable[[Run], Run]:
    """Register `run` as `glmkit NAME`."""

    def register(run: Run) -> Run:
        COMMANDS[name] = (help, configure, run)
        return run

    return register


def add_source_arguments(parser: argparse.ArgumentParser, name: str = "path") -> None:
    """A checkpoint directory or hub id, with the options that say where its files come from."""
    parser.add_argument(name, help="checkpoint directory or Hugging Face hub id (org/name)")
    parser.add_argument("--revision", help="hub branch, tag or commit (default: main)")
    parser.add_argument("--local-files-only", action="store_true", help="use the local hub cache only")
    parser.add_argument("--cache-dir", help="hub cache directory (default: HF_HUB_CACHE)")


def hub_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"revision": args.revision, "local_files_only": args.local_files_only, "cache_dir": args.cache_dir}


# ---- convert ------------------------------------------------------------------------------------------
def _convert_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_arguments(parser, "src")
    parser.add_argument("out", help="directory to write the Hugging Face layout to")
    parser.add_argument("--dtype", default=None,
                        help="auto (keep the checkpoint's; the default, but bfloat16 for an Adept release), float32, "
                             "bfloat16, float16")  # fmt: skip
    parser.add_argument("--from", dest="source_format", choices=("adept",), default=None,
                        help="the source layout, detected when not given; adept: Adept's original Persimmon release "
                             "(model_optim_rng.pt + adept_vocab.model), an error if SRC is not one")  # fmt: skip
    parser.add_argument("--max-shard-size", default="5GB", help="shard the weights past this size (e.g. 2GB)")
    parser.add_argument("--force", action="store_true",
                        help="write into a non-empty OUT (its checkpoint and tokenizer files are replaced; "
                             "other files are kept)")  # fmt: skip


def _file_stamps(directory: Path) -> dict[str, tuple[int, int, int]]:
    """name -> (inode, mtime, size) of each file: what a writer changed shows as a different stamp."""
    if not directory.is_dir():
        return {}
    return {f.name: (st.st_ino, st.st_mtime_ns, st.st_size) for f in directory.iterdir() if (st := f.stat())}


@subcommand("convert", "write a checkpoint (e.g. an original THUDM GLM-4 release) in the HF layout", _convert_arguments)
def convert(args: argparse.Namespace) -> int:
    """Load through glmkit's own loader (which reads the original layouts) and save the HF layout, with the
    tokenizer files beside it (the original GLM-4 vocabulary also converted to tokenizer.json); remote code
    (.py) is never copied."""
    from .auto import AutoModelForCausalLM
    from .checkpoint import atomic_write_text, check_writable_output, copy_file_atomic, remove_stale_checkpoint_files
    from .hub import is_tokenizer_file, resolve_checkpoint_dir

    src = resolve_checkpoint_dir(args.src, **hub_options(args))
    out = Path(args.out)
    if out.resolve() == src.resolve():
        raise ValueError("convert writes a new directory; OUT must differ from SRC")
    check_writable_output(out, args.force)
    release = _adept_release(src, args.source_format)
    before = _file_stamps(out)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=args.dtype or ("bfloat16" if release else "auto"))
    model.save_pretrained(out, max_shard_size=args.max_shard_size)
    copied = []
    for file in sorted(src.iterdir()):
        if file.is_file() and is_tokenizer_file(file.name):
            if file.name == "tokenizer_config.json":  # auto_map points at remote code we do not copy
                data = json.loads(file.read_text())
                data.pop("auto_map", None)
                atomic_write_text(out / file.name, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
            else:
                copy_file_atomic(file, out / file.name)
            copied.append(file.name)
    print(f"wrote {type(model).__name__} ({model.config.model_type}, {model.dtype}) to {out}")
    print(f"tokenizer files: {', '.join(copied) if copied else 'none found'}")
    if release is not None:
        _write_adept_tokenizer(release, out)
    if "tokenizer.model" in copied and not (src / "tokenizer.json").is_file():
        from .tokenization import AutoTokenizer, ChatGLM4Tokenizer

        tokenizer = AutoTokenizer.from_pretrained(src)
        if isinstance(tokenizer, ChatGLM4Tokenizer):  # the -hf layout: tokenizer.json, loadable without code
            tokenizer.to_fast().save_pretrained(out)
            print("wrote tokenizer.json (converted from the tiktoken-format tokenizer.model)")
    written = {name for name, stamp in _file_stamps(out).items() if before.get(name) != stamp}
    removed = remove_stale_checkpoint_files(out, written)
    if removed:
        print(f"removed the old checkpoint's {', '.join(removed)}")
    return 0


def _adept_release(src: Path, source_format: str | None) -> Any:
    """Adept's Persimmon release in `src` (--from adept insists on one), else None."""
    from .models.adept import open_release

    release = open_release(src)
    if source_format == "adept" and release is None:
        raise ValueError(f"--from adept: {src} holds no model_optim_rng.pt (or has a config.json: not a raw release)")
    return release


def _write_adept_tokenizer(release: Any, out: Path) -> None:
    """adept_vocab.model as the reference's conversion saves it: a Llama sentencepiece tokenizer, bos |ENDOFTEXT|."""
    from .models.adept import BOS_TOKEN
    from .tokenization import LlamaTokenizer

    if release.vocab_file is None:
        print("tokenizer files: none (no adept_vocab.model in the release)")
        return
    LlamaTokenizer(release.vocab_file, bos_token=BOS_TOKEN, eos_token=None).save_pretrained(out)
    print(f"wrote the tokenizer (from {release.vocab_file.name}; bos {BOS_TOKEN})")


# ---- info ---------------------------------------------------------------------------------------------
def _info_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def checkpoint_info(directory: Path) -> dict[str, Any]:
    """What a checkpoint is, read from config.json, tensor headers and tokenizer files (no weights loaded)."""
    from .auto import ALIASES
    from .checkpoint import WeightReader
    from .config import read_config_dict

    config = read_config_dict(directory)
    reader = WeightReader(directory)
    names = [n for n in reader.keys() if not n.endswith("inv_freq")]
    numels = [math.prod(reader.shape(n)) for n in names]
    dtypes = sorted({str(reader.dtype(n)).removeprefix("torch.") for n in names})
    tokenizer_config = directory / "tokenizer_config.json"
    chat_template = (directory / "chat_template.jinja").is_file() or (
        tokenizer_config.is_file() and bool(json.loads(tokenizer_config.read_text()).get("chat_template"))
    )
    model_type = config.get("model_type")
    return {
        "path": str(directory),
        "family": ALIASES.get(model_type, model_type),
        "model_type": model_type,
        "architectures": config.get("architectures"),
        "parameters": sum(numels),
        "dtype": config.get("torch_dtype") or config.get("dtype"),
        "weight_dtypes": dtypes,
        "weight_files": {f.name: f.stat().st_size for f in reader.files},
        "chat_template": chat_template,
    }


@subcommand("info", "describe a checkpoint: family, parameters, dtype, files, chat template", _info_arguments)
def info(args: argparse.Namespace) -> int:
    from .hub import resolve_checkpoint_dir

    facts = checkpoint_info(resolve_checkpoint_dir(args.path, **hub_options(args)))
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    files = facts.pop("weight_files")
    facts["parameters"] = f"{facts['parameters']:,} ({facts['parameters'] / 1e9:.2f}B)"
    facts["weight_dtypes"] = ", ".join(facts["weight_dtypes"])
    for key, value in facts.items():
        print(f"{key + ':':15}{value}")
    print(f"{'weight files:':15}{len(files)}, {sum(files.values()) / 2**20:.1f} MiB")
    for name, size in files.items():
        print(f"  {name}  {size / 2**20:.1f} MiB")
    return 0


# ---- generate / chat -----------------------------------------------------------------------------------
def _load_arguments(parser: argparse.ArgumentParser) -> None:
    """Which checkpoint to load and how (generate, chat, serve)."""
    parser.add_argument(
        "--model", default="default:glm", help="checkpoint directory, hub id, or default:glm|xglm|persimmon"
    )
    parser.add_argument("--revision", help="hub branch, tag or commit (default: main)")
    parser.add_argument("--local-files-only", action="store_true", help="use the local hub cache only")
    parser.add_argument("--cache-dir", help="hub cache directory (default: HF_HUB_CACHE)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, …")


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    _load_arguments(parser)
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--min-p", type=float)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--seed", type=int, help="torch.manual_seed before generating (reproducible sampling)")
    parser.add_argument("--compile", action="store_true",
                        help="static KV cache + torch.compile'd decode step (CUDA graphs on GPU); the first "
                             "reply pays the compile time")  # fmt: skip


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from .auto import AutoModelForCausalLM
    from .tokenization import AutoTokenizer

    hub = hub_options(args)
    tokenizer = AutoTokenizer.from_pretrained(args.model, **hub)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=args.dtype, device_map=args.device, **hub)
    if args.compile:
        print("(--compile: the first reply, and the first past each 128 more tokens, waits for a compile)",
              file=sys.stderr)  # fmt: skip
    return model, tokenizer


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    options = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample}
    if args.compile:
        options["compile"] = True
    for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    return options


def _run_stream(model: Any, tokenizer: Any, input_ids: Any, options: dict[str, Any], echo: bool) -> tuple[str, int]:
    """Generate for one prompt, printing text deltas as they come when `echo`; return (text, new tokens)."""
    pieces, count = [], 0
    for chunk in model.stream(input_ids, tokenizer=tokenizer, **options):
        count += len(chunk.token_ids[0])
        pieces.append(chunk.text[0])
        if echo:
            print(chunk.text[0], end="", flush=True)
    return "".join(pieces), count


def _generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="*", help="prompt(s); read from stdin (one per line) when none are given")
    _model_arguments(parser)
    parser.add_argument("--stream", action="store_true", help="print text as it is generated")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")


@subcommand("generate", "continue prompt(s) with a model (the bundled GLM by default), offline", _generate_arguments)
def generate(args: argparse.Namespace) -> int:
    """Each prompt's completion goes to stdout (prompt included unless --chat); speed goes to stderr."""
    import time

    import torch

    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise ValueError("no prompt given (pass it as an argument or on stdin)")
    model, tokenizer = _load(args)
    for prompt in prompts:
        if args.seed is not None:
            torch.manual_seed(args.seed)
        if args.chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)  # fmt: skip
            input_ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        else:
            input_ids = tokenizer(prompt, return_tensors="pt").input_ids
        input_ids = input_ids.to(model.device)
        if not args.chat:
            print(prompt, end="", flush=True)
        start = time.perf_counter()
        text, count = _run_stream(model, tokenizer, input_ids, _sampling(args), echo=args.stream)
        elapsed = time.perf_counter() - start
        print("" if args.stream else text, flush=True)
        print(f"[{count} tokens in {elapsed:.2f}s, {count / max(elapsed, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return 0


def _chat_arguments(parser: argparse.ArgumentParser) -> None:
    _model_arguments(parser)
    parser.add_argument("--system", help="system prompt to start with")


@subcommand("chat", "interactive chat with the model's chat template (/reset, /system TEXT, /quit)", _chat_arguments)
def chat(args: argparse.Namespace) -> int:
    """A read-reply loop with history. Replies stream and stop on every EOS id; Ctrl-C stops the current
    reply (the partial reply is kept), a second Ctrl-C or Ctrl-D at the prompt quits."""
    import torch

    model, tokenizer = _load(args)
    system = args.system
    history: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            history = []
            print("(history cleared)")
            continue
        if line.startswith("/system"):
            system = line[len("/system") :].strip() or None
            history = []
            print(f"(system prompt {'set' if system else 'removed'}; history cleared)")
            continue
        history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        input_ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids.to(model.device)
        if args.seed is not None:
            torch.manual_seed(args.seed)
        pieces: list[str] = []
        try:
            for chunk in model.stream(input_ids, tokenizer=tokenizer, **_sampling(args)):
                pieces.append(chunk.text[0])
                print(chunk.text[0], end="", flush=True)
        except KeyboardInterrupt:
            print(" [stopped]", end="")
        print(flush=True)
        history.append({"role": "assistant", "content": "".join(pieces).strip()})


# ---- train -------------------------------------------------------------------------------------------
def _train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainOptions field (`max_steps` -> `--max-steps`), with its default and type."""
    import dataclasses
    import typing

    from .train import TrainOptions

    hints = typing.get_type_hints(TrainOptions)
    for field in dataclasses.fields(TrainOptions):
        flag = "--" + field.name.replace("_", "-")
        if hints[field.name] is bool:
            parser.add_argument(flag, action="store_true", help=f"(default: {field.default})")
        elif field.default is dataclasses.MISSING:
            parser.add_argument(flag, required=True)
        else:
            kind = next((t for t in (int, float) if hints[field.name] is t), str)
            parser.add_argument(flag, type=kind, default=field.default, help=f"(default: {field.default})")


@subcommand("train", "train from scratch (--family, --preset) or fine-tune (--model) on text / JSONL", _train_arguments)
def train(args: argparse.Namespace) -> int:
    """Writes an HF-layout checkpoint with its tokenizer to --out; progress goes to stderr."""
    import dataclasses

    import torch

    from .checkpoint import check_device_available
    from .train import TrainOptions
    from .train import train as run_training

    if args.device:  # before reading any data: torch's own error is an assertion with a traceback
        try:
            check_device_available(torch.device(args.device))
        except RuntimeError:
            raise ValueError(f"unknown --device {args.device!r}") from None
    options = TrainOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainOptions)})
    result = run_training(options)
    losses = [point["loss"] for point in result.history if "loss" in point]
    summary = f"wrote {result.out}: step {result.step}"
    if losses:
        summary += f", train loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    if result.eval_loss is not None:
        summary += f", eval loss {result.eval_loss:.3f}"
    if result.unigram_eval_loss is not None:
        summary += f" (unigram baseline {result.unigram_eval_loss:.3f})"
    if os.environ.get("RANK", "0") == "0":  # under torchrun, once
        print(summary)
    return 0


# ---- bench -------------------------------------------------------------------------------------------
def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("options", nargs="*", help="passed to the benchmark, e.g. --compile, --load, --batch 1 8, "
                        "--bundled --stream --lookup; `glmkit bench --help` lists them")  # fmt: skip


@subcommand("bench", "decode / loading benchmark against transformers on the same weights", _bench_arguments)
def bench(args: argparse.Namespace) -> int:
    from .bench import main as bench_main

    return bench_main(args.options)


# ---- serve -------------------------------------------------------------------------------------------
def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    _load_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", help="the model name clients send (default: --model)")
    parser.add_argument("--max-num-seqs", type=int, default=32, help="requests decoded together")
    parser.add_argument("--max-queue-len", type=int, default=256, help="requests waiting beyond those (then 429)")
    parser.add_argument("--max-model-len", type=int, help="prompt + completion tokens (default: the model's)")
    parser.add_argument("--api-key", help="require `Authorization: Bearer KEY` (default: $GLMKIT_API_KEY if set)")
    parser.add_argument("--lora", action="append", default=[], metavar="NAME=DIR",
                        help="serve the PEFT LoRA adapter in DIR as model NAME (repeatable; requests for different "
                             "adapters share batches)")  # fmt: skip
    parser.add_argument("--compile", action="store_true",
                        help="run the decode step under torch.compile (compiled while /health says 503; on CPU "
                             "it keeps a second, prepacked copy of the weights; see the README for the trade-offs)")


def _lora_arguments(values: list[str]) -> dict[str, str]:
    adapters = {}
    for value in values:
        name, sep, directory = value.partition("=")
        if not sep or not name or not directory:
            raise ValueError(f"--lora wants NAME=DIR, got {value!r}")
        if name in adapters:
            raise ValueError(f"--lora {name} is given twice")
        adapters[name] = directory
    return adapters


@subcommand("serve", "OpenAI-compatible HTTP server with continuous batching", _serve_arguments)
def serve(args: argparse.Namespace) -> int:
    """Serve at once (/health answers 503 "loading"), load the model in a thread, then take requests;
    the scheduler stops with the server. A model that fails to load ends the server with its error."""
    import os
    import threading

    try:
        import uvicorn

        from .serve.app import create_app
    except ImportError as err:
        raise ImportError(f"glmkit serve needs FastAPI and uvicorn: pip install 'glmkit[serve]' ({err})") from err

    adapters = _lora_arguments(args.lora)
    if adapters and _tensor_parallel_launch():
        raise ValueError("--lora cannot be combined with a tensor-parallel (torchrun) launch yet")
    if args.compile and (adapters or _tensor_parallel_launch()):
        raise ValueError("--compile cannot be combined with --lora or a tensor-parallel (torchrun) launch yet")
    if _tensor_parallel_launch() and int(os.environ["RANK"]) != 0:  # rank 0 serves, the others follow its steps
        from .distributed.serve import follow

        follow(_scheduler(args)[0])
        return 0
    name = args.served_model_name or args.model
    if name in adapters:
        raise ValueError(f"--lora {name} is the base model's served name")
    app = create_app(None, None, name, api_key=args.api_key or os.environ.get("GLMKIT_API_KEY"), max_model_len=None,
                     adapters={n: i for i, n in enumerate(adapters, 1)})  # the ids load_adapters gives them
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                           timeout_graceful_shutdown=10))  # fmt: skip
    state: dict[str, Any] = {}

    def load() -> None:
        try:
            state["scheduler"] = _load_scheduler(args, app.state.server, name, adapters)
        except BaseException as err:  # noqa: BLE001 - reported by the main thread after the server stops
            state["error"] = err
            server.should_exit = True

    loader = threading.Thread(target=load, name="glmkit-load", daemon=True)
    loader.start()
    try:
        server.run()
    finally:
        loader.join()
        if "scheduler" in state:
            state["scheduler"].stop()
    if "error" in state:
        raise state["error"]
    return 0


def _tensor_parallel_launch() -> bool:
    """Started by torchrun with several ranks: the model is split over them (tp_plan="auto")."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _load_scheduler(args: argparse.Namespace, server: Any, name: str, adapters: dict[str, str] | None = None) -> Any:
    scheduler, model, tokenizer, max_model_len = _scheduler(args, adapters)
    if _tensor_parallel_launch():
        from .distributed.serve import lead

        lead(scheduler)
    scheduler.warm_up()  # compiles the decode step (--compile) before /health says ready
    scheduler.start()
    server.attach(scheduler, tokenizer, max_model_len)
    print(f"serving {name} ({type(model).__name__}, {model.dtype}, {model.device}) on "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr)  # fmt: skip
    return scheduler


def _scheduler(args: argparse.Namespace, adapters: dict[str, str] | None = None) -> tuple[Any, Any, Any, int]:
    """A scheduler, not started, with its model (split over the ranks of a torchrun launch, LoRA adapters
    stacked in), tokenizer and max_model_len."""
    from .auto import AutoModelForCausalLM
    from .lora import load_adapters
    from .serve.scheduler import Scheduler
    from .tokenization import AutoTokenizer

    hub = hub_options(args)
    tokenizer = AutoTokenizer.from_pretrained(args.model, **hub)
    placement = {"tp_plan": "auto"} if _tensor_parallel_launch() else {"device_map": args.device}
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=args.dtype, **placement, **hub)
    load_adapters(model, adapters or {})
    limit = getattr(model.config, "max_position_embeddings", None)
    max_model_len = args.max_model_len or limit
    if max_model_len is None:
        raise ValueError("--max-model-len is needed: the model's config has no max_position_embeddings")
    if limit and max_model_len > limit:
        raise ValueError(f"--max-model-len {max_model_len} is more than the model's {limit} positions")
    scheduler = Scheduler(model, tokenizer, max_num_seqs=args.max_num_seqs, max_queue_len=args.max_queue_len,
                          max_model_len=max_model_len, compile=getattr(args, "compile", False))  # fmt: skip
    return scheduler, model, tokenizer, max_model_len


# ---- perplexity / eval -------------------------------------------------------------------------------
def _perplexity_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_arguments(parser, "model")
    parser.add_argument("--data", required=True, help="UTF-8 text file to score")
    parser.add_argument("--max-length", type=int, help="inputs per window (default: the model's positions)")
    parser.add_argument("--stride", type=int, help="tokens each window advances (default: --max-length, disjoint "
                        "windows; smaller gives each scored token more context)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16, float16, auto")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, …")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


@subcommand("perplexity", "perplexity of a text file under a model (strided windows; progress on stderr)",
            _perplexity_arguments)  # fmt: skip
def perplexity(args: argparse.Namespace) -> int:
    from .auto import AutoModelForCausalLM
    from .eval import loglikelihood_rolling
    from .tokenization import AutoTokenizer

    text = Path(args.data).read_text(encoding="utf-8")
    if not text:
        raise ValueError(f"--data {args.data} is empty")
    hub = hub_options(args)
    tokenizer = AutoTokenizer.from_pretrained(args.model, **hub)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=args.dtype, device_map=args.device, **hub)
    (result,) = loglikelihood_rolling(model, tokenizer, [text], max_length=args.max_length, stride=args.stride,
                                      batch_size=args.batch_size, progress=True)  # fmt: skip
    facts = {"perplexity": math.exp(-result.per_token), "nll_per_token": -result.per_token,
             "bits_per_byte": -result.per_byte / math.log(2), "tokens": result.num_tokens, "bytes": result.num_bytes}
    if args.json:
        print(json.dumps(facts))
    else:
        print(f"perplexity {facts['perplexity']:.4f} ({facts['nll_per_token']:.4f} nats/token, "
              f"{facts['bits_per_byte']:.4f} bits/byte over {result.num_tokens} tokens)")  # fmt: skip
    return 0


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("options", nargs="*", help="the harness's own arguments, e.g. --model glmkit --model_args "
                        "pretrained=PATH,dtype=float32 --tasks hellaswag --batch_size 8 --device cpu")  # fmt: skip


@subcommand("eval", "lm-evaluation-harness (its CLI, with the glmkit model registered; pip install 'glmkit[eval]')",
            _eval_arguments)  # fmt: skip
def eval_(args: argparse.Namespace) -> int:
    try:
        from .eval.harness import run_cli
    except ImportError as err:
        raise ImportError(f"glmkit eval needs lm-evaluation-harness: pip install 'glmkit[eval]' ({err})") from err
    return run_cli(args.options)


# ---- quantize ----------------------------------------------------------------------------------------
def _quantize_arguments(parser: argparse.ArgumentParser) -> None:
    from .quant.cli import add_arguments

    add_arguments(parser)


@subcommand("quantize", "write an int8 / int4 weight-only checkpoint that from_pretrained loads as is",
            _quantize_arguments)  # fmt: skip
def quantize(args: argparse.Namespace) -> int:
    from .quant.cli import run

    return run(args)


# ---- merge (LoRA) -------------------------------------------------------------------------------------
def _merge_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_arguments(parser, "base")
    parser.add_argument("adapter", help="PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("out", help="directory to write the merged checkpoint to")
    parser.add_argument("--dtype", default="auto", help="auto (the base's), float32, bfloat16, float16")
    parser.add_argument("--force", action="store_true", help="write into a non-empty OUT")


@subcommand("merge", "fold a LoRA adapter into its base model and write a plain checkpoint", _merge_arguments)
def merge(args: argparse.Namespace) -> int:
    from .lora import merge_checkpoint

    merge_checkpoint(args.base, args.adapter, args.out, args.force, args.dtype, **hub_options(args))
    print(f"wrote {args.out}: {args.base} with {args.adapter} merged in")
    return 0


# ---- entry point --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="glmkit", description="GLM-4, XGLM and Persimmon in plain PyTorch")
    parser.add_argument("--version", action="version", version=f"glmkit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help, configure, run) in COMMANDS.items():
        sub = commands.add_parser(name, help=help, description=help)
        configure(sub)
        sub.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `glmkit ARGS`; problems with the checkpoint or the arguments print one line and return 1."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["bench"], ["eval"]):  # everything after it, in order, is the tool's (its own --help too)
        args = argparse.Namespace(command=argv[0], options=argv[1:], run=COMMANDS[argv[0]][2])
    else:
        args, extra = parser.parse_known_args(argv)
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.run(args)
    except (OSError, ValueError, ImportError) as err:
        print(f"glmkit {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
