"""The pipeline file: parsed safely, validated completely, every error pointing at its line.

`load_pipeline` returns a validated `Pipeline` or raises `ConfigErrors` listing every problem as
`FILE:LINE: stage N (kind): field: message`. Nothing is written and no model is called.
"""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import Field, ValidationError, model_validator

from .backends import DEFAULT_MODEL_NAME, MODEL_CLASSES, ModelConfig
from .cache import canonical_json
from .config_base import Strict
from .errors import ConfigError, ConfigErrors
from .model_costs import Budget
from .stages import STAGES
from .yaml_source import line_for, load_yaml_with_lines

# A tenth: a few failed calls are normal (a flaky endpoint, a model that breaks the schema now and then) and
# land in dropped/; more means something is wrong with the endpoint, the prompt or the model.
DEFAULT_MAX_FAILED_FRACTION = 0.1

StageUnion = Annotated[Union[tuple(stage.config for stage in STAGES.values())], Field(discriminator="kind")]


class Executor(Strict):
    """Where model calls run: `local` (this process) or `ray` (Ray Data actor pools, see ray_executor.py)."""

    kind: Literal["local", "ray"] = "local"
    address: str | None = Field(None, description="ray: cluster address (HOST:PORT of the head, or 'auto'); "
                                                  "default: a private Ray instance started on this machine")
    replicas: int = Field(1, ge=1, le=10_000, description="ray: model replicas (actors) per model stage")
    batch_size: int = Field(64, ge=1, le=1_000_000, description="ray: requests per map_batches call")
    num_cpus: float = Field(1, ge=0, le=1024, description="ray: CPUs reserved per replica")
    num_gpus: float = Field(0, ge=0, le=64, description="ray: GPUs reserved per replica (1 per vLLM engine)")

    @model_validator(mode="after")
    def _ray_settings_need_ray(self) -> "Executor":
        # Fail closed: a Ray setting under kind: local would be silently ignored otherwise.
        ray_only = sorted(self.model_fields_set - {"kind"})
        if self.kind == "local" and ray_only:
            verb = "applies" if len(ray_only) == 1 else "apply"
            raise ValueError(f"{', '.join(ray_only)} only {verb} to kind: ray; set kind: ray or remove them")
        return self


class Pipeline(Strict):
    schema_version: int = Field(description="always 1 for now")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
                      description="names the run directory outputs/<name>; letters, digits, . _ -")
    seed: int = 0
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    stages: list[StageUnion] = Field(min_length=1)
    # Left out of dumps (config_sha256, stage fingerprints): where the calls run does not change the results.
    executor: Executor = Field(default_factory=Executor, exclude=True)
    # The failure budget: a model stage with more failed calls than this share stops the run (exit 4). Left out of
    # dumps like executor: it changes when a run stops, not what it makes.
    max_failed_fraction: float = Field(DEFAULT_MAX_FAILED_FRACTION, ge=0, le=1, exclude=True,
                                       description="stop the run when more than this share of a model stage's "
                                                   "calls failed; a stage's own max_failed_fraction overrides it")
    # Caps on what one run sends, over every model (each model may have its own too). Left out of dumps: a cap
    # changes when a run stops, not what it makes, so raising it keeps every stage's fingerprint.
    budget: Budget | None = Field(None, exclude=True, description="caps on the calls one run sends (USD, calls, "
                                                                  "tokens); the run stops with exit 5 at a cap")


@dataclass
class LoadedPipeline:
    pipeline: Pipeline
    path: Path
    lines: dict
    data: dict
    overrides: tuple[str, ...] = ()

    def line(self, *path) -> int | None:
        return line_for(self.lines, path)

    def place(self, *path) -> dict:
        """`file=` and `line=` for a ConfigError about `path`: the `--set` that wrote the value, else its line."""
        return _place(path, self.path, self.lines, self.overrides)

    def file_alone_matches(self) -> bool | None:
        """Whether the YAML file alone gives this configuration (not when --set changed it); None when the
        file no longer loads."""
        try:
            return config_hash(load_pipeline(self.path)) == config_hash(self)
        except Exception:  # noqa: BLE001 - changed or removed since: the card then says it cannot tell
            return None


def effective_models(pipeline: Pipeline) -> dict:
    """The pipeline's models, plus the embedded default under `default` when a stage relies on it."""
    models = dict(pipeline.models)
    models.setdefault(DEFAULT_MODEL_NAME, MODEL_CLASSES["llamacpp"]())
    return models


def config_hash(loaded: LoadedPipeline) -> str:
    """The manifest's `config_sha256`: the pipeline as loaded (--set applied), without executor settings."""
    return hashlib.sha256(canonical_json(loaded.pipeline.model_dump(mode="json")).encode()).hexdigest()[:16]


def override_path(assignment: str) -> tuple[str, ...]:
    """("stages", "1", "samples") for "stages.1.samples=2"."""
    return tuple(assignment.split("=", 1)[0].split("."))


