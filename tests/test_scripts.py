"""scripts/sweep.py's table and resumption, and scripts/answers.py's fixed choice of prompts."""

import json
import subprocess
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import sweep  # noqa: E402


def metrics(total, spread, **others):
    return {"total_reward": {"mean": total, "spread": spread, "count": 60},
            **{name: {"mean": value, "spread": 0.0, "count": 60} for name, value in others.items()}}


def test_sweep_table_divides_the_rise_by_the_larger_spread():
    record = {"setting": "train.lr=1e-4", "seed": 3, "wall_s": 301.4, "steps": 40,
              "before": metrics(1.0, 0.1, format_quality=0.25), "after": metrics(1.6, 0.2, format_quality=0.75)}
    row = sweep.table([record]).splitlines()[-1]
    assert row.startswith("| train.lr=1e-4 | 3 | 301 | 1.00 → 1.60 | 0.25 → 0.75 | – |")
    assert row.endswith("| +3.0 |")  # (1.6 - 1.0) / max(0.1, 0.2)


def test_sweep_does_not_run_a_setting_again_once_it_has_its_record(tmp_path):
    folder = tmp_path / sweep.slug("train.lr=1e-4 grpo.aggregation=\"sequence\"") / "seed0"
    folder.mkdir(parents=True)
    record = {"setting": "kept", "seed": 0}
    (folder / "sweep_record.json").write_text(json.dumps(record))
    assert sweep.slug("train.lr=1e-4 grpo.aggregation=\"sequence\"") == "train.lr=1e-4_grpo.aggregation=_sequence_"
    assert sweep.run("no-such-config.toml", "train.lr=1e-4 grpo.aggregation=\"sequence\"", 0, tmp_path) == record


def test_answers_takes_the_first_prompts_of_each_decision_in_file_order(tmp_path):
    samples = [{"cid": f"c{i}", "decision_truth": d, "info_truth": ["symptom duration: 2 days"] if d == "continue" else [],
                "messages": [{"role": "user", "content": f"message {i}"}]}
               for i, d in enumerate(["stop", "continue", "continue", "stop", "continue"])]
    test_file = tmp_path / "test.jsonl"
    test_file.write_text("".join(json.dumps(s) + "\n" for s in samples))
    (tmp_path / "config.json").write_text(json.dumps({"data": {"test_file": str(test_file)}}))
    for step, text in ((0, "before"), (40, "after")):
        (tmp_path / "eval" / f"step_{step}").mkdir(parents=True)
        with open(tmp_path / "eval" / f"step_{step}" / "rollouts.jsonl", "w") as f:
            for s in samples:
                for k in range(2):
                    f.write(json.dumps({"cid": s["cid"], "rollout": k, "response": f"{text} {s['cid']} {k} | x",
                                        "reward": 1.0}) + "\n")
    out = subprocess.run([sys.executable, str(ROOT / "scripts/answers.py"), str(tmp_path), "--continue", "2",
                          "--stop", "1"], capture_output=True, text=True, check=True).stdout.splitlines()
    assert [line.split(" | ")[1] for line in out[2:]] == ["message 1", "message 2", "message 0"]
    assert out[2].endswith("| before c1 0 \\| x (**1.0**) | after c1 0 \\| x (**1.0**) |")
