"""Publishing a Critic-RM run: local export, and a push to the Hub stand-in (tests/support/fake_hub.py) driven
by the real huggingface_hub/datasets clients, read back with `datasets.load_dataset` in a fresh process and
handed to each format's consumer."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import polars as pl
import pytest

from selfalign.config import load_pipeline
from selfalign.errors import SelfalignError
from selfalign.cli import build_parser
from selfalign.publish import CardOptions, PublishError, push_frames, run_splits, write_card
from selfalign.finished_run import load_run
from selfalign.runner import run_pipeline
from selfalign.trainer_formats import FORMAT_NAMES

try:
    from tests.support.fake_hub import FakeHub, patch_hub_clients, subprocess_env
    from tests.support.fake_pipeline import fake_pipeline_yaml, load_hh_rlhf
    from tests.test_trainer_formats import consumer_llama_factory, consumer_openrlhf, consumer_trl
except ImportError:  # tests/ is not a package on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.support.fake_hub import FakeHub, patch_hub_clients, subprocess_env
    from tests.support.fake_pipeline import fake_pipeline_yaml, load_hh_rlhf
    from tests.test_trainer_formats import consumer_llama_factory, consumer_openrlhf, consumer_trl

HH_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-test-1500.jsonl.gz"
TOKEN = "hf_test_publish_secret_token_5f2a9c"
REPO = "test-user/critic-prefs"
EN = CardOptions(language=["en"])  # the push requires the card to state the data's language

CRITIC_RM = fake_pipeline_yaml("critic-rm-hh", [
    load_hh_rlhf(HH_DATA),
    {"kind": "critique", "model": "critic", "samples": 3},
    {"kind": "consistency", "min_margin": 1},
    {"kind": "filter", "where": "chosen_critiques_kept >= 2", "reason": "too_few_consistent_critiques"},
    {"kind": "export", "formats": ["trl", "trl-implicit", "openrlhf", "llama-factory", "critic-rm", "cloud",
                                   "critique-sft"], "test_size": 0.2},
])

PAIRS_ONLY = fake_pipeline_yaml("pairs-only", [load_hh_rlhf(HH_DATA), {"kind": "export", "formats": ["trl"]}],
                                models=())


def make_run(tmp: Path, pipeline_yaml: str, limit: int) -> Path:
    if not HH_DATA.exists():
        pytest.fail(f"{HH_DATA} is missing: the tests need ../shared/data beside the project (CI has it)")
    pipeline = tmp / "pipeline.yaml"
    pipeline.write_text(pipeline_yaml)
    run_pipeline(load_pipeline(pipeline), output=tmp / "run", limit=limit, quiet=True)
    return tmp / "run"


@pytest.fixture(scope="module")
def critic_run(tmp_path_factory) -> Path:
    """A Critic-RM run on 50 HH-RLHF rows with the fake backend, exported in every format."""
    return make_run(tmp_path_factory.mktemp("critic"), CRITIC_RM, 50)


@pytest.fixture(scope="module")
def pairs_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("pairs"), PAIRS_ONLY, 10)


def cli(argv: list[str]) -> int:
    """The `push`/`export` verbs as selfalign's main() runs them: SelfalignError -> message on stderr, exit 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SelfalignError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


def sorted_rows(frame: pl.DataFrame) -> list[dict]:
    return frame.sort("row_id").to_dicts()


# -- local export ----------------------------------------------------------------------------------


def test_export_writes_every_format_with_the_runs_split(critic_run, tmp_path, capsys):
    run = load_run(critic_run)
    test_ids = set(pl.read_parquet(critic_run / "export" / "trl" / "test.parquet")["row_id"].to_list())
    assert run.test_row_ids == test_ids and run_splits(run)["test"]["row_id"].to_list()
    for fmt in FORMAT_NAMES:
        assert cli(["export", str(critic_run), "--format", fmt, "--to", str(tmp_path / fmt)]) == 0
        for split in ("train", "test"):
            ours = pl.read_parquet(tmp_path / fmt / f"{split}.parquet")
            theirs = pl.read_parquet(critic_run / "export" / fmt / f"{split}.parquet")
            assert ours.height and ours.equals(theirs), (fmt, split)  # same rows as the run's export stage
        assert set(pl.read_parquet(tmp_path / fmt / "test.parquet")["row_id"].to_list()) <= test_ids
    assert "train: " in capsys.readouterr().out
    info = json.loads((tmp_path / "llama-factory" / "dataset_info.json").read_text())
    assert info == json.loads((critic_run / "export" / "llama-factory" / "dataset_info.json").read_text())
    consumer_llama_factory(pl.read_parquet(tmp_path / "llama-factory" / "train.parquet").to_dicts(), info)
    consumer_openrlhf(pl.read_parquet(tmp_path / "openrlhf" / "test.parquet").to_dicts())


