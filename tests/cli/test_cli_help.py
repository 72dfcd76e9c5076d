"""The commands explain themselves (issue 12): help for every option, errors in the user's words.

No engine starts here: every check is about what a command says before any work.
"""

from __future__ import annotations

import json
import warnings

import click
import pytest
from click.testing import CliRunner

from kdpipe.pipeline.cli import COMMANDS, main


def _commands():
    ctx = click.Context(main)
    return [(name, main.get_command(ctx, name)) for name in COMMANDS]


def test_every_option_of_every_command_has_a_description_and_a_default():
    missing = []
    for name, cmd in _commands():
        for p in cmd.params:
            if not isinstance(p, click.Option) or p.hidden or p.name == "help":
                continue
            text = p.help or ""
            words = text.split("[default:")[0].strip()
            # a default shown by kdpipe's generated help, by click (show_default), or stated in words;
            # a required option has none (click marks it [required])
            has_default = "[default:" in text or "(default:" in text or p.show_default or p.required
            if not words or not has_default:
                missing.append(f"{name} {p.opts[0]}: {text!r}")
    assert not missing, "options without a description or default:\n" + "\n".join(missing)


def test_help_comes_from_the_config_field_comments():
    # One source: the dataclass comment is the --help text (fields added later document themselves).
    from kdpipe.pipeline.config import field_help
    from kdpipe.pipeline.train.config import TrainConfig

    out = CliRunner().invoke(main, ["train-student", "--help"], terminal_width=400).output
    for field in ("lr", "steps", "save_every", "warmup_steps"):
        assert field_help(TrainConfig)[field] in out, field
    assert "--warmup-steps INTEGER" in out and "[default: 0]" in out and "[default: 5e-05]" in out


def test_top_level_help_says_what_to_run_first():
    out = CliRunner().invoke(main, ["--help"], terminal_width=200).output
    assert "kdpipe demo" in out
    order = [out.index(f"kdpipe {c} ") for c in ("generate-logits", "finalize", "train-student", "evaluate")]
    assert order == sorted(order)


def test_errors_name_the_flag_typed_or_the_toml_key(tmp_path):
    r = CliRunner().invoke(main, ["generate-logits", "--teacher", "t", "--data", "d.jsonl", "--out", "o", "--top-k", "0"])
    assert r.exit_code != 0 and "--top-k: 0 must be >= 1" in r.output
    toml = tmp_path / "g.toml"
    toml.write_text('teacher = "t"\ndata = "d.jsonl"\nout = "o"\ntop_k = 0\n')
    r = CliRunner().invoke(main, ["generate-logits", "--config", str(toml)])
    assert r.exit_code != 0 and "top_k: 0 must be >= 1" in r.output and "--top-k" not in r.output
    r = CliRunner().invoke(main, ["train-student", "--student", "s", "--out", str(tmp_path / "run")])
    assert r.exit_code != 0 and "missing required option(s) --store" in r.output and "stores" not in r.output


def test_evaluate_old_field_flags_warn_and_still_work(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"id": "a", "body": "some text", "ref": "x"}) + "\n")
    with pytest.warns(FutureWarning, match="--document-field is the old name of --text-field"):
        r = CliRunner().invoke(main, ["evaluate", "--model", str(tmp_path / "m"), "--data", str(data), "--out",
                                      str(tmp_path / "o"), "--document-field", "missing_field"])
    # the old flag set the new field: the loader names it
    assert r.exit_code != 0 and "has no field 'missing_field'" in r.output and "--text-field" in r.output


def test_renamed_toml_keys_map_to_one_field_name():
    from kdpipe.pipeline.config import RenamedKeyWarning, build_config
    from kdpipe.pipeline.evaluate.config import EvalConfig
    from kdpipe.pipeline.generate.config import GenerateConfig

    with pytest.warns(RenamedKeyWarning) as rec:
        cfg = build_config(EvalConfig, {"models": ["m"], "data": "d", "out": "o", "document_field": "doc",
                                        "reference_field": "ref"})
    assert (cfg.text_field, cfg.target_field) == ("doc", "ref")
    said = " ".join(str(w.message) for w in rec)
    assert "'document_field' is the old name of 'text_field'" in said and "'reference_field' is the old name of 'target_field'" in said
    # the same name and default for the document in phase one and evaluate
    assert EvalConfig.__dataclass_fields__["text_field"].default == GenerateConfig.__dataclass_fields__["text_field"].default


def _job(tmp_path, student_extra: str, evaluation: str = "") -> str:
    text = f"""name = "j"
[teacher]
model = "teacher-model"
[data]
dataset = "docs.jsonl"
text_field = "body"
[generation]
store = "store"
k = 4
[[students]]
name = "s"
model = "student-model"
{student_extra}
{evaluation}"""
    p = tmp_path / "job.toml"
    p.write_text(text)
    return str(p)


