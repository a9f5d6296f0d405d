"""`selfalign plan FILE`: per stage, the rows, model calls, cached calls, tokens, money and time of a run,
without calling a model.

The plan runs the pipeline as `run` would, stage after stage, with the run's own request building
(each stage's `run`), cache keys and model identities (calls.py, backends), and its
reuse of unchanged stages (reuse.py), but:
- the run directory's cache.sqlite is opened read-only: every request found there is counted as cached;
- every other request is answered by a placeholder (`PlaceholderBackend`) that counts its prompt tokens
  (tokens.py) and its max_tokens, and whose reply is schema-valid, so the stages after it run on;
- export and publish are not run (they write and push), only their rows in are counted.
So a plan over a run directory is exact for calls and cached calls, for a fresh run and for a resume alike,
as long as every call succeeds (a failed call drops its row: later stages can only get fewer).

Where a stage's input holds placeholder replies, a stage that keeps rows by what the model said (filter,
consistency, judge, refine, pair, mix) cannot be known: it passes every row on (kept and dropped, and
consistency keeps every critique), and from there on rows and calls are upper bounds ("at most N"). A
placeholder text stands for a reply of `max_tokens` tokens: a prompt that quotes it is counted as if the
reply were that long (an upper bound too).
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from . import reuse
from .backends import backend_for
from .backends.base import Completion, OnResult, Request
from .backends.fake import request_digest
from .cache import Cache
from .calls import CallStats, ModelClient
from .check import check_pipeline
from .config import LoadedPipeline, effective_models, load_pipeline
from .errors import ConfigErrors, RunError
from .progress import Progress
from .rundir import CACHE, MANIFEST, read_manifest, stage_name
from .runner import RunContext, run_dir_for
from .stages import STAGES
from .tokens import TokenCounter, counter_for

# Stages that write or push: never run by a plan; their rows in are counted.
NOT_RUN = {"export", "publish"}
# Stages whose kept rows depend on what a model said: over placeholder replies their output is a bound.
KEEPS_BY_CONTENT = {"filter", "consistency", "judge", "refine", "pair", "mix"}
# Columns a stage adds to the rows it drops; removed when dropped rows are passed on as a bound.
DROP_COLUMNS = ("drop_reason", "status", "error", "attempts", "raw_output")

PLACEHOLDER = "\u27e6reply:{tokens}\u27e7"  # stands for a reply of at most `tokens` tokens
_PLACEHOLDER = re.compile("\u27e6reply:(\\d+)\u27e7")


class ReadOnlyCache:
    """The run's cache.sqlite, read-only: a plan looks replies up and never writes (a run may hold the lock)."""

    get_many = Cache.get_many  # the run's own lookup, over this read-only connection

    def __init__(self, path: Path):
        self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        self._db.execute("SELECT 1 FROM replies LIMIT 1")  # no table: not a cache (raises sqlite3.Error)

    @classmethod
    def open(cls, path: Path) -> "ReadOnlyCache | None":
        if not path.is_file():
            return None
        try:
            return cls(path)
        except sqlite3.Error:
            return None

    def put(self, *args) -> None:
        pass

    def count_unanswered(self, calls: int = 1) -> None:
        pass

    def delete(self, keys: list[str]) -> None:
        pass

    def close(self) -> None:
        self._db.close()


def placeholder_value(schema: dict[str, Any], seed: bytes, tokens: int, defs: dict[str, Any] | None = None) -> Any:
    """A value valid under a (pydantic-generated) reply schema; its strings are placeholders of at most `tokens`
    tokens (or the string's maxLength in characters, never more tokens than characters)."""
    defs = defs if defs is not None else schema.get("$defs", {})
    if "$ref" in schema:
        return placeholder_value(defs[schema["$ref"].split("/")[-1]], seed, tokens, defs)
    number = int.from_bytes(seed[:8], "big")
    kind = schema.get("type")
    if "enum" in schema:
        return schema["enum"][number % len(schema["enum"])]
    if kind == "object":
        return {name: placeholder_value(sub, hashlib.sha256(seed + name.encode()).digest(), tokens, defs)
                for name, sub in schema.get("properties", {}).items()}
    if kind == "integer":
        low, high = schema.get("minimum", 0), schema.get("maximum", 100)
        return low + number % (high - low + 1)
    if kind == "number":
        low, high = schema.get("minimum", 0.0), schema.get("maximum", 1.0)
        return round(low + (number % 1000) / 999 * (high - low), 3)
    if kind == "boolean":
        return bool(number % 2)
    if kind == "array":
        return [placeholder_value(schema.get("items", {"type": "string"}), seed + bytes([i]), tokens, defs)
                for i in range(max(schema.get("minItems", 1), 1))]
    return PLACEHOLDER.format(tokens=min(tokens, schema.get("maxLength", tokens)))