def shown(assignment: str) -> str:
    """A `--set` as errors print it: the value of a key or token (refused, but typed all the same) hidden."""
    dotted, equals, _ = assignment.partition("=")
    secret = equals and dotted.rsplit(".", 1)[-1].lower().endswith(("key", "token", "secret", "password"))
    return f"{dotted}=***" if secret else assignment


def _place(path, file: Path, lines: dict, overrides: tuple[str, ...] | list[str]) -> dict:
    """Where a problem at `path` came from. A value set with `--set` is blamed on that `--set` (the YAML line
    may hold a perfectly good value that the override replaced); the last matching override wins, as it does
    when they are applied."""
    key = tuple(str(part) for part in path)
    for assignment in reversed(list(overrides)):
        target = override_path(assignment)
        if key[:len(target)] == target:
            return {"file": f"--set {shown(assignment)}", "line": None}
    return {"file": str(file), "line": line_for(lines, tuple(path))}


def apply_override(data: dict, assignment: str) -> None:
    """`--set models.critic.base_url=http://...` or `--set stages.1.samples=2` (value parsed as YAML)."""
    place = f"--set {shown(assignment)}"
    if "=" not in assignment:
        raise ConfigError("no '=' in it; write --set PATH=VALUE, e.g. --set stages.1.samples=4", file=place)
    dotted, raw = assignment.split("=", 1)
    keys = dotted.split(".")
    if not all(keys):
        raise ConfigError(f"{dotted!r} is not a dotted path (empty part); write e.g. stages.1.samples or "
                          "models.critic.base_url", file=place)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"the value is not valid YAML ({problem}); quote it, e.g. "
                          f"--set '{dotted}=\"...\"'", file=place) from None
    target: Any = data
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        where = ".".join(keys[:depth]) or "the pipeline"
        if isinstance(target, list):
            if not key.isdigit() or int(key) >= len(target):
                raise ConfigError(f"{key!r} is not an index of {where}, a list of {len(target)} items "
                                  f"(use 0 to {len(target) - 1}; stage numbers start at 0)", file=place)
            key = int(key)
        elif not isinstance(target, dict):
            raise ConfigError(f"{where} is {_yaml_kind(target)}, not a mapping, so it has no {key!r}", file=place)
        if last:
            target[key] = value
        else:
            if isinstance(target, dict) and key not in target:
                if keys[:depth] == ["models"] and key != DEFAULT_MODEL_NAME:
                    # Creating it would make a model from this one value; a misspelt name would pass unnoticed.
                    defined = sorted(target)
                    raise ConfigError(f"model {key!r} is not defined under models:{_did_you_mean(key, defined)}"
                                      f" (defined: {', '.join(defined) or 'none'}); to add a model set it whole, "
                                      f"e.g. --set 'models.{key}={{backend: openai, base_url: ..., model: ...}}'",
                                      file=place)
                target[key] = {}
            target = target[key]


