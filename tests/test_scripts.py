"""scripts/sweep.py's table and resumption, scripts/answers.py's fixed choice of prompts, and
scripts/judge_check.py's regrading of a run's logs, scripts/rule_baseline.py's rule, benchmarks/bench.py's
children."""

import json
import subprocess
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import answers  # noqa: E402
import bench  # noqa: E402
import judge_check  # noqa: E402
import rule_baseline  # noqa: E402
import sweep  # noqa: E402


def metrics(total, spread, **others):
    return {"total_reward": {"mean": total, "spread": spread, "count": 60},
            **{name: {"mean": value, "spread": 0.0, "count": 60} for name, value in others.items()}}


def test_sweep_table_divides_the_rise_by_the_larger_spread():
    record = {"setting": "train.lr=1e-4", "seed": 3, "wall_s": 301.4, "steps": 40,
              "before": metrics(1.0, 0.1, format_quality=0.25), "after": metrics(1.6, 0.2, format_quality=0.75)}
    row = sweep.table([record]).splitlines()[-1]
    assert row.startswith("| train.lr=1e-4 | 3 | 301 | 1.00 → 1.60 | 0.25 → 0.75 | – |")
    assert row.endswith("| – | – | – | – | +3.0 |")  # (1.6 - 1.0) / max(0.1, 0.2)
    record.update(warm_start=metrics(1.2, 0.1), constant=metrics(2.2, 0.0), expert=metrics(3.8, 0.0))
    assert sweep.table([record]).splitlines()[-1].endswith("| 1.20 | 2.20 | 3.80 | -0.60 | +3.0 |")


def test_sweep_does_not_run_a_setting_again_once_it_has_its_record(tmp_path):
    folder = tmp_path / sweep.slug("train.lr=1e-4 grpo.aggregation=\"sequence\"") / "seed0"
    folder.mkdir(parents=True)
    record = {"setting": "kept", "seed": 0}
    (folder / "sweep_record.json").write_text(json.dumps(record))
    assert sweep.slug("train.lr=1e-4 grpo.aggregation=\"sequence\"") == "train.lr=1e-4_grpo.aggregation=_sequence_"
    assert sweep.run("no-such-config.toml", "train.lr=1e-4 grpo.aggregation=\"sequence\"", 0, tmp_path) == record


def test_sweep_deletes_a_finished_runs_checkpoints_once_its_record_is_written(tmp_path):
    (tmp_path / "checkpoints/step_40").mkdir(parents=True)
    (tmp_path / "eval/step_40").mkdir(parents=True)
    sweep.keep_record(tmp_path, {"setting": "", "seed": 0})
    assert json.loads((tmp_path / "sweep_record.json").read_text()) == {"setting": "", "seed": 0}
    assert not (tmp_path / "checkpoints").exists() and (tmp_path / "eval/step_40").exists()


