"""Train the default config under several settings and seeds, one run at a time, and tabulate the test
split before and after each run.

    python scripts/sweep.py --try "train.lr=1e-4" --try "train.lr=1e-4 grpo.group_size=8" --seeds 0 1 2

Each --try is one setting: space-separated SECTION.KEY=VALUE overrides of config.toml, as l2a.py's --set
takes them ("" is the config unchanged). Every (setting, seed) run writes to <out>/<setting>/seed<S>/ and
its log beside it; a run whose comparison table exists is not run again, so a stopped sweep picks up
where it was. The runs go one after another, never side by side: on a small CPU a second busy process
slows both several times over, and each run's wall time is part of what is measured. The table goes
to stdout and, with every number behind it, to <out>/sweep.json; --table prints the table of every record
under <out> and runs nothing.
"""
import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# (column, metric): the test-split metrics the table shows, before -> after
SHOWN = [("total reward", "total_reward"), ("format", "format_quality"), ("content", "avg_continue_content"),
         ("decision acc.", "total_decision_accuracy"), ("stop acc.", "stop_decision_accuracy"),
         ("continue acc.", "continue_decision_accuracy")]


def slug(setting):
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", setting) or "default"


def run(config, setting, seed, out):
    """One training run; returns its record, or None when it failed (its log says why)."""
    folder = out / slug(setting) / f"seed{seed}"
    record_file = folder / "sweep_record.json"
    if record_file.exists():
        return json.loads(record_file.read_text())
    overrides = setting.split() + [f"train.seed={seed}", f"train.output_dir={json.dumps(str(folder))}"]
    command = [sys.executable, str(ROOT / "l2a.py"), "--config", str(config)]
    command += [arg for o in overrides for arg in ("--set", o)]
    shutil.rmtree(folder, ignore_errors=True)  # what a stopped run left: this run starts afresh
    folder.mkdir(parents=True)
    started = time.monotonic()
    with open(folder.with_suffix(".log"), "w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if code:
        print(f"{setting or 'default'} seed {seed}: exit {code}, see {folder.with_suffix('.log')}", flush=True)
        return None
    evals = sorted((folder / "eval").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    before, after = (json.loads((evals[i] / "metrics.json").read_text()) for i in (0, -1))
    record = {"setting": setting, "seed": seed, "wall_s": round(time.monotonic() - started, 1),
              "steps": int(evals[-1].name.split("_")[1]), "before": before, "after": after}
    warm = json.loads((folder / "config.json").read_text())["sft"]["steps"]
    # the warm start's own evaluation, and the rows every run is read against
    for name, place in (("warm_start", f"step_{warm}" if warm else None), ("constant", "constant"), ("expert", "expert")):
        if place and (folder / "eval" / place / "metrics.json").exists():
            record[name] = json.loads((folder / "eval" / place / "metrics.json").read_text())
    keep_record(folder, record)
    return record


def keep_record(folder, record):
    """Write a finished run's record, then delete its checkpoints (0.5-1.6 GB each with the AdamW state,
    enough to fill a disk over a sweep): the record and the evaluations' rollouts are what a sweep keeps."""
    (folder / "sweep_record.json").write_text(json.dumps(record, indent=2))
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)


def cell(before, after, name):
    b, a = before.get(name, {}), after.get(name, {})
    if b.get("mean") is None or a.get("mean") is None:
        return "–"
    return f"{b['mean']:.2f} → {a['mean']:.2f}"


def total(record, name):
    return f"{record[name]['total_reward']['mean']:.2f}" if name in record else "–"


def table(records):
    """Markdown, one row per run. 'rise / spread' is the total reward's rise over the larger of the two
    spreads (each the standard deviation of the k per-rollout means of the evaluation); 'warm start',
    'constant' and 'expert' are total rewards, and 'after - constant' is what the run adds to the best
    answer that reads nothing."""
    lines = ["| setting | seed | wall s | " + " | ".join(c for c, _ in SHOWN) + " | warm start | constant | expert "
             "| after - constant | rise / spread |", "|---" * (len(SHOWN) + 8) + "|"]
    for r in records:
        b, a = r["before"]["total_reward"], r["after"]["total_reward"]
        spread = max(b["spread"], a["spread"])
        ratio = (a["mean"] - b["mean"]) / spread if spread else float("inf")
        margin = f"{a['mean'] - r['constant']['total_reward']['mean']:+.2f}" if "constant" in r else "–"
        lines.append(f"| {r['setting'] or 'config.toml'} | {r['seed']} | {r['wall_s']:.0f} | "
                     + " | ".join(cell(r["before"], r["after"], m) for _, m in SHOWN)
                     + f" | {total(r, 'warm_start')} | {total(r, 'constant')} | {total(r, 'expert')} | {margin} "
                     f"| {ratio:+.1f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "config.toml"))
    parser.add_argument("--try", dest="settings", action="append", metavar="OVERRIDES",
                        help='one setting, e.g. "train.lr=1e-4 grpo.group_size=8" (repeatable; "" = the config)')
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default=str(ROOT / "runs" / "sweep"))
    parser.add_argument("--table", action="store_true", help="only print the table of every record under --out")
    args = parser.parse_args()
    out = Path(args.out)
    if args.table:
        print(table([json.loads(p.read_text()) for p in sorted(out.glob("*/seed*/sweep_record.json"))]))
        return
    records = []
    for setting in args.settings or [""]:
        for seed in args.seeds:
            record = run(args.config, setting, seed, out)
            if record:
                records.append(record)
                print(table([record]).splitlines()[-1], flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(records, indent=2))
    print(table(records))


if __name__ == "__main__":
    main()