def _yaml_kind(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    return "empty" if value is None else f"the {type(value).__name__} {value!r}"


def load_pipeline(path: str | Path, overrides: list[str] = ()) -> LoadedPipeline:
    path = Path(path)
    data, lines = load_yaml_with_lines(path)
    if not isinstance(data, dict):
        what = "is empty" if data is None else f"holds {_yaml_kind(data)}"
        raise ConfigErrors([ConfigError(f"{what}; a pipeline file is a mapping with schema_version, name, models, "
                                        "stages (see pipelines/quickstart.yaml)", file=str(path), line=1)])
    overrides = tuple(overrides)
    for assignment in overrides:
        apply_override(data, assignment)
    errors = _pre_checks(data, path, lines, overrides)
    if not errors:
        try:
            pipeline = Pipeline.model_validate(data)
        except ValidationError as exc:
            errors = [_to_config_error(e, data, path, lines, overrides) for e in exc.errors()]
    if errors:
        raise ConfigErrors(_unique(errors))
    return LoadedPipeline(pipeline, path, lines, data, overrides)


def _pre_checks(data: dict, path: Path, lines: dict, overrides: tuple[str, ...] = ()) -> list[ConfigError]:
    """Checks with better messages than pydantic would give."""
    errors = []
    if data.get("schema_version") not in (1, None):
        errors.append(ConfigError(f"schema_version {data['schema_version']!r} is not supported; this selfalign "
                                  "reads schema_version: 1", **_place(("schema_version",), path, lines, overrides),
                                  field="schema_version"))
    models = data.get("models")
    if isinstance(models, dict):
        for name, model in models.items():
            if isinstance(model, dict):
                model.setdefault("backend", "llamacpp")  # a model that names no backend is the embedded default
                if "api_key" in model:
                    errors.append(ConfigError(
                        "a literal API key is refused (it would land in files and logs); put it in an environment "
                        "variable and name that variable with api_key_env: OPENAI_API_KEY",
                        **_place(("models", name, "api_key"), path, lines, overrides),
                        field=f"models.{name}.api_key"))
    return errors


def _to_config_error(error: dict, data: dict, path: Path, lines: dict,
                     overrides: tuple[str, ...] = ()) -> ConfigError:
    """Turn a pydantic error into one a person can act on, at the right line."""
    loc = list(error["loc"])
    yaml_path, cursor, tags = [], data, []
    for part in loc:
        if isinstance(cursor, dict) and part in cursor:
            yaml_path.append(part)
            cursor = cursor[part]
        elif isinstance(cursor, list) and isinstance(part, int) and part < len(cursor):
            yaml_path.append(part)
            cursor = cursor[part]
        elif isinstance(part, str) and not yaml_path[-1:] == [part]:
            # A discriminated-union tag ("critique", "openai") or a key that is missing from the file.
            tags.append(part)
    stage = kind = None
    if len(yaml_path) >= 2 and yaml_path[0] == "stages":
        stage = yaml_path[1]
        stage_data = data["stages"][stage]
        kind = stage_data.get("kind") if isinstance(stage_data, dict) else None
    field_path = [str(p) for p in (yaml_path[2:] if stage is not None else yaml_path)]
    error_type, message = error["type"], error["msg"]
    if error_type == "extra_forbidden":
        message = "unknown key" + _did_you_mean(field_path[-1] if field_path else "", _allowed_keys(yaml_path, data))
    elif error_type == "missing":
        missing = str(loc[-1])
        field_path = field_path + [missing] if not field_path or field_path[-1] != missing else field_path
        message = "required field is missing"
    elif error_type == "union_tag_invalid":
        choices = sorted(STAGES) if stage is not None else sorted(MODEL_CLASSES)
        bad = str((error.get("ctx") or {}).get("tag", ""))
        field_path = field_path + [("kind" if stage is not None else "backend")]
        what = "stage kind" if stage is not None else "backend"
        message = f"unknown {what} {bad!r}{_did_you_mean(bad, choices)}; choose one of {', '.join(choices)}"
    elif error_type == "union_tag_not_found":
        message = "needs `kind:` (one of " + ", ".join(sorted(STAGES)) + ")" if stage is not None else message
    # Blame a --set by the full path of the field (a missing key or a union tag is not in yaml_path).
    full_path = ("stages", stage, *field_path) if stage is not None else tuple(field_path)
    place = _place(full_path, path, lines, overrides)
    if place["file"] == str(path):  # not from a --set: the line of the nearest key the file has
        place["line"] = line_for(lines, tuple(yaml_path))
    return ConfigError(message, **place, stage=stage, kind=kind, field=".".join(field_path) or None)


def _allowed_keys(yaml_path: list, data: dict) -> list[str]:
    """The keys valid where an unknown key was found, for "did you mean"."""
    parent = yaml_path[:-1]
    if not parent:
        return list(Pipeline.model_fields)
    if parent[0] == "stages" and len(parent) == 2:
        stage = data["stages"][parent[1]]
        cls = STAGES[stage["kind"]].config if isinstance(stage, dict) and stage.get("kind") in STAGES else None
        return list(cls.model_fields) if cls else []
    if parent == ["executor"]:
        return list(Executor.model_fields)
    if parent == ["budget"]:
        return list(Budget.model_fields)
    if parent[0] == "models" and len(parent) == 2:
        model = data["models"][parent[1]]
        cls = MODEL_CLASSES.get(model.get("backend")) if isinstance(model, dict) else None
        return list(cls.model_fields) if cls else []
    if parent[0] == "models" and len(parent) == 3:  # a key inside a model's price:, budget: or throughput:
        model = data["models"][parent[1]]
        cls = MODEL_CLASSES.get(model.get("backend")) if isinstance(model, dict) else None
        field = cls.model_fields.get(parent[2]) if cls else None
        return next((list(option.model_fields) for option in getattr(field.annotation, "__args__", ())
                     if hasattr(option, "model_fields")), []) if field else []
    if parent[0] == "stages" and len(parent) == 3:
        stage = data["stages"][parent[1]]
        cls = STAGES[stage["kind"]].config if isinstance(stage, dict) and stage.get("kind") in STAGES else None
        field = cls.model_fields.get(parent[2]) if cls else None
        annotation = getattr(field, "annotation", None)
        # A nested config may be optional (`calibrate: CalibrateConfig | None`): its keys are the config's.
        nested = [option for option in (annotation, *get_args(annotation)) if hasattr(option, "model_fields")]
        return list(nested[0].model_fields) if nested else []
    return []


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else (f"; allowed: {', '.join(choices)}" if choices else "")


def _unique(errors: list[ConfigError]) -> list[ConfigError]:
    seen, out = set(), []
    for e in errors:
        if e.format() not in seen:
            seen.add(e.format())
            out.append(e)
    return out