def test_export_and_push_errors_say_what_to_do(critic_run, pairs_run, tmp_path, capsys):
    assert cli(["export", str(tmp_path / "nope"), "--format", "trl", "--to", str(tmp_path / "out")]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    (tmp_path / "unfinished" / "stages").mkdir(parents=True)
    assert cli(["export", str(tmp_path / "unfinished"), "--format", "trl", "--to", str(tmp_path / "out")]) == 2
    assert "has no manifest.json: the run has not finished; run `selfalign run" in capsys.readouterr().err
    assert cli(["export", str(pairs_run), "--format", "cloud", "--to", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "format 'cloud' needs column(s) ['chosen_critiques', 'rejected_critiques']" in err
    assert "add the stage that makes them" in err
    with pytest.raises(SystemExit):
        cli(["export", str(critic_run), "--format", "nonsense", "--to", str(tmp_path / "out")])
    assert cli(["push", str(critic_run), "--repo", "not a repo"]) == 2
    assert "is not a Hub dataset id" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_arguments():
    parser = build_parser()
    args = parser.parse_args(["push", "outputs/x", "--repo", "me/x"])
    # None: the pipeline's publish stage (if any) or CardOptions' defaults decide.
    assert args.private is True and args.format is None and args.license is None and args.language is None
    args = parser.parse_args(["push", "outputs/x", "--repo", "me/x", "--language", "en", "--language", "de",
                              "--license", "other", "--license-name", "my-license-1.0", "--license-link", "LICENSE",
                              "--source-license", "mit", "--source-attribution", "Anthropic HH-RLHF"])
    assert (args.language, args.license, args.license_name, args.license_link, args.source_license,
            args.source_attribution) == (["en", "de"], "other", "my-license-1.0", "LICENSE", "mit", "Anthropic HH-RLHF")
    args = parser.parse_args(["push", "outputs/x", "--repo", "me/x", "--public", "--format", "trl", "--format",
                              "openrlhf"])
    assert args.private is False and args.format == ["trl", "openrlhf"]
    with pytest.raises(SystemExit):
        parser.parse_args(["push", "outputs/x", "--repo", "me/x", "--public", "--private"])
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "outputs/x", "--format", "trl"])  # --to is required


# -- push to the Hub stand-in ----------------------------------------------------------------------


LOAD_SCRIPT = """
import json, os, sys
from datasets import load_dataset
from huggingface_hub import HfApi, hf_hub_download

repo, out, formats = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
result = {"configs": {}}
for config in formats:
    ds = load_dataset(repo, config)
    ds.save_to_disk(os.path.join(out, config))
    result["configs"][config] = {split: ds[split].num_rows for split in ds}
result["default"] = {split: n.num_rows for split, n in load_dataset(repo).items()}
result["private"] = HfApi().repo_info(repo, repo_type="dataset").private
if "llama-factory" in formats:
    result["dataset_info"] = json.load(open(hf_hub_download(repo, "dataset_info.json", repo_type="dataset")))
print(json.dumps(result))
"""


def load_in_fresh_process(hub, repo: str, out: Path, hf_home: Path, formats=FORMAT_NAMES) -> dict:
    """`datasets.load_dataset(repo, config)` for each format in a new interpreter pointed at the stand-in;
    each config is saved under `out/<config>` for the consumers."""
    env = subprocess_env(hub.url, hf_home=hf_home, token=hub.token)
    env["HF_HUB_OFFLINE"] = "0"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(LOAD_SCRIPT), repo, str(out), ",".join(formats)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert TOKEN not in proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def every_file_under(path: Path):
    return [p for p in path.rglob("*") if p.is_file()]


def test_push_creates_a_private_repo_that_loads_in_every_consumer(critic_run, tmp_path, monkeypatch, capsys,
                                                                   caplog):
    import datasets
    from huggingface_hub import DatasetCard

    caplog.set_level(logging.DEBUG)
    with FakeHub(token=TOKEN) as hub:
        # HF_TOKEN in the environment, as a user would have it; selfalign passes token=None to the clients.
        # patch_hub_clients also sets HF_HUB_DISABLE_XET=1 (here and in every push test): the stand-in speaks the
        # classic LFS upload, not Xet, the real client's default. That is for the stand-in only; selfalign itself
        # never sets it, so against the real Hub its pushes go through Xet.
        patch_hub_clients(monkeypatch, hub.url, hf_home=tmp_path / "hf_home", token=TOKEN)
        assert cli(["push", str(critic_run), "--repo", REPO, "--language", "en", "--source-license", "mit",
                    "--source-attribution", "Anthropic HH-RLHF (Bai et al. 2022)"]) == 0
        captured = capsys.readouterr()
        assert f"pushed {REPO} (private)" in captured.out

        repo = hub.repos[REPO]
        assert repo["private"] is True
        # One commit holds every file: the repo never shows a half-pushed state.
        assert repo["commits"] == ["selfalign: critic-rm-hh", "initial commit"]
        assert len(hub.requests_to("commit")) == 1
        files = repo["files"]
        expected = {f"{fmt}/{split}-00000-of-00001.parquet" for fmt in FORMAT_NAMES for split in ("train", "test")}
        expected |= {"README.md", "assets/scores.png", "assets/margin.png", "dataset_info.json",
                     "selfalign/pipeline.yaml", "selfalign/manifest.json", ".gitattributes"}
        assert set(files) == expected
        assert all(files[p].startswith(b"\x89PNG") for p in ("assets/scores.png", "assets/margin.png"))
        writes = [r for r in hub.requests if r.route in ("create-repo", "preupload", "commit", "lfs-batch")]
        assert writes and all(r.auth == "valid" for r in writes)
        assert hub.unhandled == [] and hub.problems == []

        # The card: metadata the Hub's client parses, field by field, configs as push_to_hub writes them, the body.
        readme = files["README.md"].decode()
        card = DatasetCard(readme)
        data = card.data.to_dict()
        assert data["language"] == ["en"]
        assert data["license"] == "other" and data["license_name"] == "unspecified" and "license_link" not in data
        assert data["task_categories"] == ["text-generation", "text-classification"]
        # Every pair is human-labelled (source column), so no `synthetic` tag; critique formats were pushed.
        assert set(pl.read_parquet(critic_run / "stages" / "04-export.parquet")["source"]) == {"human"}
        assert data["tags"] == ["selfalign", "preference", "reward-modeling", "rlhf", "dpo", "critic-rm"]
        largest = max(sum(pl.read_parquet(critic_run / "export" / fmt / f"{s}.parquet").height
                          for s in ("train", "test"))
                      for fmt in FORMAT_NAMES)
        assert largest < 1000 and data["size_categories"] == ["n<1K"]
        assert data["pretty_name"] == "critic-rm-hh" and "source_datasets" not in data  # a local file, not an hf: id
        assert {c["config_name"] for c in data["configs"]} == set(FORMAT_NAMES)
        trl_config = next(c for c in data["configs"] if c["config_name"] == "trl")
        assert trl_config["default"] is True
        assert {f["split"]: f["path"] for f in trl_config["data_files"]} == {"train": "trl/train-*",
                                                                              "test": "trl/test-*"}
        assert {i["config_name"] for i in data["dataset_info"]} == set(FORMAT_NAMES)
        manifest = json.loads((critic_run / "manifest.json").read_text())
        for text in ("## Row funnel", "scores_contradict_label", "## Human vs synthetic", "| human |",
                     "## Agreement with human labels", "100.0%", "![scores histogram](assets/scores.png)",
                     "### The pipeline", "kind: consistency", "selfalign run pipeline.yaml --limit 50",
                     manifest["config_sha256"], next(iter(manifest["templates"].values())), "## Examples",
                     f'load_dataset("{REPO}", "trl")', "## Source data and license",
                     f"| `{HH_DATA.name}` (a local file, named without its path) | mit | Anthropic HH-RLHF (Bai et al. "
                     "2022) |", "No license was declared for this dataset", "(18 human-labelled)"):
            assert text in readme, text
        assert "synthetic)" not in readme
        before = manifest["rows"][2]["metrics"]["agreement_with_human_before"]
        assert f"{100 * before:.1f}%" in readme
        # The pipeline as the run used it, its input path cut to the file name.
        original = (critic_run.parent / "pipeline.yaml").read_text()
        assert str(HH_DATA) in original
        assert files["selfalign/pipeline.yaml"].decode() == original.replace(str(HH_DATA), HH_DATA.name)
        assert json.loads(files["selfalign/manifest.json"])["pipeline_file"] == "pipeline.yaml"

        # No local path reaches the Hub: not the data's directory, the run's or tmp directory, nor the home directory.
        local = {str(HH_DATA.parent), str(critic_run), str(critic_run.parent), str(tmp_path), str(Path.home()),
                 tempfile.gettempdir() + "/", str(Path.cwd())}
        for path, content in files.items():
            if path.endswith((".md", ".json", ".yaml", ".gitattributes")):
                leaked = [root for root in local if root in content.decode()]
                assert not leaked, (path, leaked)

        # The token is nowhere: not in the repo, the run directory, HF_HOME, the output or the logs.
        secret = TOKEN.encode()
        assert not any(secret in content for content in files.values())
        assert not any(secret in p.read_bytes() for p in every_file_under(critic_run))
        assert not any(secret in p.read_bytes() for p in every_file_under(tmp_path / "hf_home"))
        assert TOKEN not in captured.out + captured.err + caplog.text
        assert all(r.headers.get("authorization") in (None, "<redacted>") for r in hub.requests)

        # Read back through the same endpoint in a fresh process, then hand each format to its consumer.
        downloaded = tmp_path / "downloaded"
        loaded = load_in_fresh_process(hub, REPO, downloaded, tmp_path / "load_home")
        assert loaded["private"] is True
        for fmt in FORMAT_NAMES:
            for split in ("train", "test"):
                theirs = pl.read_parquet(critic_run / "export" / fmt / f"{split}.parquet")
                assert loaded["configs"][fmt][split] == theirs.height > 0
        assert loaded["default"] == loaded["configs"]["trl"]
        trl = datasets.load_from_disk(str(downloaded / "trl"))
        assert sorted(trl["train"].to_list(), key=lambda r: r["row_id"]) == \
            sorted_rows(pl.read_parquet(critic_run / "export" / "trl" / "train.parquet"))
        consumer_openrlhf(datasets.load_from_disk(str(downloaded / "openrlhf"))["train"].to_list())
        consumer_llama_factory(datasets.load_from_disk(str(downloaded / "llama-factory"))["train"].to_list(),
                               loaded["dataset_info"])
        assert loaded["dataset_info"]["selfalign_train"]["hf_hub_url"] == REPO
        sft = datasets.load_from_disk(str(downloaded / "critique-sft"))["train"].to_list()
        assert all([m["role"] for m in row["messages"]] == ["system", "user", "assistant"] for row in sft)
        cloud = datasets.load_from_disk(str(downloaded / "cloud"))["train"][0]
        assert cloud["chosen_feedback"] and isinstance(cloud["chosen_feedback"][0], str)

        # Pushing again updates the same repo in place (one new commit, same files, the other configs kept).
        assert push_frames(load_run(critic_run), REPO, formats=["trl"], options=EN, log=lambda _: None)["configs"]["trl"]
        assert set(hub.repos[REPO]["files"]) == expected
        assert len(hub.repos[REPO]["commits"]) == 3
        again = DatasetCard(hub.repos[REPO]["files"]["README.md"].decode()).data.to_dict()
        assert {c["config_name"] for c in again["configs"]} == set(FORMAT_NAMES)
        assert {i["config_name"] for i in again["dataset_info"]} == set(FORMAT_NAMES)
        assert again["tags"] == ["selfalign", "preference", "reward-modeling", "rlhf", "dpo"]  # only trl this time


def test_push_never_changes_an_existing_repos_visibility(critic_run, tmp_path, monkeypatch):
    with FakeHub(token=TOKEN) as hub:
        patch_hub_clients(monkeypatch, hub.url, hf_home=tmp_path / "hf_home", token=TOKEN)
        hub.add_repo("test-user/open", files={"notes.txt": b"hi"}, private=False)
        before = hub.repos["test-user/open"]["sha"]
        with pytest.raises(PublishError, match="already exists and is public; pass --public"):
            push_frames(load_run(critic_run), "test-user/open", formats=["trl"], options=EN, log=lambda _: None)
        assert hub.repos["test-user/open"]["sha"] == before and hub.repos["test-user/open"]["private"] is False
        result = push_frames(load_run(critic_run), "test-user/open", private=False, formats=["trl"], options=EN, log=lambda _: None)
        assert result["private"] is False and hub.repos["test-user/open"]["private"] is False


def test_a_rejected_token_is_reported_without_the_token(critic_run, tmp_path, monkeypatch, capsys, caplog):
    wrong = "hf_wrong_token_do_not_print_77"
    caplog.set_level(logging.DEBUG)
    with FakeHub(token=TOKEN) as hub:
        patch_hub_clients(monkeypatch, hub.url, hf_home=tmp_path / "hf_home", token=wrong)
        assert cli(["push", str(critic_run), "--repo", REPO, "--format", "trl", "--language", "en"]) == 2
        err = capsys.readouterr().err
        assert "rejected the token (401); set HF_TOKEN to a valid write token or run `hf auth login`" in err
        with pytest.raises(PublishError) as raised:
            push_frames(load_run(critic_run), REPO, formats=["trl"], token=wrong, options=EN, log=lambda _: None)
        assert REPO not in hub.repos
    assert wrong not in err + str(raised.value) + caplog.text


def test_push_without_any_token_says_how_to_log_in(critic_run, tmp_path, monkeypatch):
    with FakeHub(token=TOKEN) as hub:
        patch_hub_clients(monkeypatch, hub.url, hf_home=tmp_path / "hf_home", token=None)
        with pytest.raises(PublishError, match="no Hugging Face token found; set HF_TOKEN .* `hf auth login`"):
            push_frames(load_run(critic_run), REPO, options=EN, log=lambda _: None)
        assert hub.repos == {}


def test_a_push_that_fails_midway_leaves_no_repo_behind(critic_run, tmp_path, monkeypatch):
    """The stand-in refuses the LFS upload of the parquet files (after the repo was created): the repo this push
    created is deleted, and the error names the step that failed and what became of the repo."""
    with FakeHub(token=TOKEN) as hub:
        patch_hub_clients(monkeypatch, hub.url, hf_home=tmp_path / "hf_home", token=TOKEN)
        hub.fail("lfs-upload", 403, "Request has expired")
        with pytest.raises(PublishError) as raised:
            push_frames(load_run(critic_run), REPO, options=EN, log=lambda _: None)
        message = str(raised.value)
        assert f"uploading and committing 20 files to {REPO} failed:" in message, message
        assert "the repo this push had created was deleted, so nothing is left on the Hub" in message
        assert "Request has expired" in message and TOKEN not in message
        assert [r.route for r in hub.requests if r.route in ("create-repo", "delete-repo")] == ["create-repo",
                                                                                                "delete-repo"]
        assert hub.injected and REPO not in hub.repos

        # The commit itself refused, and the clean-up refused too: the error says where to delete it by hand.
        hub.clear_failures()
        hub.fail("commit", 422, "Your push was rejected")
        hub.fail("delete-repo", 403, "You don't have the rights to delete this repo")
        with pytest.raises(PublishError) as raised:
            push_frames(load_run(critic_run), REPO, formats=["trl"], options=EN, log=lambda _: None)
        message = str(raised.value)
        assert f"uploading and committing 7 files to {REPO} failed: the Hub at {hub.url} refused the push to " \
            f"{REPO} (422)" in message and "the Hub said: Your push was rejected" in message
        assert f"the repo this push created could not be deleted" in message
        assert f"delete it at {hub.url}/datasets/{REPO}/settings" in message
        assert set(hub.repos[REPO]["files"]) == {".gitattributes"}


def test_a_failed_push_leaves_an_existing_repo_as_it_was(critic_run, tmp_path, monkeypatch):
    with FakeHub(token=TOKEN) as hub:
        patch_hub_clients(monkeypatch, hub.url, hf_home=tmp_path / "hf_home", token=TOKEN)
        hub.add_repo(REPO, files={"notes.txt": b"mine"}, private=True)
        before = hub.repos[REPO]
        hub.fail("commit", 422, "Your push was rejected")
        with pytest.raises(PublishError) as raised:
            push_frames(load_run(critic_run), REPO, formats=["trl"], options=EN, log=lambda _: None)
        assert f"{REPO} is as it was before this push (nothing was committed)" in str(raised.value)
        assert "committing" in str(raised.value)
        assert hub.repos[REPO] == before and not hub.requests_to("delete-repo")

        # A create_repo that fails names that step, and nothing is left.
        hub.fail("create-repo", 403, "You don't have the rights to create a repo under this namespace")
        with pytest.raises(PublishError, match="creating test-user/new failed: the token may not write"):
            push_frames(load_run(critic_run), "test-user/new", formats=["trl"], options=EN, log=lambda _: None)
        assert "test-user/new" not in hub.repos


def test_the_card_needs_a_language_and_checks_what_it_is_given(critic_run, tmp_path, monkeypatch):
    with FakeHub(token=TOKEN) as hub:
        patch_hub_clients(monkeypatch, hub.url, hf_home=tmp_path / "hf_home", token=TOKEN)
        with pytest.raises(PublishError, match=r"needs the data's language: add `language: \[en\]`.*--language en"):
            push_frames(load_run(critic_run), REPO, log=lambda _: None)
        with pytest.raises(PublishError, match="'English' is not an ISO 639 code|\\['English'\\] is not an ISO 639"):
            push_frames(load_run(critic_run), REPO, options=CardOptions(language=["English"]), log=lambda _: None)
        with pytest.raises(PublishError, match="describe a license that is `other`, not 'mit'"):
            push_frames(load_run(critic_run), REPO, options=CardOptions(language=["en"], license="mit", license_name="x"),
                     log=lambda _: None)
        assert hub.repos == {} and not hub.requests  # refused before any request


def test_card_metadata_follows_the_rows_and_declared_licenses(critic_run, pairs_run, tmp_path):
    """Without a Hub: the card write_card renders, parsed with DatasetCard, for declared licenses, a pairs-only
    run, synthetic rows and an `hf:` source."""
    from huggingface_hub import DatasetCard

    def card(run, directory, options, formats=None):
        text = write_card(run, tmp_path / directory, formats=formats, options=options).read_text()
        return text, DatasetCard(text).data.to_dict()

    declared = CardOptions(language=["en", "de"], license="other", license_name="my-license-1.0",
                           license_link="LICENSE", source_license="mit", source_attribution="Anthropic")
    text, data = card(load_run(pairs_run), "pairs", declared)
    assert (data["language"], data["license"], data["license_name"], data["license_link"]) == \
        (["en", "de"], "other", "my-license-1.0", "LICENSE")
    assert data["tags"] == ["selfalign", "preference", "reward-modeling", "rlhf", "dpo"]  # no critiques, all human
    assert "made by selfalign." in text and "critiques" not in text.split("\n\n")[2]  # the intro claims none
    assert "This dataset's license: `my-license-1.0` (not one of the Hub's list, see LICENSE)." in text

    run = load_run(critic_run)
    run.frame = run.frame.with_columns(source=pl.when(pl.int_range(pl.len()) < 5).then(pl.lit("synthetic"))
                                       .otherwise(pl.col("source")))
    text, data = card(run, "mixed", CardOptions(language=["en"], license="cc-by-4.0"), formats=["trl", "cloud"])
    assert data["license"] == "cc-by-4.0" and "license_name" not in data
    assert data["tags"][-2:] == ["critic-rm", "synthetic"]
    assert "13 human-labelled, 5 synthetic" in text and "| synthetic | 5 |" in text
    assert "The input data's license was not declared" in text

    run.loaded.pipeline.stages[0] = run.loaded.pipeline.stages[0].model_copy(update={"path": None,
                                                                                      "hf": "Anthropic/hh-rlhf"})
    text, data = card(run, "hf", EN, formats=["trl"])
    assert data["source_datasets"] == ["Anthropic/hh-rlhf"]
    assert "[Anthropic/hh-rlhf](https://huggingface.co/datasets/Anthropic/hh-rlhf) (Hub dataset)" in text


def test_publish_stage_pushes_the_rows_at_the_end_of_a_run(critic_run, tmp_path, monkeypatch):
    from selfalign.progress import Progress
    from selfalign.runner import RunContext
    from selfalign.stages import STAGES
    from selfalign.stages.publish import PublishConfig, run as publish

    loaded = load_pipeline(critic_run.parent / "pipeline.yaml")
    df = pl.read_parquet(critic_run / "stages" / "04-export.parquet")
    config = PublishConfig(kind="publish", formats=["trl", "critic-rm"],
                           hub={"repo": "test-user/from-stage", "language": ["en"]})
    assert config.hub.private is True and config.needs() >= {"chosen_critiques", "prompt"}
    with FakeHub(token=TOKEN) as hub:
        patch_hub_clients(monkeypatch, hub.url, hf_home=tmp_path / "hf_home", token=TOKEN)
        ctx = RunContext(loaded, critic_run, None, Progress(quiet=True))
        output = publish(df, config, ctx)
        assert output.kept.equals(df)
        assert output.metrics["published"]["private"] is True
        assert output.metrics["published"]["configs"]["trl"] == {
            split: pl.read_parquet(critic_run / "export" / "trl" / f"{split}.parquet").height
            for split in ("train", "test")}
        repo = hub.repos["test-user/from-stage"]
        assert repo["private"] is True and "critic-rm/train-00000-of-00001.parquet" in repo["files"]
        readme = repo["files"]["README.md"].decode()
        assert "| 2 | consistency | 50 |" in readme  # the funnel so far, recounted from the stage files
        if "publish" in STAGES:  # once registered, the same from the pipeline file
            text = (critic_run.parent / "pipeline.yaml").read_text() + (
                "  - kind: publish\n    formats: [trl]\n"
                "    hub: {repo: test-user/from-yaml, private: true, language: [en]}\n")
            (tmp_path / "with_publish.yaml").write_text(text)
            manifest = run_pipeline(load_pipeline(tmp_path / "with_publish.yaml"), output=tmp_path / "run",
                                    limit=50, quiet=True)
            assert manifest["rows"][-1]["metrics"]["published"]["repo"] == "test-user/from-yaml"
            assert hub.repos["test-user/from-yaml"]["private"] is True
            # The card pushed mid-run carries the run's own start time and its duration so far (one manifest
            # builder), not the publish time and "? s.".
            card = hub.repos["test-user/from-yaml"]["files"]["README.md"].decode()
            pushed = json.loads(hub.repos["test-user/from-yaml"]["files"]["selfalign/manifest.json"])
            assert pushed["started"] == manifest["started"] and f"started {manifest['started']}, " in card
            assert 0 < pushed["seconds"] <= manifest["seconds"] and "? s." not in card
            assert [entry["kind"] for entry in pushed["rows"]] == [entry["kind"] for entry in manifest["rows"]]


@pytest.mark.slow
def test_trl_reward_trainer_runs_on_rows_downloaded_from_the_hub(critic_run, tmp_path, monkeypatch):
    """The issue's end-to-end check for TRL: push, `load_dataset` in a fresh process, TRL's helpers and a few
    `RewardTrainer` steps on the downloaded rows, unchanged."""
    pytest.importorskip("trl")
    import datasets

    from tests.test_trainer_formats import reward_trainer_steps

    with FakeHub(token=TOKEN) as hub:
        patch_hub_clients(monkeypatch, hub.url, hf_home=tmp_path / "hf_home", token=TOKEN)
        push_frames(load_run(critic_run), REPO, formats=["trl", "trl-implicit"], options=EN, log=lambda _: None)
        load_in_fresh_process(hub, REPO, tmp_path / "downloaded", tmp_path / "load_home",
                              formats=("trl", "trl-implicit"))
    explicit = datasets.load_from_disk(str(tmp_path / "downloaded" / "trl"))["train"].to_list()
    implicit = datasets.load_from_disk(str(tmp_path / "downloaded" / "trl-implicit"))["train"].to_list()
    consumer_trl(explicit)
    consumer_trl(implicit, implicit=True)
    logs = reward_trainer_steps(explicit, tmp_path / "rm-explicit", steps=2)
    assert all("margin" in entry for entry in logs)
    reward_trainer_steps(implicit, tmp_path / "rm-implicit", steps=2)
