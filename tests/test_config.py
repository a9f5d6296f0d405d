"""Config loading fails closed: every mistake is an error at its file and line, with a fix."""

import json

import pytest

from selfalign.check import check_pipeline
from selfalign.cli import main
from selfalign.config import load_pipeline
from selfalign.errors import ConfigError, ConfigErrors
from tests.support.fake_pipeline import fake_pipeline_yaml

# One option a line: line 6 is stage 0 (load), 9-11 stage 1 (critique, `samples: 2` on 11), 12 stage 2.
GOOD = fake_pipeline_yaml("t", [
    {"kind": "load", "path": "data.jsonl", "format": "trl"},
    {"kind": "critique", "model": "critic", "samples": 2},
    {"kind": "consistency"},
    {"kind": "filter", "where": "chosen_score - rejected_score >= 2"},
    {"kind": "export"},
])


def errors_of(path, overrides=()):
    try:
        loaded = load_pipeline(path, overrides)
    except (ConfigErrors, ConfigError) as exc:
        return str(exc)
    problems = check_pipeline(loaded)
    return "\n".join(e.format() for e in problems)


def test_good_pipeline_has_no_errors(write_pipeline):
    assert errors_of(write_pipeline(GOOD)) == ""


@pytest.mark.parametrize("old, new, expected", [
    ("    samples: 2", "    sampels: 2", ":11: stage 1 (critique): sampels: unknown key; did you mean 'samples'?"),
    ("    samples: 2", "    samples: lots", ":11: stage 1 (critique): samples: Input should be a valid integer"),
    ("  - kind: consistency", "  - kind: consistancy", ":12: stage 2 (consistancy): kind: unknown stage kind "
                                                       "'consistancy'; did you mean 'consistency'?"),
    ("    model: critic", "    model: critc", ":10: stage 1 (critique): model: model 'critc' is not defined under "
                                              "models:; did you mean 'critic'?"),
    ("name: t", "name: t\nseeed: 3", ":3: seeed: unknown key; did you mean 'seed'?"),
    ("  critic: {backend: fake}", "  critic: {backend: openai, model: m}", ":4: models.critic.base_url: required "
                                                                            "field is missing"),
    ("  critic: {backend: fake}", "  critic: {backend: openai, base_url: u, model: m, api_key: sk-123}",
     ":4: models.critic.api_key: a literal API key is refused"),
    ("    where: \"chosen_score - rejected_score >= 2\"", "    where: \"chosen_score >>> 2\"",
     ":14: stage 3 (filter): where: Value error, not a valid polars SQL expression"),
    ("  - kind: consistency\n", "", ":13: stage 2 (filter): where: needs column(s) chosen_score, rejected_score, "
                                    "which no earlier stage makes"),
    ("    samples: 2", "    samples: 2\n    prompt: prompts/nope.jinja", ":12: stage 1 (critique): prompt: prompt "
                                                                          "file 'prompts/nope.jinja' not found"),
    ("schema_version: 1", "schema_version: 7", ":1: schema_version: schema_version 7 is not supported"),
    ("    path: data.jsonl", "    path: data.jsonl\n    hf: x/y", ":6: stage 0 (load): Value error, give exactly one "
                                                                  "of `path:`"),
])
def test_each_mistake_is_reported_at_its_line(write_pipeline, old, new, expected):
    assert old in GOOD
    path = write_pipeline(GOOD.replace(old, new))
    message = errors_of(path)
    assert f"{path}{expected}" in message, message


def test_malformed_yaml_names_the_line(write_pipeline):
    path = write_pipeline(GOOD.replace("    samples: 2", "    samples: [2"))
    message = errors_of(path)
    assert f"{path}:12: malformed YAML" in message and "started at line 11" in message


def test_template_variable_the_stage_does_not_provide(write_pipeline, tmp_path):
    (tmp_path / "bad.jinja").write_text("{% block user %}{{ response }} {{ reference_answer }}{% endblock %}")
    path = write_pipeline(GOOD.replace("    samples: 2", f"    samples: 2\n    prompt: {tmp_path / 'bad.jinja'}"))
    message = errors_of(path)
    assert "uses reference_answer, which this stage does not provide" in message
    assert f"{path}:12: stage 1 (critique): prompt:" in message


