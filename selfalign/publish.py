"""Publishing a finished run: local export for training, and a push to the Hugging Face Hub.

`export_run(run_dir, fmt, to_dir)` writes `<to_dir>/<split>.parquet` (+ `dataset_info.json` for LLaMA-Factory).
`push_run(run_dir, repo_id)` pushes every trainer format as a `datasets` config (`load_dataset(repo, "trl")`),
then the dataset card (README.md, see card.py), its score histograms, `dataset_info.json` for LLaMA-Factory
and `selfalign/pipeline.yaml` + `selfalign/manifest.json` in one more commit. Repos are private unless asked.

The token comes from the caller, `HF_TOKEN` or the `huggingface_hub` login (token=None lets the library find
it). It is never printed, logged or written: errors are re-raised as `PublishError` with it scrubbed out, and
every text file uploaded is checked for it.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import polars as pl

from .card import CardInputs, render_card, render_histograms
from .errors import SelfalignError
from .trainer_formats import (FORMAT_NAMES, NEEDS, CritiquePrompt, default_critique_prompt, format_frame,
                              llama_factory_dataset_info, split_by_prompt)

DEFAULT_TEST_SIZE = 0.1
REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
REDACTED = "<redacted>"


class PublishError(SelfalignError):
    """A run cannot be exported or pushed: names what is wrong and what to do."""


# -- reading a run directory -----------------------------------------------------------------------


@dataclass
class Run:
    run_dir: Path
    manifest: dict[str, Any]
    frame: pl.DataFrame                      # the final rows (canonical columns)
    pipeline_text: str | None = None
    pipeline_file: str | None = None
    pipeline_matches_run: bool | None = None
    loaded: Any = None                       # LoadedPipeline, when the YAML loads
    test_row_ids: set[str] | None = None     # the test split the run's export stage made, if any

    @property
    def name(self) -> str:
        return self.manifest.get("name") or self.run_dir.name

    @property
    def stages(self) -> list[Any] | None:
        return self.loaded.pipeline.stages if self.loaded is not None else None


def _stage_file(run_dir: Path, folder: str, entry: dict[str, Any]) -> Path:
    return run_dir / folder / f"{entry['stage']:02d}-{entry['kind']}.parquet"


def _pipeline_source(run_dir: Path, manifest: dict[str, Any]) -> tuple[Path | None, str | None]:
    """The YAML the run used: a copy in the run directory (`pipeline.yaml`) or the manifest's `pipeline_file`."""
    candidates = [run_dir / "pipeline.yaml"]
    if manifest.get("pipeline_file"):
        candidates.append(Path(manifest["pipeline_file"]))
    for path in candidates:
        try:
            return path, path.read_text(encoding="utf-8")
        except OSError:
            continue
    return None, None


def _exported_test_ids(run_dir: Path, manifest: dict[str, Any]) -> set[str] | None:
    for entry in manifest.get("rows") or []:
        for name in (entry.get("metrics") or {}).get("exported", {}):
            path = run_dir / "export" / name / "test.parquet"
            try:
                frame = pl.read_parquet(path, columns=["row_id"])
            except Exception:  # noqa: BLE001 - missing file or no row_id: try the next format
                continue
            return set(frame["row_id"].to_list())
    return None