@dataclass
class Sent:
    """What a placeholder answered: the calls a run would send."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_ceiling: int = 0
    quotes_placeholders: bool = False  # some prompt quoted an unknown reply (counted at its ceiling)


class PlaceholderBackend:
    """Stands in for the model: counts what each call would send, answers with a schema-valid placeholder."""

    def __init__(self, identity: dict[str, Any], counter: TokenCounter):
        self.identity, self.counter = identity, counter
        self.sent = Sent()

    def count_prompt(self, messages) -> tuple[int, bool]:
        ceiling, quoted, plain = 0, False, []
        for message in messages:
            content = message["content"]
            found = [int(n) for n in _PLACEHOLDER.findall(content)]
            if found:
                quoted = True
                ceiling += sum(found)
                content = _PLACEHOLDER.sub("", content)
            plain.append({"role": message["role"], "content": content})
        return self.counter.count(plain) + ceiling, quoted

    def generate(self, requests: list[Request], on_result: OnResult | None = None) -> list[Completion]:
        results = []
        for index, request in enumerate(requests):
            prompt_tokens, quoted = self.count_prompt(request.messages)
            self.sent.calls += 1
            self.sent.prompt_tokens += prompt_tokens
            self.sent.completion_ceiling += request.sampling.max_tokens
            self.sent.quotes_placeholders |= quoted
            tokens = request.sampling.max_tokens
            text = (json.dumps(placeholder_value(request.json_schema, request_digest(request), tokens))
                    if request.json_schema is not None else PLACEHOLDER.format(tokens=tokens))
            completion = Completion(text, prompt_tokens, 0)
            results.append(completion)
            if on_result is not None:
                on_result(index, completion)
        return results

    def close(self) -> None:
        pass


@dataclass
class PlanContext(RunContext):
    """A RunContext whose model clients have the run's identity and cache but a placeholder backend."""

    placeholders: dict[str, PlaceholderBackend] = field(default_factory=dict)
    counters: dict[str, TokenCounter] = field(default_factory=dict)

    def client(self, name: str) -> ModelClient:
        if name not in self.clients:
            config = effective_models(self.loaded.pipeline)[name]
            identity, _ = backend_for(config)  # the run's identity, so the run's cache keys
            self.counters[name] = counter_for(config)
            placeholder = PlaceholderBackend(identity, self.counters[name])
            self.placeholders[name] = placeholder
            self.stats[name] = CallStats()
            self.clients[name] = ModelClient(name, lambda: placeholder, identity, self.cache, self.stats[name],
                                              self.progress)
        return self.clients[name]


# ------------------------------------------------------------------------------------------- the plan

def plan_pipeline(file: str | Path, overrides: list[str] = (), limit: int | None = None,
                  output: str | Path | None = None) -> dict[str, Any]:
    loaded = load_pipeline(file, list(overrides))
    errors = check_pipeline(loaded)
    if errors:
        raise ConfigErrors(errors)
    run_dir = run_dir_for(loaded, output)
    cache = ReadOnlyCache.open(run_dir / CACHE)
    ctx = PlanContext(loaded, run_dir, cache, Progress(quiet=True), limit=limit)
    try:
        stages = _plan_stages(ctx)
    finally:
        ctx.close()
        if cache is not None:
            cache.close()
    models = _models(ctx, run_dir, stages)
    for entry in stages:
        _price_and_time(entry, models)
    return {"pipeline": str(loaded.path), "run_dir": str(run_dir), "limit": limit,
            "cache": str(run_dir / "cache.sqlite") if cache is not None else None,
            "stages": stages, "total": _total(stages), "models": models, "budget": _budget(loaded, stages)}


