"""Every kind of bad input through `selfalign run`: exit 2, an error that names the place, nothing written.

One case per line: (pipeline edit, data file content, what the error must say). The place is `FILE:LINE`
for the pipeline and `file, row N, column 'C'` for data.
"""

from __future__ import annotations

import json

import pytest

from selfalign.cli import main

PIPELINE = """\
schema_version: 1
name: bad
models:
  critic: {backend: fake}
stages:
  - kind: load
    path: data.jsonl
    format: trl
  - kind: critique
    model: critic
    samples: 2
  - kind: consistency
  - kind: export
"""
GOOD_ROW = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n"
HH_NO_ASSISTANT = json.dumps({"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hello"}) + "\n"

CASES = [  # (id, (old, new) in the pipeline or None, data bytes, expected fragment; {p} is the pipeline path)
    ("malformed_yaml", ("    samples: 2", "    samples: [2"), GOOD_ROW, "{p}:12: malformed YAML"),
    ("unknown_key", ("    samples: 2", "    sampels: 2"), GOOD_ROW, "{p}:11: stage 1 (critique): sampels: unknown key; did you mean 'samples'?"),
    ("wrong_type", ("    samples: 2", "    samples: many"), GOOD_ROW, "{p}:11: stage 1 (critique): samples: Input should be a valid integer"),
    ("missing_prompt_file", ("    samples: 2", "    samples: 2\n    prompt: prompts/none.jinja"), GOOD_ROW, "{p}:12: stage 1 (critique): prompt: prompt file 'prompts/none.jinja' not found"),
    ("template_variable", ("    samples: 2", "    samples: 2\n    prompt: bad.jinja"), GOOD_ROW, "{p}:12: stage 1 (critique): prompt: template bad.jinja uses reference_answer, which this stage does not provide"),
    ("undefined_model", ("    model: critic", "    model: critc"), GOOD_ROW, "{p}:10: stage 1 (critique): model: model 'critc' is not defined under models:; did you mean 'critic'?"),
    ("column_no_stage_makes", ("  - kind: consistency\n", "  - kind: filter\n    where: \"judge_verdict = 'A'\"\n"), GOOD_ROW, "{p}:13: stage 2 (filter): where: needs column(s) judge_verdict, which no earlier stage makes"),
    ("missing_column", None, json.dumps({"prompt": "q", "chosen": "a"}) + "\n", "data.jsonl, row 1, column 'rejected': missing column"),
    ("null_value", None, GOOD_ROW + json.dumps({"prompt": "q", "chosen": None, "rejected": "b"}) + "\n", "data.jsonl, row 2, column 'chosen': is null"),
    ("wrong_value_type", None, json.dumps({"prompt": "q", "chosen": 5, "rejected": "b"}) + "\n", "data.jsonl, row 1, column 'chosen': expected a non-empty list"),
    ("empty_file", None, "", "data.jsonl: has no rows"),
    ("non_utf8", None, GOOD_ROW.encode() + b'{"prompt": "\xff\xfe"}\n', "data.jsonl, row 2: not UTF-8"),
    ("ten_megabyte_row", None, json.dumps({"prompt": "q", "chosen": "a" * 10_000_000, "rejected": "b"}) + "\n", "data.jsonl, row 1, column 'chosen': 10,000,000 characters, over max_chars"),
    # Security: the YAML cannot build Python objects; a template cannot reach Python internals.
    ("yaml_python_tag", ("name: bad", "name: !!python/object/apply:os.system [\"touch pwned\"]"), GOOD_ROW, "{p}:2: malformed YAML: could not determine a constructor for the tag"),
    ("template_dunder", ("    samples: 2", "    samples: 2\n    prompt: dunder.jinja"), GOOD_ROW, "dunder.jinja:1: the template reaches for '__subclasses__'"),
    ("template_attr_filter", ("    samples: 2", "    samples: 2\n    prompt: attr.jinja"), GOOD_ROW, "attr.jinja: the sandbox refused the template: access to attribute '__class__'"),
    ("hh_without_assistant", ("format: trl", "format: hh-rlhf"), HH_NO_ASSISTANT, "data.jsonl, row 1, column 'chosen': transcript has no final Assistant turn"),
]


@pytest.mark.parametrize("edit, data, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_names_the_place_and_writes_nothing(edit, data, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    text = PIPELINE
    if edit is not None:
        assert edit[0] in text
        text = text.replace(edit[0], edit[1])
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(text)
    (tmp_path / "data.jsonl").write_bytes(data.encode() if isinstance(data, str) else data)
    (tmp_path / "bad.jinja").write_text("{% block user %}{{ response }} {{ reference_answer }}{% endblock %}")
    (tmp_path / "dunder.jinja").write_text("{% block user %}{{ response.__class__.__mro__[1].__subclasses__() }}"
                                           "{% endblock %}")
    (tmp_path / "attr.jinja").write_text('{% block user %}{{ response|attr("__class__") }}{% endblock %}')
    before = sorted(p.name for p in tmp_path.rglob("*"))

    assert main(["run", str(pipeline)]) == 2
    error = capsys.readouterr().err
    assert expected.format(p=pipeline) in error, error
    assert "Traceback" not in error
    assert sorted(p.name for p in tmp_path.rglob("*")) == before, "a failed run left files behind"