def load_run(run_dir: str | Path) -> Run:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PublishError(f"{run_dir} is not a run directory; pass outputs/<pipeline name> of a finished "
                           "`selfalign run`")
    try:
        manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PublishError(f"{run_dir} has no manifest.json: the run has not finished; run `selfalign run "
                           "PIPELINE.yaml` (it resumes from its cache) and publish after it completes") from None
    except (OSError, ValueError) as exc:
        raise PublishError(f"{run_dir / 'manifest.json'} cannot be read ({exc}); re-run the pipeline to "
                           "rewrite it") from None
    funnel = manifest.get("rows") or []
    if manifest.get("status") != "complete" or not funnel:
        raise PublishError(f"{run_dir}: the run is not complete (status {manifest.get('status')!r}); re-run "
                           "`selfalign run PIPELINE.yaml` to finish it")
    final = _stage_file(run_dir, "stages", funnel[-1])
    try:
        frame = pl.read_parquet(final)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise PublishError(f"{final} cannot be read ({exc}); re-run the pipeline to rewrite it") from None
    run = Run(run_dir, manifest, frame)
    path, text = _pipeline_source(run_dir, manifest)
    if text is not None:
        run.pipeline_text, run.pipeline_file = text, str(path)
        try:
            from .config import load_pipeline
            from .runner import config_hash

            run.loaded = load_pipeline(path)
            run.pipeline_matches_run = config_hash(run.loaded) == manifest.get("config_sha256")
        except Exception:  # noqa: BLE001 - the card then shows the YAML text only
            run.loaded = None
    else:
        run.pipeline_file = manifest.get("pipeline_file")
    run.test_row_ids = _exported_test_ids(run_dir, manifest)
    return run


def _test_size(stages: list[Any] | None) -> float:
    for stage in reversed(stages or []):
        if getattr(stage, "kind", None) in ("export", "publish") and getattr(stage, "test_size", None) is not None:
            return stage.test_size
    return DEFAULT_TEST_SIZE


def run_splits(run: Run, test_size: float | None = None) -> dict[str, pl.DataFrame]:
    """The run's train/test split: the one its export stage wrote (by row id) when there is one, else by the
    prompt hash with the export stage's test_size (default 0.1)."""
    frame = run.frame
    if test_size is None and run.test_row_ids is not None and "row_id" in frame.columns:
        is_test = pl.col("row_id").is_in(list(run.test_row_ids))
        splits = {"train": frame.filter(~is_test), "test": frame.filter(is_test)}
    else:
        splits = split_by_prompt(frame, _test_size(run.stages) if test_size is None else test_size)
    return {name: part for name, part in splits.items() if part.height or name == "train"}


def critique_prompt_for(run: Run) -> CritiquePrompt:
    """Re-render the critique stage's exact messages (template and hash checked against the manifest); the
    built-in prompt when the template is gone or changed."""
    from .check import resolve_path
    from .prompts import load_template
    from .stages.export import critique_prompt_from_stages

    if run.loaded is None:
        return default_critique_prompt
    expected = run.manifest.get("templates") or {}

    def template(value: str):
        loaded = load_template(resolve_path(value, run.loaded.path))
        if value in expected and loaded.sha256 != expected[value]:
            raise ValueError(f"{value} changed since the run")
        return loaded

    render = critique_prompt_from_stages(run.stages, template)
    if render is None:
        return default_critique_prompt

    def safe(prompt, response, critique):
        try:
            return render(prompt, response, critique)
        except Exception:  # noqa: BLE001 - template missing or edited: the built-in prompt still teaches the task
            return default_critique_prompt(prompt, response, critique)
    return safe


def _check_formats(formats: Iterable[str], frame: pl.DataFrame) -> list[str]:
    formats = list(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in FORMAT_NAMES]
    if unknown:
        raise PublishError(f"unknown format(s) {unknown}; choose from {', '.join(FORMAT_NAMES)}")
    for name in formats:
        missing = NEEDS[name] - set(frame.columns)
        if missing:
            raise PublishError(f"format {name!r} needs column(s) {sorted(missing)} that this run's rows do not "
                               f"have (they have {sorted(frame.columns)}); add the stage that makes them (critique + "
                               "consistency for critique columns) or choose another format")
    return formats


def build_formats(run: Run, formats: Iterable[str], splits: dict[str, pl.DataFrame] | None = None) \
        -> dict[str, dict[str, pl.DataFrame]]:
    formats = _check_formats(formats, run.frame)
    splits = run_splits(run) if splits is None else splits
    critique_prompt = critique_prompt_for(run) if "critique-sft" in formats else None
    return {name: {split: format_frame(name, part, critique_prompt) for split, part in splits.items()}
            for name in formats}


# -- local export ----------------------------------------------------------------------------------


