"""The evaluation metrics of the paper on hand-built rollouts, their spread, the comparison table, the curves."""

import json

import pytest

import evaluation
import judge
import l2a
import learn_to_ask
from config import DEFAULTS
from conftest import ROOT

CONTINUE = {"cid": "c", "messages": [{"role": "user", "content": "It hurts."}], "decision_truth": "continue",
            "info_truth": ["symptom location: throat"]}
STOP = {"cid": "s", "messages": [{"role": "user", "content": "Thanks."}], "decision_truth": "stop", "info_truth": []}


def graded(sample, response):
    return judge.make_reward_fn({"backend": "rules", "fusion": "multiplicative"})([sample], [response])[0]


def rows_of(rollouts, k):
    """rollouts: (sample, response) in prompt-major order, k per prompt."""
    return [{"rollout": j % k, "metrics": judge.rollout_metrics(s, graded(s, r))} for j, (s, r) in enumerate(rollouts)]


def test_paper_metrics_by_hand():
    rollouts = [
        (CONTINUE, "Where is the pain: throat, chest or ear?"),  # right decision, direct question, one question
        (CONTINUE, "Anything else? Since when has it hurt?"),  # right decision, generic, two questions
        (CONTINUE, "<stop />"),  # wrong decision: everything 0
        (STOP, "<stop />"),  # right, exact
        (STOP, "I recommend lozenges. <stop />"),  # right, not exact
        (STOP, "Does it hurt?"),  # wrong
    ]
    summary = evaluation.summarize(rows_of(rollouts, 3), k=3)
    mean = {name: m["mean"] for name, m in summary.items()}
    count = {name: m["count"] for name, m in summary.items()}
    rewards = [1 * (1 + 2 * 1.0) + 1.0, 1 * (1 + 2 * 0.1) + 0.5, 0.0, 4.0, 3.0, 0.0]
    assert mean["total_reward"] == pytest.approx(sum(rewards) / 6) and count["total_reward"] == 6
    assert mean["avg_continue_content"] == pytest.approx((1.0 + 0.1 + 0.0) / 3) and count["avg_continue_content"] == 3
    assert mean["continue_content_win_rate"] == pytest.approx(1 / 3)
    assert mean["continue_decision_accuracy"] == pytest.approx(2 / 3)
    assert mean["stop_decision_accuracy"] == pytest.approx(2 / 3) and count["stop_decision_accuracy"] == 3
    assert mean["total_decision_accuracy"] == pytest.approx(4 / 6)
    assert mean["format_quality"] == pytest.approx((1.0 + 0.5 + 0 + 1.0 + 0 + 0) / 6)
    assert mean["judge_failure"] == 0.0


def test_empty_class_and_missing_grades():
    class Failing:
        def grade(self, sample, response):
            return None

    rows = [{"rollout": 0, "metrics": judge.rollout_metrics(CONTINUE, judge.Reward(Failing(), "multiplicative")(
                [CONTINUE], ["Where?"])[0])},
            {"rollout": 0, "metrics": judge.rollout_metrics(CONTINUE, graded(CONTINUE, "Where does it hurt?"))}]
    summary = evaluation.summarize(rows, k=1)
    assert summary["stop_decision_accuracy"] == {"mean": None, "spread": 0.0, "count": 0}
    assert summary["judge_failure"]["mean"] == 0.5 and summary["judge_failure"]["count"] == 2
    assert summary["total_reward"]["count"] == 1, "a missing grade is left out, never counted as 0"
    assert "– (n=0)" in evaluation.comparison_table({"base": summary})


def test_spread_is_the_std_over_rollout_indices():
    # two prompts, k = 2; rollout 0 is right on both, rollout 1 wrong on both: per-index accuracies 1.0 and 0.0
    rollouts = [(STOP, "<stop />"), (STOP, "Why?"), (STOP, "<stop />"), (STOP, "How?")]
    m = evaluation.summarize(rows_of(rollouts, 2), k=2)["total_decision_accuracy"]
    assert m["mean"] == 0.5 and m["spread"] == pytest.approx(2 ** 0.5 / 2)  # sample std of (1, 0)


def test_comparison_table_has_a_column_per_model():
    a = {"total_reward": {"mean": 1.2814, "spread": 0.05, "count": 180}}
    b = {"total_reward": {"mean": 3.0781, "spread": 0.02, "count": 180}, "judge_failure": {"mean": 0.0, "spread": 0.0,
                                                                                            "count": 180}}
    lines = evaluation.comparison_table({"base": a, "step_10": b}).splitlines()
    assert lines[0] == "| metric | base | step_10 |" and lines[1] == "|---|---|---|"
    assert lines[2] == "| total_reward | 1.281 ± 0.050 (n=180) | 3.078 ± 0.020 (n=180) |"
    assert lines[3] == "| judge_failure | – (n=0) | 0.000 ± 0.000 (n=180) |"