def test_job_unknown_key_in_the_optimizer_table_is_named_with_did_you_mean(tmp_path):
    from kdpipe.jobs.plan import make_plan
    from kdpipe.jobs.spec import load_job
    from kdpipe.storage.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        make_plan(load_job(_job(tmp_path, 'optimizer = { name = "adamw", learning_rate = 1e-5 }')))
    msg = str(e.value)
    assert "[[students]] #1.optimizer: unknown key 'learning_rate' (did you mean 'lr'?)" in msg
    allowed = msg.split("allowed keys: ", 1)[1].split(", ")
    for key in ("optimizer", "name", "nodes", "gpus", "lr", "alpha"):
        assert key in allowed, key
    with pytest.raises(ConfigError, match=r"#1: unknown key 'optimiser' \(did you mean 'optimizer'\?\)"):
        make_plan(load_job(_job(tmp_path, 'optimiser = "adamw"')))


def test_job_evaluation_reads_the_document_field_as_data_names_it(tmp_path):
    import tomllib

    from kdpipe.jobs.plan import make_plan
    from kdpipe.jobs.spec import load_job

    plan = make_plan(load_job(_job(tmp_path, "", '[evaluation]\ndata = "held.jsonl"\n')))
    assert tomllib.loads(plan.step("evaluate-s").config_text)["text_field"] == "body"
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        plan = make_plan(load_job(_job(tmp_path, "", '[evaluation]\ndata = "held.jsonl"\nreference_field = "gold"\n')))
    assert tomllib.loads(plan.step("evaluate-s").config_text)["target_field"] == "gold"
    assert any("old name of 'target_field'" in str(x.message) for x in w)


def test_evaluate_selection_says_what_was_selected(tmp_path):
    from kdpipe.pipeline.evaluate.config import EvalConfig
    from kdpipe.pipeline.evaluate.generate import load_examples

    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"id": str(i), "text": "doc", "summary": "s"}) + "\n" for i in range(5)))
    ex = load_examples(EvalConfig(models=("m",), data=str(p), out="o"))
    assert len(ex) == 5 and ex.selection.startswith("every row (no row has a 'split' field")
    p.write_text("".join(json.dumps({"id": str(i), "text": "doc", "summary": "s", "split": "heldout" if i % 2 else "train"}) + "\n"
                         for i in range(6)))
    ex = load_examples(EvalConfig(models=("m",), data=str(p), out="o", max_samples=2))
    assert len(ex) == 2 and ex.selection == "rows with split == 'heldout', the first 2 (--max-samples)"


def test_printed_paths_open_from_the_working_directory(tmp_path, monkeypatch):
    """Paths the commands print (demo logs, `kdpipe run` summaries, status) are normalized and relative to
    where the user stands, not to the output's parent (`demo-output/logs/…` printed for --out runs/demo-output)."""
    from kdpipe.pipeline.console import shown_path

    (tmp_path / "runs" / "demo" / "logs").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert shown_path(tmp_path / "runs" / "demo" / "logs" / "evaluate.log") == "runs/demo/logs/evaluate.log"
    assert shown_path(tmp_path / "jobs" / ".." / "job-run") == "job-run"
    assert shown_path("runs/./demo/../demo") == "runs/demo"
    monkeypatch.chdir(tmp_path / "runs" / "demo")
    assert shown_path(tmp_path / "other" / "x") == str(tmp_path / "other" / "x")  # outside: absolute


def test_status_prints_metrics_readably(tmp_path):
    """`kdpipe status`: the last metrics as `key value` to 4 significant digits, not raw JSON floats."""
    run = tmp_path / "job-run" / "runs" / "s"
    run.mkdir(parents=True)
    (tmp_path / "jobs").mkdir()
    rows = [{"step": 5, "loss": 2.3456789012345678, "loss_kd": 1.0, "lr": 0.0029999999999999996, "tokens": 4096},
            {"step": 6, "loss": 2.1234567890123456, "loss_kd": 0.98765432109876543, "lr": 0.0030000000000000001,
             "tokens": 4096},
            {"step": 6, "split": "validation", "loss": 2.5432109876543210}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "job-run" / "run.json").write_text(json.dumps(
        {"job": "j", "steps": [], "runs": [{"name": "s", "dir": str(tmp_path / "jobs" / ".." / "job-run" / "runs" / "s")}]}))
    r = CliRunner().invoke(main, ["status", str(tmp_path / "jobs" / ".." / "job-run")])
    assert r.exit_code == 0, r.output
    assert "run s: step 6  loss 2.123  loss_kd 0.9877  lr 0.003  tokens 4096" in r.output, r.output
    assert "run s validation: step 6  loss 2.543" in r.output
    assert "{" not in r.output and "/../" not in r.output