def export_run(run_dir: str | Path, fmt: str, to_dir: str | Path) -> dict[str, Path]:
    """Write `<to_dir>/<split>.parquet` in format `fmt` (+ `dataset_info.json` for llama-factory); returns
    {split or 'dataset_info': path}."""
    from .stages.export import write_format

    run = load_run(run_dir)
    frames = build_formats(run, [fmt])[fmt]
    to_dir = Path(to_dir)
    try:
        write_format(frames, fmt, to_dir)
    except OSError as exc:
        raise PublishError(f"cannot write {to_dir}: {exc.strerror}; choose another --to directory") from None
    written = {split: to_dir / f"{split}.parquet" for split in frames}
    if fmt == "llama-factory":
        written["dataset_info"] = to_dir / "dataset_info.json"
    return written


# -- push ------------------------------------------------------------------------------------------


def _secrets(token: str | None) -> list[str]:
    found = [token] if isinstance(token, str) else []
    try:
        from huggingface_hub import get_token

        found.append(get_token())
    except Exception:  # noqa: BLE001
        pass
    return sorted({s for s in found if s and len(s) >= 4}, key=len, reverse=True)


def scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text


def _hub_error(exc: BaseException, repo_id: str, secrets: list[str]) -> PublishError:
    """A Hub/client failure as a PublishError with a fix, the token scrubbed from every word of it."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    detail = scrub(f"{type(exc).__name__}: {exc}", secrets).strip().splitlines()
    detail = detail[0] if detail else type(exc).__name__
    from huggingface_hub import constants

    endpoint = constants.ENDPOINT
    if status == 401:
        message = (f"the Hub at {endpoint} rejected the token (401); set HF_TOKEN to a valid write token or run "
                   "`hf auth login`")
    elif status == 403:
        message = (f"the token may not write to {repo_id} (403); use a token with write access to that namespace "
                   "(a fine-grained token needs 'write' on it)")
    elif status == 404:
        message = f"{repo_id} was not found on {endpoint} (404); check the namespace and that the token can see it"
    elif status is not None:
        message = f"the Hub at {endpoint} answered {status} while pushing {repo_id}; try again later"
    elif isinstance(exc, (ConnectionError, OSError, TimeoutError)) or "connect" in type(exc).__name__.lower():
        message = f"cannot reach the Hub at {endpoint}; check the network (and HF_ENDPOINT if you set it)"
    else:
        message = f"pushing {repo_id} failed"
    return PublishError(f"{message} [{detail}]")


def _write_text(path: Path, text: str, secrets: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(scrub(text, secrets), encoding="utf-8")


def card_inputs(run: Run, splits: dict[str, pl.DataFrame], formatted: dict[str, dict[str, pl.DataFrame]],
                default_format: str | None, license: str, repo_id: str | None) -> CardInputs:
    critique_scores = None
    for entry in run.manifest.get("rows") or []:
        if entry["kind"] != "critique":
            continue
        try:
            stage = pl.read_parquet(_stage_file(run.run_dir, "stages", entry))
        except (OSError, pl.exceptions.PolarsError):
            continue
        parts = [stage.select(pl.col(f"{t}_critiques").alias("c")).explode("c").drop_nulls("c")
                 .select(target=pl.lit(t), score=pl.col("c").struct.field("score").cast(pl.Float64))
                 for t in ("chosen", "rejected") if f"{t}_critiques" in stage.columns]
        if parts:
            frame = pl.concat(parts)
            critique_scores = frame if critique_scores is None else pl.concat([critique_scores, frame])
    return CardInputs(
        name=run.name, manifest=run.manifest, frame=run.frame, splits=splits,
        formats={name: {split: part.height for split, part in frames.items()} for name, frames in formatted.items()},
        default_format=default_format, pipeline_text=run.pipeline_text, pipeline_file=run.pipeline_file,
        pipeline_matches_run=run.pipeline_matches_run, stages=run.stages, critique_scores=critique_scores,
        license=license, repo_id=repo_id)


def write_card(run: Run, directory: str | Path, formats: Iterable[str] | None = None, repo_id: str | None = None,
               license: str = "other", existing_metadata: dict[str, Any] | None = None, secrets: Iterable[str] = (),
               splits: dict[str, pl.DataFrame] | None = None,
               formatted: dict[str, dict[str, pl.DataFrame]] | None = None) -> Path:
    """Render README.md and its images (`assets/*.png`) into `directory`, as `push_run` uploads them; returns
    the README path. Without `repo_id` the card says REPO where the Hub id goes."""
    directory = Path(directory)
    splits = run_splits(run) if splits is None else splits
    if formatted is None:
        formatted = build_formats(run, formats or supported_formats(run.frame), splits)
    default = "trl" if "trl" in formatted else next(iter(formatted))
    inputs = card_inputs(run, splits, formatted, default, license, repo_id)
    images = render_histograms(inputs, directory)
    readme = directory / "README.md"
    _write_text(readme, render_card(inputs, images, existing_metadata), list(secrets))
    return readme


def _resolve_repo(api, repo_id: str) -> str:
    if "/" in repo_id:
        return repo_id
    return f"{api.whoami()['name']}/{repo_id}"


def push_run(run_dir: str | Path, repo_id: str, private: bool = True, formats: Iterable[str] | None = None,
             token: str | None = None, license: str = "other",
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Push a finished run to the Hub: one `datasets` config per format, then the card, its histograms, the
    LLaMA-Factory `dataset_info.json` and the pipeline + manifest. Returns {repo_id, url, private, configs}."""
    run = load_run(run_dir)
    return push_frames(run, repo_id, private=private, formats=formats, token=token, license=license, log=log)