def _plan_stages(ctx: PlanContext) -> list[dict[str, Any]]:
    df = pl.DataFrame()
    rows_exact = True  # the rows are known (False: an upper bound)
    placeholders = False  # some earlier reply is a placeholder
    plan = []
    for index, stage in enumerate(ctx.loaded.pipeline.stages):
        [model] = stage.model_names() or [None]
        entry: dict[str, Any] = {"stage": index, "kind": stage.kind, "model": model, "rows_in": df.height,
                                 "rows_in_exact": rows_exact}
        plan.append(entry)
        if stage.kind in NOT_RUN:
            continue
        sent_before = _sent(ctx, model)
        stats_before = ctx.stats[model].as_dict() if model else None
        if model:
            ctx.placeholders[model].sent.quotes_placeholders = False
        bounded = placeholders and stage.kind in KEEPS_BY_CONTENT
        if bounded and stage.kind == "consistency":
            stage = stage.model_copy(update={"filter_critiques": False})  # every critique may survive
        output = _run_stage(ctx, index, stage, df, reusable=not placeholders)
        if index == 0:
            entry["rows_in"] = output.metrics.get("rows_read", output.kept.height + _height(output.dropped))
        if model:
            stats = ctx.stats[model].as_dict()
            sent = _sent(ctx, model)
            entry.update({
                "calls": stats["requested"] - stats_before["requested"],
                "cached": stats["cached"] - stats_before["cached"],
                "to_send": stats["sent"] - stats_before["sent"],
                "calls_exact": rows_exact,
                "reasks_at_most": (stats["sent"] - stats_before["sent"]) * (getattr(stage, "max_attempts", 1) - 1),
                "prompt_tokens": sent.prompt_tokens - sent_before.prompt_tokens,
                # Counted with the model's tokenizer, and no prompt quotes a reply not known yet.
                "prompt_tokens_exact": ctx.counters[model].exact and not sent.quotes_placeholders,
                "completion_tokens_at_most": sent.completion_ceiling - sent_before.completion_ceiling,
            })
            this_sent = entry["to_send"] > 0
            bounded = bounded or (this_sent and stage.kind in KEEPS_BY_CONTENT)
            placeholders = placeholders or this_sent
        df = output.kept
        if bounded:
            rows_exact = False
            if output.dropped is not None and output.dropped.height:
                # Every row the stage saw may survive: pass them all on, as the stage's output would look.
                extra = [c for c in DROP_COLUMNS if c in output.dropped.columns and c not in output.kept.columns]
                df = pl.concat([output.kept, output.dropped.drop(extra)], how="diagonal_relaxed")
    return plan


def _height(frame: pl.DataFrame | None) -> int:
    return 0 if frame is None else frame.height


def _sent(ctx: PlanContext, model: str | None) -> Sent:
    if model is None:
        return Sent()
    ctx.client(model)
    sent = ctx.placeholders[model].sent
    return Sent(sent.calls, sent.prompt_tokens, sent.completion_ceiling, sent.quotes_placeholders)


def _run_stage(ctx: PlanContext, index: int, stage, df: pl.DataFrame, reusable: bool):
    """The stage's output as `run` would make it: read back when the runner would reuse it (reuse.py)."""
    if reusable and reuse.is_model_stage(stage):
        fingerprint = reuse.stage_fingerprint(ctx, stage, df)
        stored = reuse.read_stored(ctx.run_dir, stage_name(index, stage.kind), fingerprint)
        if stored is not None:  # counted as the runner counts it: every call served from the cache
            for model, count in stored.requested.items():
                stats = ctx.client(model).stats
                stats.requested += count
                stats.cached += count
            return stored.output
    return STAGES[stage.kind].run(df, stage, ctx)


# ------------------------------------------------------------------------------------------- money and time

def _models(ctx: PlanContext, run_dir: Path, stages: list[dict[str, Any]]) -> dict[str, Any]:
    configs = effective_models(ctx.loaded.pipeline)
    measured = _measured(run_dir)
    models = {}
    for name in dict.fromkeys(entry["model"] for entry in stages if entry["model"]):
        config = configs[name]
        counter = ctx.counters.get(name) or counter_for(config)
        info: dict[str, Any] = {"tokens_counted_with": counter.label, "tokens_exact": counter.exact,
                                "price": config.price.model_dump() if config.price else None}
        if name in measured:
            info["throughput"] = measured[name]
        elif config.throughput is not None:
            info["throughput"] = {"source": "declared", **config.throughput.model_dump()}
        else:
            info["throughput"] = None
        models[name] = info
    return models