def test_sweep_table_mode_tabulates_every_record_and_runs_nothing(tmp_path):
    for setting, seed in (("", 1), ("train.lr=1e-4", 0)):
        folder = tmp_path / sweep.slug(setting) / f"seed{seed}"
        folder.mkdir(parents=True)
        record = {"setting": setting, "seed": seed, "wall_s": 10.0, "steps": 40,
                  "before": metrics(1.0, 0.1), "after": metrics(1.5, 0.1)}
        (folder / "sweep_record.json").write_text(json.dumps(record))
    out = subprocess.run([sys.executable, str(ROOT / "scripts/sweep.py"), "--out", str(tmp_path), "--table"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert [line.split(" | ")[:2] for line in out[2:]] == [["| config.toml", "1"], ["| train.lr=1e-4", "0"]]
    assert not (tmp_path / "sweep.json").exists()


def test_answers_takes_the_first_prompts_of_each_decision_in_file_order(tmp_path):
    samples = [{"cid": f"c{i}", "decision_truth": d, "info_truth": ["symptom duration: 2 days"] if d == "continue" else [],
                "messages": [{"role": "user", "content": f"message {i}"}]}
               for i, d in enumerate(["stop", "continue", "continue", "stop", "continue"])]
    test_file = tmp_path / "test.jsonl"
    test_file.write_text("".join(json.dumps(s) + "\n" for s in samples))
    (tmp_path / "config.json").write_text(json.dumps({"data": {"test_file": str(test_file), "train_file": str(test_file)}}))
    for step, text in ((0, "before"), (40, "after")):
        (tmp_path / "eval" / f"step_{step}").mkdir(parents=True)
        with open(tmp_path / "eval" / f"step_{step}" / "rollouts.jsonl", "w") as f:
            for s in samples:
                for k in range(2):
                    f.write(json.dumps({"cid": s["cid"], "rollout": k, "response": f"{text} {s['cid']} {k} | x",
                                        "reward": 1.0}) + "\n")
    out = subprocess.run([sys.executable, str(ROOT / "scripts/answers.py"), str(tmp_path), "--continue", "2",
                          "--stop", "1"], capture_output=True, text=True, check=True).stdout.splitlines()
    assert [line.split(" | ")[1] for line in out[2:5]] == ["message 1", "message 2", "message 0"]
    assert out[2].endswith("| before c1 0 \\| x (**1.0**) | after c1 0 \\| x (**1.0**) |")
    # the counts of every evaluation: 3 continue prompts x 2 rollouts, all distinct; no <stop /> said
    assert out[-6:-4] == ["| step_0 | 6 of 6 | 'before c1 0' (1) | 0 of 4 | 0 of 6 |",
                          "| step_40 | 6 of 6 | 'after c1 0' (1) | 0 of 4 | 0 of 6 |"]
    assert out[-1] == "| 0 | 2 / 3 | 2 / 3 | 0 of 4 / 0 of 6 | 0 of 4 / 0 of 6 |"  # no pharmacist turn before any prompt


def test_answers_says_when_a_folder_holds_no_evaluation(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts/answers.py"), str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 1 and "holds no evaluation" in out.stderr and "Traceback" not in out.stderr


def test_rule_baseline_takes_set_overrides():
    out = subprocess.run([sys.executable, str(ROOT / "scripts/rule_baseline.py"), "--set", "eval.prompts=3"],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert "test (3 prompts)" in out


def test_answers_counts_a_template_and_the_stops():
    decision = {"a": "continue", "b": "continue", "c": "stop"}
    rows = [{"cid": c, "response": r} for c, r in [("a", "How long have you had it?"), ("a", " How long  have you had it? "),
                                                   ("b", "How long does it last?"), ("c", "<stop />"),
                                                   ("c", "Take this.")]]
    assert answers.counts("step_9", rows, decision) == "| step_9 | 2 of 3 | 'How long have' (2) | 1 of 2 | 0 of 3 |"


def test_answers_counts_stops_by_the_questions_asked_before():
    """Turns holding a question are counted, the others not ("I see."), nor a greeting before the patient's
    first message; the allergy check is a row of its own; each evaluation's cell gives the <stop /> said
    where the expert stopped, then where they went on."""
    def sample(cid, decision, *turns, greeting=False):
        return {"cid": cid, "decision_truth": decision,
                "messages": [{"role": "assistant", "content": "How can I help?"}] * greeting
                + [{"role": "user", "content": "My throat hurts."}]
                + [m for t in turns for m in ({"role": "assistant", "content": t}, {"role": "user", "content": "ok"})]}
    samples = [sample("a", "continue", greeting=True), sample("b", "continue", "Where is it?", "I see."),
               sample("c", "stop", "I see.", "Where is it?"), sample("d", "continue", "How bad?", "Since when?"),
               sample("e", "stop", "How bad?", "Since when?"), sample("f", "stop", "How bad?", "Any allergies?"),
               sample("unused", "stop")]
    said = {"a": "How long?", "b": "<stop />", "c": "<stop />", "d": "<stop />", "e": "Any fever?", "f": "<stop />"}
    rows = [{"cid": c, "response": r} for c, r in said.items()] + [{"cid": "d", "response": "Where is it?"}]
    assert [answers.asked(s) for s in samples] == [(0, False), (1, False), (1, False), (2, False), (2, False),
                                                   (1, True), (0, False)]
    train = [sample("t", "stop", "Any fever?", "How bad?", "Since when?")]  # a count no tested prompt has
    assert answers.by_questions_asked({"step_0": rows[:1], "step_9": rows}, samples, train)[2:] == [
        "| 0 | 0 / 0 | 0 / 1 | 0 of 0 / 0 of 1 | 0 of 0 / 0 of 1 |",
        "| 1 | 0 / 0 | 1 / 1 | 0 of 0 / 0 of 0 | 1 of 1 / 1 of 1 |",
        "| 1, then the allergy check | 0 / 0 | 1 / 0 | 0 of 0 / 0 of 0 | 1 of 1 / 0 of 0 |",
        "| 2 | 0 / 0 | 1 / 1 | 0 of 0 / 0 of 0 | 0 of 1 / 1 of 2 |",
        "| 3 | 1 / 0 | 0 / 0 | 0 of 0 / 0 of 0 | 0 of 0 / 0 of 0 |"]


def test_judge_check_regrades_a_runs_logs(tmp_path):
    sample = {"cid": "s_1", "session_id": 1, "diagn": "Cough", "decision_truth": "continue",
              "info_truth": ["symptom duration: 2 days"],
              "messages": [{"role": "user", "content": "I have a cough."}]}
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(sample) + "\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"judge": {"fusion": "multiplicative"}}))
    logged = [("How long have you had it?", 4.0),                    # graded as today's rules grade it
              ("How long do you want to talk about it?", 4.0),       # what the cue-word rules paid
              ("<stop />", 0.0)]
    (run / "samples.jsonl").write_text(json.dumps({"step": 1, "cid": "s_1", "completions": [
        {"response": r, "reward": w} for r, w in logged]}) + "\n")
    out = subprocess.run([sys.executable, str(ROOT / "scripts/judge_check.py"), str(run), "--data", str(data)],
                         capture_output=True, text=True, check=True).stdout
    assert "1 of 3 logged rewards differ" in out and "1 logged answers hold <stop />" in out
    assert "1 of 2 continue answers graded content 1" in out and "How long have you had it?" in out


def test_rule_baseline_asks_the_first_field_not_yet_asked_and_stops_after_n_or_the_allergy_check():
    def sample(*asked):
        return {"messages": [{"role": "user", "content": "I have a cough."}]
                + [m for q in asked for m in ({"role": "assistant", "content": q}, {"role": "user", "content": "Yes."})]}
    order = ("trigger", "duration", "severity")
    assert rule_baseline.answer(sample(), order, 3) == "What makes it worse?"
    assert rule_baseline.answer(sample("Does it get worse at night?"), order, 3) == "How long have you had it?"
    assert rule_baseline.answer(sample("What sets it off?", "How long has it been going on?"), order, 3) == \
        "How bad is it?"
    assert rule_baseline.answer(sample("Where is it?", "Is it a dry cough?", "Any fever?"), order, 3) == "<stop />"
    assert rule_baseline.answer(sample("Any drug allergies, or medicines you take?"), order, 3) == "<stop />"


def test_rule_baseline_reads_open_fields_and_averages_a_reader_over_them():
    fields = {"symptom location": ("Where?", ["On the left."]), "symptom duration": ("How long?", ["A week."]),
              "trigger": ("What sets it off?", ["The cold."]), "symptom severity": ("How bad?", ["Mild."])}
    sample = {"diagn": "x", "messages": [{"role": "user", "content": "I have a cough."},
                                         {"role": "user", "content": "The cold."},  # told unasked
                                         {"role": "assistant", "content": "Where?"},
                                         {"role": "user", "content": "On the right."}]}  # asked, whatever the answer
    assert rule_baseline.open_fields(sample, fields) == ["symptom duration", "symptom severity"]

    def reward_fn(samples, responses):  # pays the duration 4, any other question 2, a stop 1
        return [{"reward": {"How long?": 4.0, "<stop />": 1.0}.get(r, 2.0)} for r in responses]
    order = ("duration", "severity", "trigger")
    assert rule_baseline.reading_rows(reward_fn, [sample], order, 3, {"x": fields}) == {
        "a field still open, each in turn (expected)": 3.0,  # (4 + 2) / 2
        "always the symptom duration": 4.0, "always the symptom severity": 2.0}
    # where the rule stops, every row stops
    late = {**sample, "messages": sample["messages"] + [{"role": "assistant", "content": "Any allergies?"}]}
    assert rule_baseline.reading_rows(reward_fn, [late], order, 3, {"x": fields}) == {
        "a field still open, each in turn (expected)": 1.0,
        "always the symptom duration": 1.0, "always the symptom severity": 1.0}


def test_bench_gives_trl_the_prompts_and_sampling_that_l2a_trains_with():
    """benchmarks/bench.py compares plain GRPO steps: TRL's side must get the prompts that l2a's side
    draws under the bench's config, step by step, and l2a's side must sample as TRL's does."""
    import l2a
    import learn_to_ask
    import preprocess
    cfg = bench.base_config(3, 4, 16, "float32", 4, "unused")
    samples = preprocess.load_samples(ROOT / cfg["data"]["train_file"])
    strata = l2a.grpo_strata(learn_to_ask, samples, cfg["train"]["strata"])
    drawn = [samples[i] for step in range(4) for i in l2a.step_indices(strata, step, 3, cfg["train"]["seed"])]
    assert bench.prompt_order(samples, 4, 3) == drawn
    assert (cfg["grpo"]["top_p"], cfg["grpo"]["repetition_penalty"], cfg["grpo"]["expert_in_group"]) == (1.0, 1.0, False)


RETAINED = """
import os, torch
def rss(): return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
a = torch.ones(4 * 2**20)  # 16 MiB: mapped on its own under either threshold
del a                      # freeing it raises glibc's own threshold to 16 MiB
before = rss()
b = torch.ones(2 * 2**20)  # 8 MiB: from the heap under the raised threshold, mapped alone under 1 MiB
del b
print(rss() - before)
"""


def test_bench_children_give_freed_tensors_back():
    """bench.child_env fixes glibc's mmap threshold for both sides, so that a tensor freed is memory
    returned and peak resident memory counts what a side holds; without it glibc keeps a freed 8 MiB
    tensor resident once a larger one has come and gone (the test is of glibc, as the bench runs on)."""
    env = bench.child_env()
    assert env["MALLOC_MMAP_THRESHOLD_"] == "1048576"
    glibc_alone = {k: v for k, v in env.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    kept = [float(subprocess.run([sys.executable, "-c", RETAINED], env=e, capture_output=True, text=True,
                                 check=True).stdout) for e in (env, glibc_alone)]
    assert kept[0] < 1 and kept[1] >= 7, kept