def push_frames(run: Run, repo_id: str, private: bool = True, formats: Iterable[str] | None = None,
                token: str | None = None, license: str = "other", splits: dict[str, pl.DataFrame] | None = None,
                log: Callable[[str], None] | None = None) -> dict[str, Any]:
    log = log or (lambda message: print(message, file=sys.stderr))
    if not REPO_ID.match(repo_id or ""):
        raise PublishError(f"--repo {repo_id!r} is not a Hub dataset id; use NAMESPACE/NAME (letters, digits, . _ -)")
    formats = _check_formats(formats or supported_formats(run.frame), run.frame)
    splits = run_splits(run) if splits is None else splits
    formatted = build_formats(run, formats, splits)

    import datasets
    from huggingface_hub import DatasetCard, HfApi, constants

    secrets = _secrets(token)
    if constants.HF_HUB_OFFLINE:
        raise PublishError("HF_HUB_OFFLINE is set, so nothing can be pushed; unset it (and HF_DATASETS_OFFLINE)")
    if not secrets:
        raise PublishError("no Hugging Face token found; set HF_TOKEN to a write token or run `hf auth login`, "
                           "then push again (nothing was pushed)")
    api = HfApi(token=token)
    default = "trl" if "trl" in formatted else formats[0]
    try:
        repo_id = _resolve_repo(api, repo_id)
        url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        info = api.repo_info(repo_id, repo_type="dataset")
    except Exception as exc:  # noqa: BLE001
        raise _hub_error(exc, repo_id, secrets) from None
    if bool(info.private) != private:
        state, wanted = ("public", "--public") if not info.private else ("private", "--private")
        raise PublishError(f"{repo_id} already exists and is {state}; pass {wanted} to push to it as it is, or "
                           "change its visibility on the Hub first (selfalign never changes it)")
    try:
        for name, frames in formatted.items():
            log(f"push: {repo_id} config {name!r}: "
                + ", ".join(f"{split} {frame.height} rows" for split, frame in frames.items()))
            dataset = datasets.DatasetDict({split: datasets.Dataset(frame.to_arrow()) for split, frame in frames.items()})
            dataset.push_to_hub(repo_id, config_name=name, set_default=(name == default) or None, private=private,
                                token=token, commit_message=f"selfalign: {run.name} ({name})")
        existing = DatasetCard.load(repo_id, repo_type="dataset", token=token).data.to_dict()
        with tempfile.TemporaryDirectory(prefix="selfalign-card-") as tmp:
            folder = Path(tmp)
            readme = write_card(run, folder, formats, repo_id, license,
                                {k: v for k, v in existing.items() if k in ("configs", "dataset_info")}, secrets,
                                splits=splits, formatted=formatted)
            DatasetCard(readme.read_text(encoding="utf-8")).validate(repo_type="dataset")
            if "llama-factory" in formatted:
                _write_text(folder / "dataset_info.json", json.dumps(llama_factory_dataset_info(
                    hub_repo=repo_id, split_names=tuple(formatted["llama-factory"])), indent=2) + "\n", secrets)
            if run.pipeline_text is not None:
                _write_text(folder / "selfalign" / "pipeline.yaml", run.pipeline_text, secrets)
            _write_text(folder / "selfalign" / "manifest.json", json.dumps(run.manifest, indent=2,
                                                                             ensure_ascii=False, default=str), secrets)
            _assert_no_secret(folder, secrets)
            log(f"push: {repo_id} dataset card, histograms, pipeline and manifest")
            api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=str(folder),
                              commit_message=f"selfalign: dataset card for {run.name}")
    except PublishError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _hub_error(exc, repo_id, secrets) from None
    configs = {name: {split: frame.height for split, frame in frames.items()} for name, frames in formatted.items()}
    return {"repo_id": repo_id, "url": str(url), "private": private, "configs": configs, "default": default}


