"""The task seam: task.name names a module (Learn-to-Ask by default, examples/clarify/ a second one), and
the trainer reaches a task only through it."""

import ast
import json
import os
import subprocess
import sys

import pytest

import fsdp
import l2a
from config import BadInput, load_config
from conftest import ROOT
from evaluation import numeric_fields

CLARIFY = ROOT / "examples" / "clarify"


def test_no_module_imports_the_trainer_and_the_task_needs_no_torch():
    probe = ("import sys, checkpoint, config, evaluation, fsdp, grpo, judge, learn_to_ask, preprocess; "
             "print('l2a' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                          cwd=ROOT).stdout.strip() == "False"
    probe = "import sys, learn_to_ask; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                          cwd=ROOT).stdout.strip() == "False"


def test_every_function_reads_in_one_screen():
    """No function in the project is over 60 lines (def to last line, docstring included)."""
    long = [f"{path.relative_to(ROOT)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in ROOT.glob("**/*.py") if ".venv" not in path.parts and "runs" not in path.parts
            for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.FunctionDef)
            and node.end_lineno - node.lineno + 1 > 60]
    assert not long, long


def test_a_task_is_a_module_or_a_file_and_a_broken_one_is_one_line(tmp_path):
    default = l2a.load_task("learn_to_ask")
    assert default.demonstration({"expert_turn": "How long?"}) == "How long?" and default.constant_candidates
    clarify = l2a.load_task(str(CLARIFY / "task.py"))
    assert clarify.demonstration and clarify.rollout_metrics is not numeric_fields
    bare = tmp_path / "bare.py"
    bare.write_text("def load_samples(path):\n    return []\n")
    with pytest.raises(BadInput, match="has no messages, make_reward"):
        l2a.load_task(str(bare))
    bare.write_text(bare.read_text() + "messages = make_reward = print\n")
    task = l2a.load_task(str(bare))  # what it leaves out gets the defaults
    assert task.demonstration is None and task.constant_candidates is None and task.rollout_metrics is numeric_fields
    assert task.CURVES == [("reward", ["reward_mean", "eval_reward"])]
    with pytest.raises(BadInput, match="no_such_task"):
        l2a.load_task("no_such_task")
    with pytest.raises(BadInput, match="missing.py"):
        l2a.load_task(str(tmp_path / "missing.py"))


def test_settings_that_need_a_name_the_task_lacks_stop_at_start(tmp_path):
    fsdp.setup_distributed()  # a one-process group, as plain `python l2a.py` gets
    bare = tmp_path / "bare.py"
    bare.write_text("def load_samples(path):\n    return []\nmessages = make_reward = print\n")
    task = l2a.load_task(str(bare))
    l2a.check_settings(load_config(ROOT / "config.toml", ["sft.steps=0", "grpo.expert_in_group=false",
                                                         "train.strata={}"]), task)  # needs nothing more
    for setting, missing in (("train.strata={stop=1}", "stratum"), ("train.strata={stop=0}", "at least 1"),
                             ("sft.steps=2", "demonstrations"), ("grpo.expert_in_group=true", "demonstrations")):
        cfg = load_config(ROOT / "config.toml", ["sft.steps=0", "grpo.expert_in_group=false",
                                                 "train.strata={}", setting])
        with pytest.raises(BadInput, match=missing):
            l2a.check_settings(cfg, task)


def l2a_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "l2a.py"), *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_the_example_task_trains_through_l2a_and_its_held_out_reward_rises(tmp_path):
    """examples/clarify/config.toml as the README's forking section runs it (SmolLM2-135M, CPU): the test
    split's reward after training beats the one before and the constant reply, and --eval grades with
    the task's own metrics and reference rows."""
    out = tmp_path / "clarify"
    config = ["--config", str(CLARIFY / "config.toml"), "--set", f"train.output_dir={json.dumps(str(out))}"]
    run = l2a_cli(*config)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    before, after = lines[0]["eval_reward"], lines[-1]["eval_reward"]
    constant = json.loads((out / "eval" / "constant" / "metrics.json").read_text())["reward"]["mean"]
    assert after > before + 0.2 and after > constant, (before, after, constant)
    assert (out / "curves.png").exists() and "eval_asked_ambiguous" in lines[-1]
    last = max((out / "checkpoints").iterdir(), key=lambda p: int(p.name[5:]))
    evaluated = l2a_cli(*config, "--eval", "--checkpoint", str(last))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    table = json.loads((out / "eval" / "comparison.json").read_text())
    assert table[last.name]["reward"]["mean"] == pytest.approx(after)  # the same seeds, the same answers
    assert set(table) == {last.name, "constant", "expert"} and table["expert"]["reward"]["mean"] == 2.0
