"""The output contract: canonical pairs -> the columns each reward-model trainer reads.

`TRAINER_FORMATS` (below the builders) has one `TrainerFormat` per format: the columns it needs, the function
that maps the final polars frame (canonical pair columns: `prompt` as a list of {role, content} messages,
`chosen`/`rejected` as the final assistant turn's text, plus the critique columns the critique and consistency
stages add) to a frame in that trainer's format, the conversations its trainer tokenizes, its usage text and
its side files. The export stage, `selfalign export`, the Hub push, the dataset card and `validate` all read
that table. Splits are made by a hash of the prompt, so a prompt never appears in both train and test.

To add a trainer format: write its builder `to_<name>(df, options) -> pl.DataFrame` and add one entry to
`TRAINER_FORMATS`; `FormatName` (the export and publish stages' `formats:`) and `FORMAT_NAMES` (the CLI's
`--format`) come from it.

| format | columns | consumer |
| --- | --- | --- |
| `trl` | `prompt` (messages), `chosen`/`rejected` ([assistant message]), critiques, scores (+ `margin`) | TRL `RewardTrainer`/`DPOTrainer` (explicit prompt, conversational) |
| `trl-implicit` | `chosen`/`rejected` (full conversations), scores (+ `margin`) | TRL (implicit prompt, conversational) |
| `openrlhf` | `chosen`/`rejected` (full conversations) (+ `margin`) | OpenRLHF `train_rm` / `train_dpo` with `--data.apply_chat_template` (no prompt key) |
| `llama-factory` | `conversations` ([{from, value}]), `chosen`/`rejected` ({from: gpt, value}) | LLaMA-Factory (`formatting: sharegpt`, `ranking: true`) |
| `critic-rm` | pair + filtered critique texts and scores | joint critique + reward training (Critic-RM) |
| `cloud` | pair + `chosen_feedback`/`rejected_feedback` (critique texts) | CLoud-style critique-out-loud reward models |
| `critique-sft` | `messages` (critique prompt as user, critique JSON as assistant) | any chat SFT trainer (TRL `SFTTrainer`) |

`margin` in `trl`, `trl-implicit` and `openrlhf` is opt-in (`margin:` on the export stage, see `MARGIN_MODES`):
TRL's `RewardTrainer` puts a `margin` column into its loss whenever the column exists,
`-logsigmoid(r_chosen - r_rejected - margin)`, so the critique score difference on a 1-10 scale would ask the
reward model for a gap of several logits and start the loss near 5 instead of log 2. `llama-factory`, `critic-rm`
and `cloud` keep the raw difference as data: their consumers do not read it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Literal

import polars as pl

MESSAGE = pl.Struct({"role": pl.Utf8, "content": pl.Utf8})
SHAREGPT = pl.Struct({"from": pl.Utf8, "value": pl.Utf8})

# (prompt messages, response text, critique struct) -> the chat messages that asked for that critique.
CritiquePrompt = Callable[[list[dict[str, str]], str, dict[str, Any]], list[dict[str, str]]]
Messages = list[dict[str, str]]

PAIR = frozenset({"prompt", "chosen", "rejected"})
CRITIQUES = frozenset({"chosen_critiques", "rejected_critiques"})
PROVENANCE = ("source", "row_id")

# What the `margin` column of the formats in MARGIN_FORMATS holds (the export stage's `margin:`).
MarginMode = Literal["none", "raw", "scaled"]
MARGIN_MODES: dict[str, str] = {
    "none": "no `margin` column (the default): TRL's RewardTrainer then uses the plain pairwise loss",
    "raw": "chosen score - rejected score, on the critique stage's score scale (up to 9 on 1-10)",
    "scaled": "the raw difference divided by the score range (score_range high - low): in [0, 1] for pairs "
              "whose scores agree with the label",
}


@dataclass(frozen=True)
class FormatOptions:
    """What a builder may be asked for beyond the rows."""

    critique_prompt: CritiquePrompt | None = None  # critique-sft: the messages each critique was asked with
    margin: MarginMode = "none"                    # the `margin` column (see MARGIN_MODES)
    score_range: tuple[float, float] | None = None  # the scores' scale, for margin "scaled"


def _as_assistant_message(column: str) -> pl.Expr:
    return pl.concat_list(pl.struct(role=pl.lit("assistant"), content=pl.col(column))).alias(column)


def _conversation(column: str) -> pl.Expr:
    """prompt messages + [assistant: column]: the whole conversation ending in that answer."""
    return pl.concat_list(pl.col("prompt"), pl.concat_list(pl.struct(role=pl.lit("assistant"),
                                                                     content=pl.col(column)))).alias(column)


def _critique_texts(column: str, alias: str | None = None) -> pl.Expr:
    return pl.col(column).list.eval(pl.element().struct.field("text")).alias(alias or column)


def _critique_scores(column: str, alias: str) -> pl.Expr:
    return pl.col(column).list.eval(pl.element().struct.field("score")).cast(pl.List(pl.Float64)).alias(alias)


def _require(df: pl.DataFrame, name: str) -> None:
    missing = TRAINER_FORMATS[name].needs - set(df.columns)
    if missing:
        raise pl.exceptions.ColumnNotFoundError(f"format {name!r} needs column(s) {sorted(missing)}; the rows have "
                                                f"{sorted(df.columns)}")


def _optional(df: pl.DataFrame, *columns: str) -> list[str]:
    return [c for c in columns if c in df.columns]


def _margin(df: pl.DataFrame, options: FormatOptions) -> list[pl.Expr]:
    """A float `margin` for every row (TRL and OpenRLHF batch it as a tensor, so no nulls: 0.0 = no margin),
    or no column for mode "none"."""
    if options.margin == "none" or "margin" not in df.columns:
        return []
    margin = pl.col("margin").cast(pl.Float64).fill_null(0.0).fill_nan(0.0)
    if options.margin == "scaled":
        if options.score_range is None:
            raise ValueError("margin: scaled needs the score range of the stage that scored the answers "
                             "(critique score_range or feedback reward_range); use margin: raw or none")
        low, high = options.score_range
        margin = margin / float(high - low)
    return [margin.alias("margin")]


def _scores(df: pl.DataFrame) -> list[pl.Expr]:
    return [pl.col(c).cast(pl.Float64) for c in _optional(df, "chosen_score", "rejected_score")]


def _provenance(df: pl.DataFrame) -> list[pl.Expr]:
    return [pl.col(c) for c in _optional(df, *PROVENANCE)]


def to_trl(df: pl.DataFrame, options: FormatOptions) -> pl.DataFrame:
    """TRL conversational preference data with explicit prompt (+ critiques and scores when present, `margin`
    when asked for).

    TRL keeps only `chosen_ids`, `rejected_ids` and `margin` after tokenizing, so the critiques and scores are
    harmless to `RewardTrainer`/`DPOTrainer` and useful to people reading the data; `margin` is not harmless."""
    extras = [_critique_texts(c) for c in _optional(df, "chosen_critiques", "rejected_critiques")]
    return df.select(pl.col("prompt"), _as_assistant_message("chosen"), _as_assistant_message("rejected"),
                     *_margin(df, options), *extras, *_scores(df), *_provenance(df))


def to_trl_implicit(df: pl.DataFrame, options: FormatOptions) -> pl.DataFrame:
    """TRL conversational preference data with implicit prompt: `chosen`/`rejected` are whole conversations."""
    return df.select(_conversation("chosen"), _conversation("rejected"), *_margin(df, options),
                     *_scores(df), *_provenance(df))


def to_openrlhf(df: pl.DataFrame, options: FormatOptions) -> pl.DataFrame:
    """OpenRLHF's RewardDataset with `--data.apply_chat_template` and no prompt key (its usual recipe): it
    renders `chosen` and `rejected` with the chat template as they are, so each is the whole conversation.
    (An answer alone would train on answers without their prompts; `train_dpo` splits the prompt off itself,
    from `chosen[:-1]`.) `margin` is used only with `--model.margin_loss_enable`."""
    return df.select(_conversation("chosen"), _conversation("rejected"), *_margin(df, options),
                     *_provenance(df))


_SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


def _sharegpt_messages(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"from": _SHAREGPT_ROLE.get(m["role"], m["role"]), "value": m["content"]} for m in messages]


def to_llama_factory(df: pl.DataFrame, options: FormatOptions) -> pl.DataFrame:
    """LLaMA-Factory's ShareGPT pairwise rows: `conversations` (system?, human, gpt, ..., human), and `chosen`
    and `rejected` as single {from: gpt, value} messages (see `llama_factory_dataset_info`)."""
    conversations = pl.Series("conversations", [_sharegpt_messages(p) for p in df["prompt"].to_list()],
                              dtype=pl.List(SHAREGPT))
    gpt = lambda column: pl.struct(pl.lit("gpt").alias("from"), pl.col(column).alias("value")).alias(column)  # noqa: E731
    return df.select(conversations, gpt("chosen"), gpt("rejected"), *_margin(df, options), *_provenance(df))


def to_critic_rm(df: pl.DataFrame, options: FormatOptions) -> pl.DataFrame:
    """Pairs with their filtered critiques (texts and scores), for joint critique + reward training."""
    return df.select(pl.col("prompt"), pl.col("chosen"), pl.col("rejected"),
                     _critique_texts("chosen_critiques"), _critique_texts("rejected_critiques"),
                     _critique_scores("chosen_critiques", "chosen_critique_scores"),
                     _critique_scores("rejected_critiques", "rejected_critique_scores"),
                     *_scores(df), *_margin(df, options), *_provenance(df))


def to_cloud(df: pl.DataFrame, options: FormatOptions) -> pl.DataFrame:
    """Critique-out-loud: the pair with the surviving critiques of each answer as feedback texts."""
    return df.select(pl.col("prompt"), pl.col("chosen"), pl.col("rejected"),
                     _critique_texts("chosen_critiques", "chosen_feedback"),
                     _critique_texts("rejected_critiques", "rejected_feedback"),
                     *_scores(df), *_margin(df, options), *_provenance(df))


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def critique_reply(critique: dict[str, Any]) -> str:
    """The JSON a critique model answers with (the critique stage's reply schema)."""
    if critique.get("criterion_scores"):
        scores = {c["name"]: _number(c["score"]) for c in critique["criterion_scores"]}
        return json.dumps({"critique": critique["text"], "scores": scores}, ensure_ascii=False)
    return json.dumps({"critique": critique["text"], "score": _number(critique["score"])}, ensure_ascii=False)


def default_critique_prompt(prompt: list[dict[str, str]], response: str, critique: dict[str, Any]) \
        -> list[dict[str, str]]:
    """The critique request for `critique-sft` when the run's own cannot be re-rendered: no critique stage in the
    pipeline, or its template gone or changed since the run (a run directory moved away from its YAML).

    It is the user message of prompts/critique.jinja in substance, written here rather than rendered from that
    file on purpose: that template needs the critique stage's `score_range` and the rubric's descriptions, which
    a critique row does not record, so rendering it would tell the critic a score range (and criteria) it may
    never have been shown. This stand-in names only what the row holds: the conversation, the reply and the
    criterion names."""
    conversation = "\n".join(f"{m['role'].upper()}: {m['content']}" for m in prompt)
    if critique.get("criterion_scores"):
        names = ", ".join(c["name"] for c in critique["criterion_scores"])
        ask = f"Then score it on each criterion ({names}). Answer in JSON: {{\"critique\": \"...\", \"scores\": {{...}}}}"
    else:
        ask = "Then give an overall score. Answer in JSON: {\"critique\": \"...\", \"score\": <score>}"
    return [{"role": "user", "content": f"Here is a conversation between a user and an AI assistant:\n\n"
             f"{conversation}\n\nHere is the assistant's next reply:\n\nASSISTANT: {response}\n\n"
             f"Write a short critique of this reply: what it does well, what it does badly.\n{ask}"}]


def to_critique_sft(df: pl.DataFrame, options: FormatOptions) -> pl.DataFrame:
    """One chat example per surviving critique: the critique prompt (system + user, as the critique stage sent
    it) then the critique and score JSON as the assistant turn."""
    render = options.critique_prompt or default_critique_prompt
    rows: dict[str, list] = {"messages": [], "target": [], "score": [], "sample_index": [], "model": []}
    provenance = _optional(df, *PROVENANCE)
    for name in provenance:
        rows[name] = []
    for row in df.iter_rows(named=True):
        for target in ("chosen", "rejected"):
            for critique in row.get(f"{target}_critiques") or []:
                messages = [dict(m) for m in render(row["prompt"], row[target], critique)]
                messages.append({"role": "assistant", "content": critique_reply(critique)})
                rows["messages"].append(messages)
                rows["target"].append(target)
                rows["score"].append(float(critique["score"]))
                rows["sample_index"].append(critique.get("sample_index"))
                rows["model"].append(critique.get("model"))
                for name in provenance:
                    rows[name].append(row[name])
    schema = {"messages": pl.List(MESSAGE), "target": pl.Utf8, "score": pl.Float64, "sample_index": pl.Int64,
              "model": pl.Utf8, **{name: df.schema[name] for name in provenance}}
    return pl.DataFrame(rows, schema=schema)


# -- conversations: what a trainer's max_length cuts ----------------------------------------------

_FROM_SHAREGPT = {"system": "system", "human": "user", "gpt": "assistant"}


def _with_answer(prompts: list, answers: list) -> list:
    return [list(p) + [{"role": "assistant", "content": a}] for p, a in zip(prompts, answers)]


def _pair_rows(chosen: list, rejected: list) -> list[list[Messages]]:
    return [list(row) for row in zip(chosen, rejected)]


def _conversations_in_answers(frame: pl.DataFrame) -> list[list[Messages]]:
    """trl-implicit, openrlhf: `chosen` and `rejected` are whole conversations already."""
    return _pair_rows(frame["chosen"].to_list(), frame["rejected"].to_list())


def _trl_conversations(frame: pl.DataFrame) -> list[list[Messages]]:
    prompts = frame["prompt"].to_list()
    chosen, rejected = ([p + a for p, a in zip(prompts, frame[c].to_list())] for c in ("chosen", "rejected"))
    return _pair_rows(chosen, rejected)


def _llama_factory_conversations(frame: pl.DataFrame) -> list[list[Messages]]:
    prompts = [[{"role": _FROM_SHAREGPT[t["from"]], "content": t["value"]} for t in turns]
               for turns in frame["conversations"].to_list()]
    chosen, rejected = (_with_answer(prompts, [m["value"] for m in frame[c].to_list()]) for c in ("chosen", "rejected"))
    return _pair_rows(chosen, rejected)


def _text_pair_conversations(frame: pl.DataFrame) -> list[list[Messages]]:
    """critic-rm, cloud: prompt messages and answer texts."""
    prompts = frame["prompt"].to_list()
    chosen, rejected = (_with_answer(prompts, frame[c].to_list()) for c in ("chosen", "rejected"))
    return _pair_rows(chosen, rejected)


def _critique_sft_conversations(frame: pl.DataFrame) -> list[list[Messages]]:
    return [[m] for m in frame["messages"].to_list()]


# -- side files -----------------------------------------------------------------------------------


def split_file_name(split: str) -> str:
    """A split's data file in an export folder (`export/<format>/` of a run, or `selfalign export --to`)."""
    return f"{split}.parquet"


def _llama_factory_side_files(split_names: tuple[str, ...], hub_repo: str | None) -> dict[str, Any]:
    info = (llama_factory_dataset_info(hub_repo=hub_repo, split_names=split_names) if hub_repo is not None
            else llama_factory_dataset_info(splits={split: split_file_name(split) for split in split_names}))
    return {"dataset_info.json": info}


# -- the table ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainerFormat:
    """One trainer format, all that selfalign knows of it."""

    needs: frozenset[str]  # columns the final rows must have
    build: Callable[[pl.DataFrame, FormatOptions], pl.DataFrame]  # final rows -> rows in this format
    # Per row of the built frame, the conversations its trainer tokenizes: the prompt with each answer for the
    # pair formats (TRL drops a row when either is longer than max_length, OpenRLHF truncates), the messages
    # for critique-sft. The export stage's row lengths are measured on them.
    conversations: Callable[[pl.DataFrame], list[list[Messages]]]
    usage: str  # how its trainer loads it, for the dataset card and `selfalign export` (REPO: Hub id or folder)
    # The trainer puts `margin` into its loss (TRL's RewardTrainer whenever the column exists, OpenRLHF's train_rm
    # with --model.margin_loss_enable), so its `margin` column is the export stage's `margin:` (default none).
    # The others keep the raw score difference as data: their consumers do not read it.
    margin_in_loss: bool = False
    # (split names, Hub repo id or None for a local folder) -> {file name: JSON}: files the trainer reads beside
    # the data. Written beside the split files in a local folder, at the repo root on the Hub.
    side_files: Callable[[tuple[str, ...], str | None], dict[str, Any]] | None = None


TRAINER_FORMATS: dict[str, TrainerFormat] = {
    "trl": TrainerFormat(
        PAIR, to_trl, _trl_conversations, margin_in_loss=True,
        usage="TRL `RewardTrainer` / `DPOTrainer`: `load_dataset(\"REPO\", \"trl\")` (conversational, explicit "
              "prompt; a `margin` column, when exported, enters `RewardTrainer`'s loss)"),
    "trl-implicit": TrainerFormat(
        PAIR, to_trl_implicit, _conversations_in_answers, margin_in_loss=True,
        usage="TRL `RewardTrainer` / `DPOTrainer`: `load_dataset(\"REPO\", \"trl-implicit\")` (conversational, "
              "implicit prompt)"),
    "openrlhf": TrainerFormat(
        PAIR, to_openrlhf, _conversations_in_answers, margin_in_loss=True,
        usage="OpenRLHF `train_rm` / `train_dpo`: `--data.dataset REPO@openrlhf --data.apply_chat_template` "
              "(`chosen`/`rejected` are whole conversations: no `--data.prompt_key`; rows longer than "
              "`--data.max_len`, default 512 tokens, are truncated; with a `margin` column add "
              "`--model.margin_loss_enable` to use it)"),
    "llama-factory": TrainerFormat(
        PAIR, to_llama_factory, _llama_factory_conversations, side_files=_llama_factory_side_files,
        usage="LLaMA-Factory: `dataset_dir: REMOTE:REPO` (or the export folder) and `dataset: selfalign_train`; "
              "entries in `dataset_info.json` (`formatting: sharegpt`, `ranking: true`)"),
    "critic-rm": TrainerFormat(
        PAIR | CRITIQUES, to_critic_rm, _text_pair_conversations,
        usage="joint critique + reward training (Critic-RM): the pair, surviving critiques and their scores"),
    "cloud": TrainerFormat(
        PAIR | CRITIQUES, to_cloud, _text_pair_conversations,
        usage="critique-out-loud reward models: `chosen_feedback` / `rejected_feedback`"),
    "critique-sft": TrainerFormat(
        PAIR | CRITIQUES, to_critique_sft, _critique_sft_conversations,
        usage="critique-writing SFT (e.g. TRL `SFTTrainer`): `messages` per surviving critique"),
}
FORMAT_NAMES = tuple(TRAINER_FORMATS)
FormatName = Literal[FORMAT_NAMES]
MARGIN_FORMATS = tuple(name for name, fmt in TRAINER_FORMATS.items() if fmt.margin_in_loss)
# One field of every format, for the readers that need only that one.
NEEDS: dict[str, frozenset[str]] = {name: fmt.needs for name, fmt in TRAINER_FORMATS.items()}
USAGE: dict[str, str] = {name: fmt.usage for name, fmt in TRAINER_FORMATS.items()}


def format_frame(name: str, df: pl.DataFrame, critique_prompt: CritiquePrompt | None = None,
                 margin: MarginMode = "none", score_range: tuple[float, float] | None = None) -> pl.DataFrame:
    """Rows in format `name`. `margin` (and `score_range` for "scaled") set the `margin` column of the formats in
    MARGIN_FORMATS; the others carry the raw difference whatever they are given."""
    _require(df, name)
    fmt = TRAINER_FORMATS[name]
    if not fmt.margin_in_loss:
        margin, score_range = "raw", None
    return fmt.build(df, FormatOptions(critique_prompt, margin, score_range))


def percentiles(values: list[int]) -> dict[str, int | None]:
    """p50, p90, p99 and max by nearest rank: at least that share of the values is no larger (so max_length set
    to p99 keeps at least 99% of the rows)."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    ordered = sorted(values)
    pick = lambda q: ordered[max(0, math.ceil(q * len(ordered)) - 1)]  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": ordered[-1]}


def llama_factory_dataset_info(*, name: str = "selfalign", splits: dict[str, str] | None = None,
                               hub_repo: str | None = None, subset: str = "llama-factory",
                               split_names: tuple[str, ...] = ("train", "test")) -> dict[str, Any]:
    """`dataset_info.json` entries for LLaMA-Factory: `<name>_<split>` for each split, either local files
    (`splits`: split -> file name relative to dataset_dir) or a Hub dataset (`hub_repo`, config `subset`)."""
    common = {
        "formatting": "sharegpt",
        "ranking": True,
        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
        "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "system_tag": "system"},
    }
    entries = {}
    if hub_repo is not None:
        for split in split_names:
            entries[f"{name}_{split}"] = {"hf_hub_url": hub_repo, "subset": subset, "split": split, **common}
    else:
        for split, file_name in (splits or {}).items():
            entries[f"{name}_{split}"] = {"file_name": file_name, **common}
    return entries


def prompt_bucket(prompt: list[dict[str, str]]) -> float:
    """A stable number in [0, 1) from the prompt's text: the same prompt always lands in the same split."""
    text = "\n".join(f"{m['role']}:{m['content'].strip().lower()}" for m in prompt)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def prompt_buckets(prompts: pl.Series, slice_rows: int = 100_000) -> pl.Series:
    """`prompt_bucket` of every prompt, a slice at a time: the whole column as Python objects would take
    several times the memory of the frame."""
    buckets = []
    for start in range(0, len(prompts), slice_rows):
        buckets.extend(prompt_bucket(p) for p in prompts.slice(start, slice_rows).to_list())
    return pl.Series(buckets, dtype=pl.Float64)


def split_by_prompt(df: pl.DataFrame, test_size: float) -> dict[str, pl.DataFrame]:
    if test_size <= 0 or df.height == 0:
        return {"train": df}
    is_test = prompt_buckets(df["prompt"]) < test_size
    return {"train": df.filter(~is_test), "test": df.filter(is_test)}


# -- what the card and the report say about margin and lengths -----------------------------------------

MARGIN_NOTE = ("`margin`: TRL's `RewardTrainer` puts a `margin` column into its loss whenever the column exists, "
               "`-logsigmoid(r_chosen - r_rejected - margin)`, with no switch to turn it off; OpenRLHF does with "
               "`--model.margin_loss_enable`. So `trl`, `trl-implicit` and `openrlhf` have one only when the export "
               "stage asks for it: `margin: raw` (the critique score difference, up to 9 on a 1-10 scale: the "
               "reward model is asked for that many logits of gap and the loss starts near the margin instead of "
               "log 2 = 0.69) or `margin: scaled` (divided by the score range, in [0, 1]). `llama-factory`, "
               "`critic-rm` and `cloud` carry the raw difference as data; their consumers do not read it.")

LENGTHS_NOTE = ("Choose the trainer's length limit knowingly: TRL's `RewardTrainer` drops every pair whose chosen "
                "or rejected conversation (prompt + answer, chat template applied) is longer than `max_length` "
                "(default 1024 tokens) without a warning, and OpenRLHF truncates at `--data.max_len` (default 512 "
                "tokens). Each row counts as its longer conversation, over all splits; pN: at least N% of the "
                "rows are no longer.")


def export_metrics(manifest: dict[str, Any]) -> dict[str, Any]:
    """The export stage's metrics in a run's manifest (`exported`, `margin`, `lengths`); {} without one."""
    for entry in manifest.get("rows") or []:
        if entry.get("kind") == "export":
            return entry.get("metrics") or {}
    return {}


def length_rows(manifest: dict[str, Any], formats: Any = None) -> list[list[Any]]:
    """[format, unit, rows, p50, p90, p99, max] per exported format (only `formats`, when given)."""
    rows = []
    for name, stats in (export_metrics(manifest).get("lengths") or {}).items():
        if formats is not None and name not in formats:
            continue
        unit = stats.get("unit", "?")
        if unit == "tokens" and stats.get("tokenizer"):
            unit = f"tokens ({stats['tokenizer']})"
        elif unit == "characters":
            unit = "characters (no tokenizer: set `tokenizer:` on the export stage for tokens)"
        rows.append([name, unit, stats.get("rows"), stats.get("p50"), stats.get("p90"), stats.get("p99"),
                     stats.get("max")])
    return rows