def _measured(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Per model, the speed the run directory's last manifest measured (only models that sent calls)."""
    try:
        manifest = read_manifest(run_dir)
    except RunError:  # no earlier run (or an unreadable manifest): nothing measured
        return {}
    found = {}
    for name, model in manifest["models"].items():
        calls = model["calls"]
        sent, seconds, completion = calls["sent"], calls["seconds"], calls["completion_tokens"]
        if sent > 0 and seconds > 0 and completion > 0:
            found[name] = {"source": f"measured in {run_dir / MANIFEST}", "calls": sent,
                           "seconds": seconds, "completion_tokens": completion,
                           "seconds_per_call": seconds / sent, "completion_tokens_per_s": completion / seconds}
    return found


def _price_and_time(entry: dict[str, Any], models: dict[str, Any]) -> None:
    if not entry.get("model"):
        return
    info = models[entry["model"]]
    price = info["price"]
    prompt, ceiling, calls = entry["prompt_tokens"], entry["completion_tokens_at_most"], entry["to_send"]
    entry["usd_at_most"] = (None if price is None else
                            (prompt * price["input_per_mtok"] + ceiling * price["output_per_mtok"]) / 1e6)
    speed = info["throughput"]
    if speed is None or not calls:
        entry["seconds"] = None if speed is None and calls else [0.0, 0.0]
        return
    if "seconds_per_call" in speed:
        # As fast as the last run, with replies as long as its replies; up to every reply at max_tokens.
        low = calls * speed["seconds_per_call"]
        high = max(low, ceiling / speed["completion_tokens_per_s"])
    else:
        reading = prompt / speed["prompt_tokens_per_s"] if speed.get("prompt_tokens_per_s") else 0.0
        low = reading + calls / speed["completion_tokens_per_s"]  # every reply one token
        high = reading + ceiling / speed["completion_tokens_per_s"]
    entry["seconds"] = [round(low, 3), round(high, 3)]


def _total(stages: list[dict[str, Any]]) -> dict[str, Any]:
    calling = [entry for entry in stages if entry.get("model")]
    total: dict[str, Any] = {key: sum(entry[key] for entry in calling) for key in
                             ("calls", "cached", "to_send", "reasks_at_most", "prompt_tokens",
                              "completion_tokens_at_most")}
    total["calls_exact"] = all(entry["calls_exact"] for entry in calling)
    total["prompt_tokens_exact"] = all(entry["prompt_tokens_exact"] for entry in calling)
    usd = [entry["usd_at_most"] for entry in calling if entry["to_send"]]
    total["usd_at_most"] = None if any(value is None for value in usd) else sum(usd)
    seconds = [entry["seconds"] for entry in calling]
    total["seconds"] = (None if any(value is None for value in seconds) else
                        [round(sum(s[0] for s in seconds), 3), round(sum(s[1] for s in seconds), 3)])
    return total


def _budget(loaded: LoadedPipeline, stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each cap beside what the plan would send against it: whether the run can pass it (and stop, exit 5)."""
    caps = []
    if loaded.pipeline.budget is not None:
        caps.append(("budget", loaded.pipeline.budget, [e for e in stages if e.get("model")]))
    for name, config in loaded.pipeline.models.items():
        if config.budget is not None:
            caps.append((f"models.{name}.budget", config.budget, [e for e in stages if e.get("model") == name]))
    found = []
    for where, budget, entries in caps:
        worst = {"max_calls": sum(e["to_send"] for e in entries),
                 "max_tokens": sum(e["prompt_tokens"] + e["completion_tokens_at_most"] for e in entries),
                 "max_usd": (None if any(e["usd_at_most"] is None for e in entries if e["to_send"]) else
                             sum(e["usd_at_most"] or 0 for e in entries))}
        for field_name in ("max_usd", "max_calls", "max_tokens"):
            limit = getattr(budget, field_name)
            if limit is not None:
                found.append({"cap": f"{where}.{field_name}", "limit": limit, "plan_at_most": worst[field_name],
                              "may_stop": worst[field_name] is not None and worst[field_name] > limit,
                              "reasks_at_most": sum(e["reasks_at_most"] for e in entries)})
    return found


# ------------------------------------------------------------------------------------------- the table

def _count(value: int, exact: bool = True, estimate: bool = False) -> str:
    return ("~" if estimate else "" if exact else "≤ ") + f"{value:,}"


def _usd(value: float | None, calls: int) -> str:
    if not calls:
        return "$0"
    if value is None:
        return "no price"
    return f"≤ ${value:.4f}" if value < 1 else f"≤ ${value:,.2f}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s" if seconds >= 1 or seconds == 0 else "<1s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m" if seconds >= 600 else f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{seconds / 3600:.1f}h"


def _time(value: list[float] | None) -> str:
    if value is None:
        return "unknown"
    low, high = value
    return "-" if high == 0 else f"{_duration(low)}-{_duration(high)}"


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as a table, with what each number means underneath."""
    header = ["#", "stage", "rows in", "model", "calls", "cached", "to send", "prompt tokens", "completion",
              "USD", "time"]
    rows = []
    for entry in plan["stages"]:
        row = [str(entry["stage"]), entry["kind"], _count(entry["rows_in"], entry["rows_in_exact"])]
        if entry.get("model"):
            info = plan["models"][entry["model"]]
            exact = entry["calls_exact"]
            prompt_exact = entry["prompt_tokens_exact"] and exact
            row += [entry["model"], _count(entry["calls"], exact), f"{entry['cached']:,}",
                    _count(entry["to_send"], exact),
                    _count(entry["prompt_tokens"], prompt_exact, estimate=not info["tokens_exact"]),
                    _count(entry["completion_tokens_at_most"], not entry["to_send"]),
                    _usd(entry["usd_at_most"], entry["to_send"]), _time(entry["seconds"])]
        else:
            row += ["-"] + [""] * 7
        rows.append(row)
    total = plan["total"]
    estimated = any(not info["tokens_exact"] for info in plan["models"].values())
    rows.append(["", "total", "", "", _count(total["calls"], total["calls_exact"]), f"{total['cached']:,}",
                 _count(total["to_send"], total["calls_exact"]),
                 _count(total["prompt_tokens"], total["prompt_tokens_exact"] and total["calls_exact"],
                        estimate=estimated),
                 _count(total["completion_tokens_at_most"], not total["to_send"]),
                 _usd(total["usd_at_most"], total["to_send"]), _time(total["seconds"])])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    left = {1, 3}

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    where = f"run directory {plan['run_dir']}" + (f", --limit {plan['limit']}" if plan["limit"] else "")
    cache = "its cache.sqlite" if plan["cache"] else "no cache yet: every call is to send"
    out = [f"plan for {plan['pipeline']} ({where}; {cache}); no model was called", "",
           line(header), *(line(r) for r in rows), ""]
    out.append("≤ is an upper bound: after a stage that keeps rows by what the model said (filter, consistency, "
               "judge, refine, pair, mix) over replies not in the cache yet, rows and calls are at most those shown; "
               "completion tokens are max_tokens x calls; a prompt quoting a reply not known yet counts it at its "
               "max_tokens. ~ is an estimate.")
    out.append(("Counts assume every call succeeds (a failed call drops its row, so later stages get fewer calls). "
                + (f"Replies that break the schema are re-asked: up to {total['reasks_at_most']:,} more calls "
                   "(max_attempts), not in the table." if total["reasks_at_most"] else "")).rstrip())
    for name, info in plan["models"].items():
        out.append(f"{name}: prompt tokens: {info['tokens_counted_with']}")
        price = info["price"]
        out.append(f"{name}: USD: " + (f"${price['input_per_mtok']:g} / ${price['output_per_mtok']:g} per million "
                                       "prompt / completion tokens (price: in the YAML)" if price else
                                       f"no price: add price: {{input_per_mtok: ..., output_per_mtok: ...}} to "
                                       f"models.{name}"))
        speed = info["throughput"]
        if speed is None:
            out.append(f"{name}: time: unknown: add throughput: {{completion_tokens_per_s: N}} to models.{name}, or "
                       "run once: the next plan uses the speed the run measured")
        elif speed["source"] == "declared":
            reading = (f", {speed['prompt_tokens_per_s']:g} prompt tokens/s" if speed.get("prompt_tokens_per_s")
                       else ", prompt reading not counted")
            out.append(f"{name}: time: declared throughput {speed['completion_tokens_per_s']:g} completion tokens/s"
                       f"{reading}; from every reply 1 token long to every reply at max_tokens")
        else:
            out.append(f"{name}: time: {speed['source']} ({speed['calls']:,} calls in {speed['seconds']:.1f}s, "
                       f"{speed['completion_tokens_per_s']:.1f} completion tokens/s); from replies as long as that "
                       "run's to every reply at max_tokens")
    for cap in plan["budget"]:
        worst = cap["plan_at_most"]
        shown = (lambda v: f"${v:.4f}") if cap["cap"].endswith("max_usd") else (lambda v: f"{v:,}")
        if worst is None:
            out.append(f"{cap['cap']} {shown(cap['limit'])}: unknown against this plan (a model without a price)")
        elif cap["may_stop"]:
            out.append(f"{cap['cap']} {shown(cap['limit'])}: this plan may need up to {shown(worst)}: the run stops "
                       "at the cap (exit 5); raise it and run the same command to go on")
        else:
            reasks = (f"; re-asks would add up to {cap['reasks_at_most']:,} calls"
                      if cap["cap"].endswith("max_calls") and cap["reasks_at_most"] else "")
            out.append(f"{cap['cap']} {shown(cap['limit'])}: enough (this plan needs at most {shown(worst)}{reasks})")
    return "\n".join(out)
