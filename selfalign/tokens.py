"""Prompt tokens counted without calling a model: for `selfalign plan` and for budget reservations (budget.py).

A model's own tokenizer when one is at hand, with its chat template applied (what the model is sent):
- llamacpp: the GGUF's vocabulary (llama_cpp loads it with `vocab_only`, a tenth of a second) and the GGUF's
  chat template, rendered the way llama_cpp's chat handler renders it, so the count equals the
  `prompt_tokens` llama.cpp reports;
- vllm: the model folder's Hugging Face tokenizer and its chat template;
- openai: tiktoken for the model names tiktoken knows (with the OpenAI cookbook's few tokens of chat format
  per message), else the Hugging Face tokenizer when the name is a local folder or a Hub id in the local cache;
- fake: the word count the fake backend reports.
Otherwise the count is an estimate (4 characters a token), and `exact` is False so the plan labels it. For a
budget reservation an estimate is not enough (it could be low), so `upper_bound` then takes the UTF-8 bytes
of the messages: a byte-level tokenizer never makes more tokens than bytes.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

Messages = Sequence[dict[str, str]]

# Chat format tokens per message (role markers, separators) and for the reply's start, where a count covers
# only the text: generous enough for ChatML, Llama and OpenAI's formats.
OVERHEAD_PER_MESSAGE = 8
OVERHEAD_PER_PROMPT = 8
TIKTOKEN_LOAD_TIMEOUT_S = 10.0  # tiktoken downloads its encoding on first use, without a timeout of its own


@dataclass
class TokenCounter:
    label: str  # how tokens are counted, as the plan shows it
    exact: bool  # the model's own tokenizer with its chat template: the count the model will report
    count_messages: Callable[[Messages], int]
    count_text: Callable[[str], int]

    def count(self, messages: Messages) -> int:
        return self.count_messages(messages)

    def upper_bound(self, messages: Messages) -> int:
        """At least the prompt tokens the model will count: what a budget reserves before sending."""
        if self.exact:
            return self.count_messages(messages)
        return sum(len(m["content"].encode("utf-8")) + OVERHEAD_PER_MESSAGE for m in messages) + OVERHEAD_PER_PROMPT


def estimate(why: str) -> TokenCounter:
    def count_messages(messages: Messages) -> int:
        return sum(_estimate_text(m["content"]) + 4 for m in messages) + 3
    return TokenCounter(f"estimate: 4 characters a token ({why})", False, count_messages, _estimate_text)


def _estimate_text(text: str) -> int:
    return (len(text) + 3) // 4


def counter_for(config) -> TokenCounter:
    """The best counter at hand for a model config (models.py); never raises, falls back to an estimate."""
    backend = getattr(config, "backend", None)
    if backend == "fake":
        return _words()
    if backend == "llamacpp":
        return _gguf(config.model_path)
    if backend == "vllm":
        return _hugging_face(config.model) or estimate(f"no tokenizer found in {config.model}")
    if backend == "openai":
        counter, why = _tiktoken(config.model)
        if counter is None and _could_be_hf(config.model):
            counter = _hugging_face(config.model)
        return counter or estimate(why or f"no tokenizer at hand for {config.model!r}")
    return estimate(f"backend {backend!r}")


def _words() -> TokenCounter:
    def words(text: str) -> int:
        return len(text.split())
    return TokenCounter("the fake backend's word count", True,
                        lambda messages: sum(words(m["content"]) for m in messages), words)


# ---------------------------------------------------------------------------------------------- llama.cpp

def _gguf(model_path: str | None) -> TokenCounter:
    try:
        from .backends.llamacpp import bundled_model_path
        path = Path(model_path) if model_path else bundled_model_path()
        vocab = _gguf_vocab(str(path))
    except Exception as exc:  # llama_cpp missing, no file, not a GGUF: an estimate, saying why
        return estimate(f"cannot read the GGUF's tokenizer: {type(exc).__name__}: {str(exc)[:120]}")
    llm, formatter = vocab

    def tokens(text: str, add_bos: bool) -> int:
        return len(llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

    if formatter is None:
        def count_plain(messages: Messages) -> int:
            return sum(tokens(m["content"], False) + OVERHEAD_PER_MESSAGE for m in messages) + OVERHEAD_PER_PROMPT
        return TokenCounter(f"{path.name}'s tokenizer (GGUF; it has no chat template: message text plus "
                            f"{OVERHEAD_PER_MESSAGE} a message)", False, count_plain, lambda t: tokens(t, False))

    def count(messages: Messages) -> int:
        # As llama_cpp's chat handler does: render the template, then tokenize with special tokens.
        result = formatter(messages=list(messages))
        return tokens(result.prompt, not result.added_special)

    return TokenCounter(f"{path.name}'s tokenizer and chat template (GGUF)", True, count, lambda t: tokens(t, False))


@functools.lru_cache(maxsize=4)
def _gguf_vocab(path: str) -> tuple[Any, Any]:
    import llama_cpp
    from llama_cpp import llama_chat_format

    try:  # llama.cpp logs a context warning to stderr even with verbose=False; the count needs no context
        from llama_cpp._utils import suppress_stdout_stderr
    except ImportError:
        suppress_stdout_stderr = None
    if suppress_stdout_stderr is not None:
        with suppress_stdout_stderr(disable=False):
            llm = llama_cpp.Llama(path, vocab_only=True, verbose=False)
    else:
        llm = llama_cpp.Llama(path, vocab_only=True, verbose=False)
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return llm, None

    def text(token: int) -> str:
        return llm._model.token_get_text(token) if token >= 0 else ""
    formatter = llama_chat_format.Jinja2ChatFormatter(template=template, eos_token=text(llm.token_eos()),
                                                      bos_token=text(llm.token_bos()),
                                                      stop_token_ids=[llm.token_eos()])
    return llm, formatter


# ---------------------------------------------------------------------------------------------- Hugging Face

def _could_be_hf(name: str) -> bool:
    """A local folder or an `org/name` Hub id (importing transformers costs seconds: not for plain names)."""
    return Path(name).is_dir() or name.count("/") == 1


def _hugging_face(name: str) -> TokenCounter | None:
    try:
        tokenizer = _hf_tokenizer(name)
    except Exception:  # not a folder, not in the local Hub cache, transformers missing
        return None
    if tokenizer is None:
        return None

    def text(value: str) -> int:
        return len(tokenizer.encode(value, add_special_tokens=False))

    if not getattr(tokenizer, "chat_template", None):
        def count_plain(messages: Messages) -> int:
            return sum(text(m["content"]) + OVERHEAD_PER_MESSAGE for m in messages) + OVERHEAD_PER_PROMPT
        return TokenCounter(f"{name}'s tokenizer (no chat template: message text plus {OVERHEAD_PER_MESSAGE} a "
                            "message)", False, count_plain, text)

    def count(messages: Messages) -> int:
        ids = tokenizer.apply_chat_template(list(messages), tokenize=True, add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # newer transformers return a BatchEncoding
            ids = ids["input_ids"]
        return len(ids)

    return TokenCounter(f"{name}'s tokenizer and chat template (Hugging Face)", True, count, text)


@functools.lru_cache(maxsize=4)
def _hf_tokenizer(name: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(name, local_files_only=True)


# ---------------------------------------------------------------------------------------------- tiktoken

def _tiktoken(model: str) -> tuple[TokenCounter | None, str | None]:
    """(counter, None), or (None, why not) for a name tiktoken knows, or (None, None) for one it does not."""
    try:
        import tiktoken
        from tiktoken.model import encoding_name_for_model
    except ImportError:
        return None, None
    try:
        name = encoding_name_for_model(model)
    except KeyError:  # not an OpenAI model name tiktoken knows
        return None, None
    encoding = _load_encoding(tiktoken, name)
    if encoding is None:
        return None, f"tiktoken's {name} for {model!r} could not be loaded: offline, and not in its cache"

    def text(value: str) -> int:
        return len(encoding.encode(value, disallowed_special=()))

    def count(messages: Messages) -> int:
        # The OpenAI cookbook's count for chat models: 3 tokens of format a message, 3 to start the reply.
        return sum(text(m["content"]) + text(m["role"]) + 3 for m in messages) + 3

    return TokenCounter(f"tiktoken {encoding.name} (+ 3 chat format tokens a message)", True, count, text), None


@functools.lru_cache(maxsize=8)
def _load_encoding(tiktoken, name: str):
    """The encoding, or None when it cannot be had within a few seconds (offline: tiktoken downloads it)."""
    found: list[Any] = []

    def load() -> None:
        try:
            found.append(tiktoken.get_encoding(name))
        except Exception:  # no network and no cached copy
            pass

    # A daemon thread: tiktoken's download has no timeout, and a hung one must not hold the process at exit.
    thread = threading.Thread(target=load, name="tiktoken-load", daemon=True)
    thread.start()
    thread.join(TIKTOKEN_LOAD_TIMEOUT_S)
    return found[0] if found else None