def test_curves_are_drawn_from_a_metrics_file(tmp_path):
    lines = [{"step": 0, "eval_total_reward": 1.0}] + [
        {"step": s, "reward_mean": 1 + s / 10, "reward_action": 0.5, "approx_kl": 1e-3 * s, "clip_fraction": 0.01,
         "completion_length_mean": 30 - s, "step_time": 2.0} for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (tmp_path / "config.json").write_text(json.dumps(DEFAULTS))  # the run's task draws its own panels
    l2a.main(["--plot", str(tmp_path)])
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


# ----------------------------------------------------------------------------- judge noise

class ScriptedJudge:
    """Grades each response from its own list of (format, content), one per call; None = a failed call."""

    def __init__(self, script):
        self.script = {r: list(grades) for r, grades in script.items()}

    def grade(self, sample, response):
        grade = self.script[response].pop(0)
        return None if grade is None else {"format": grade[0], "content": grade[1], "reasoning": "scripted"}


def test_calibration_statistics_on_a_scripted_judge():
    script = {"Where? A or B": [(1.0, 1.0)] * 3,
              "When? A or B": [(1.0, 1.0), (0.5, 0.1), (1.0, 1.0)],
              "Why? A or B": [(1.0, 0.1), None, None]}  # one success: no agreement to measure
    samples = [CONTINUE] * 3 + [STOP]
    responses = list(script) + ["<stop />"]  # the stop is decided by rule and never sent
    human = {("c", "Where? A or B"): {"format": 1.0, "content": 0.1}, ("c", "When? A or B"): {"format": 1.0, "content": 1.0}}
    report = judge.calibrate(ScriptedJudge(script), samples, responses, repeats=3, human=human)
    std = lambda xs: (sum((x - sum(xs) / 3) ** 2 for x in xs) / 3) ** 0.5  # noqa: E731
    assert report["graded_responses"] == 3 and report["failures"] == 2
    assert report["agreement"] == 0.5
    assert report["format_std"] == pytest.approx(std([1.0, 0.5, 1.0]) / 2)
    assert report["content_std"] == pytest.approx(std([1.0, 0.1, 1.0]) / 2)
    assert report["human_compared"] == 2 and report["human_format_accuracy"] == 1.0
    assert report["human_content_accuracy"] == 0.5


def test_calibration_command_with_the_rules_judge_agrees_exactly(tmp_path):
    import preprocess
    samples = [s for s in preprocess.load_samples(ROOT / "data/demo/test.jsonl")
               if s["decision_truth"] == "continue"][:5]
    answers = ["Where does it hurt: throat or chest?", "Is it bad? Very bad?", "Anything else to add?"]
    rollouts = tmp_path / "rollouts.jsonl"
    rollouts.write_text("".join(json.dumps({"cid": s["cid"], "response": a}) + "\n" for s in samples for a in answers))
    report = judge.main(["--config", str(ROOT / "config.toml"), "--set", f"data.test_file={ROOT}/data/demo/test.jsonl",
                         "--calibrate", str(rollouts), "--repeats", "3"])
    assert report["graded_responses"] == 15 and report["agreement"] == 1.0 and report["content_std"] == 0.0
    assert json.loads((tmp_path / "calibration.json").read_text()) == report


def test_curves_leave_out_what_cannot_move_and_draw_the_references():
    rows = [{"step": 0, "eval_total_reward": 1.0}] + [
        {"step": i, "reward_mean": float(i % 2), "approx_kl": 0.0, "clip_fraction": 0.0, "entropy": 2.0 - i / 20,
         "reward_action": 1.0, "reward_content": 0.1 * i, "reward_format": 0.5} for i in range(1, 13)]
    drawn = evaluation.curve_panels(rows, {"constant": 2.2, "expert": 3.8}, learn_to_ask.CURVES)
    panels = {title: (lines, levels) for title, lines, levels in drawn}
    assert "KL" not in panels and "clip fraction" not in panels and "warm start loss" not in panels  # never move
    lines, levels = panels["reward"]
    assert levels == {"constant (total reward)": 2.2, "expert (total reward)": 3.8}
    assert lines["eval_total_reward"] == [(0, 1.0)] and len(lines["reward_mean"]) == 12
    assert lines["reward_mean (mean of 10)"][1] == (2, 0.5) and lines["reward_mean (mean of 10)"][11] == (12, 0.5)
    components, _ = panels["reward components (smoothed)"]
    assert set(components) == {f"reward_{k} (mean of 10)" for k in ("action", "content", "format")}
    assert "entropy" in panels["entropy (a collapse onto a template shows here first)"][0]