def supported_formats(frame: pl.DataFrame) -> list[str]:
    """Every format whose columns the rows have (all seven for a Critic-RM run, the pair formats otherwise)."""
    return [name for name in FORMAT_NAMES if NEEDS[name] <= set(frame.columns)]


def _assert_no_secret(folder: Path, secrets: list[str]) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if any(secret.encode() in data for secret in secrets):
                raise PublishError(f"{path.name} would contain the Hub token; nothing more was uploaded. Remove the "
                                   "token from the pipeline file or data")


# -- command line ----------------------------------------------------------------------------------


def cmd_push(args) -> int:
    result = push_run(args.run_dir, args.repo, private=args.private, formats=args.format or None,
                      license=args.license)
    configs = ", ".join(f"{name} ({', '.join(f'{s} {n}' for s, n in splits.items())})"
                        for name, splits in result["configs"].items())
    print(f"pushed {result['repo_id']} ({'private' if result['private'] else 'public'}): {configs}\n"
          f"load with: datasets.load_dataset({result['repo_id']!r}, {result['default']!r})")
    return 0


def cmd_export(args) -> int:
    written = export_run(args.run_dir, args.format, args.to)
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


def add_cli(subparsers) -> None:
    """Register `push` and `export` on the `selfalign` command line (`add_cli(sub)` in cli.build_parser)."""
    push = subparsers.add_parser("push", help="push a finished run to the Hugging Face Hub (private by default)")
    push.add_argument("run_dir", metavar="RUN_DIR", help="run directory, e.g. outputs/<pipeline name>")
    push.add_argument("--repo", required=True, help="dataset repo id, NAMESPACE/NAME")
    visibility = push.add_mutually_exclusive_group()
    visibility.add_argument("--private", dest="private", action="store_true", default=True,
                            help="create the repo private (the default)")
    visibility.add_argument("--public", dest="private", action="store_false", help="create the repo public")
    push.add_argument("--format", action="append", choices=FORMAT_NAMES, metavar="FORMAT",
                      help=f"push only this format (repeatable; default: every format the rows support): "
                           f"{', '.join(FORMAT_NAMES)}")
    push.add_argument("--license", default="other", help="license for the card metadata (default: other)")
    push.set_defaults(func=cmd_push)

    export = subparsers.add_parser("export", help="write a finished run in one trainer format, for local training")
    export.add_argument("run_dir", metavar="RUN_DIR", help="run directory, e.g. outputs/<pipeline name>")
    export.add_argument("--format", required=True, choices=FORMAT_NAMES, metavar="FORMAT",
                        help=f"one of {', '.join(FORMAT_NAMES)}")
    export.add_argument("--to", required=True, metavar="DIR", help="folder for <split>.parquet")
    export.set_defaults(func=cmd_export)