def test_set_overrides_values_and_reports_bad_paths(write_pipeline):
    path = write_pipeline(GOOD)
    loaded = load_pipeline(path, ["stages.1.samples=5", "models.critic.model=other"])
    assert loaded.pipeline.stages[1].samples == 5
    assert loaded.pipeline.models["critic"].model == "other"
    with pytest.raises(ConfigError, match="not an index"):
        load_pipeline(path, ["stages.9.samples=5"])


def test_validate_cli_exits_2_and_writes_nothing(write_pipeline, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_pipeline(GOOD.replace("    samples: 2", "    sampels: 2"))
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["validate", str(path)]) == 2
    assert "sampels: unknown key; did you mean 'samples'?" in capsys.readouterr().err
    assert main(["run", str(path)]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_schema_command_prints_the_json_schema(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert set(schema["properties"]) >= {"schema_version", "name", "models", "stages"}


def test_run_name_cannot_escape_outputs(write_pipeline):
    message = errors_of(write_pipeline(GOOD.replace("name: t", "name: ../../x")))
    assert ":2: name: String should match pattern" in message


def test_every_duplicate_key_is_reported_with_both_lines(write_pipeline):
    path = write_pipeline(GOOD.replace("name: t", "name: t\nseed: 1\nseed: 2").replace(
        "  critic: {backend: fake}", "  critic: {backend: fake}\n  critic: {backend: fake}"))
    message = errors_of(path)
    assert f"{path}:4: seed: duplicate key 'seed' (also at line 3)" in message, message
    assert f"{path}:7: models.critic: duplicate key 'critic' (also at line 6)" in message, message


def test_a_set_error_names_the_set_not_the_yaml_line(write_pipeline):
    path = write_pipeline(GOOD)
    message = errors_of(path, ["stages.1.samples=many"])
    assert message.startswith("--set stages.1.samples=many: stage 1 (critique): samples:"), message
    assert f"{path}:11" not in message  # line 11 holds `samples: 2`, which is fine
    # An override that is not at fault leaves the blame on the file.
    message = errors_of(write_pipeline(GOOD.replace("    samples: 2", "    samples: lots")), ["stages.1.model=critic"])
    assert ":11: stage 1 (critique): samples: Input should be a valid integer" in message, message


def test_set_cannot_create_a_model_by_one_field_but_can_add_a_whole_one(write_pipeline):
    path = write_pipeline(GOOD)
    with pytest.raises(ConfigError, match="model 'critc' is not defined under models:; did you mean 'critic'"):
        load_pipeline(path, ["models.critc.model=x"])
    loaded = load_pipeline(path, ["models.judge={backend: fake}", "models.default.backend=fake"])
    assert set(loaded.pipeline.models) == {"critic", "judge", "default"}


def test_a_publish_stage_without_language_fails_validate(write_pipeline):
    text = GOOD.replace("  - kind: export\n", "  - kind: export\n  - kind: publish\n    hub: {repo: me/prefs}\n")
    assert "the dataset card needs the data's language: add `language: [en]`" in errors_of(write_pipeline(text))


@pytest.mark.parametrize("old, new", [
    ("  critic: {backend: fake}", "  critic: {backend: vllm, model: m, enforce_eager: true}"),  # a bool field
    ("    samples: 2", "    samples: 2\n    sampling: {temperature: 1, max_tokens: 64}"),  # an int for a float
    ("  critic: {backend: fake}", "  critic: {backend: openai, base_url: 'https://api.example.com/v1/', model: m}"),
    ("  - kind: export\n", "  - kind: export\n  - kind: publish\n    hub: {repo: me/prefs, private: false, language: [en]}\n"),
])
def test_what_the_new_checks_must_still_accept(write_pipeline, old, new):
    assert old in GOOD
    assert errors_of(write_pipeline(GOOD.replace(old, new))) == ""
