"""The trainer end to end on a tiny random model: config, learning, FSDP on 1 vs 2 ranks, checkpoints, resume."""

import contextlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer

import evaluation
import fsdp
import grpo
import judge
import l2a
import learn_to_ask
import preprocess
from config import DEFAULTS, BadInput, load_config
from conftest import ROOT, free_port, metric_lines, tiny_llama
from toy_run import toy_task

TOY_RUN = ROOT / "tests" / "toy_run.py"


def write_config(path, model_dir, out_dir, **sections):
    # float32 on every machine: auto would be bf16 on a CPU with AVX512-BF16 or AMX, and the tests'
    # equality tolerances are float32's (a test of bf16 asks for it)
    cfg = {"model": {"path": str(model_dir), "dtype": "float32"},
           "data": {"train_file": str(ROOT / "data/demo/train.jsonl"), "test_file": str(ROOT / "data/demo/test.jsonl")},
           "train": {"steps": 2, "prompts_per_step": 4, "micro_batch_size": 6, "lr": 3e-3, "seed": 1,
                     "output_dir": str(out_dir)},
           "grpo": {"group_size": 4, "max_new_tokens": 12},
           "eval": {"prompts": 4, "samples": 2, "max_new_tokens": 12}}
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text("\n".join(f"[{s}]\n" + "\n".join(f"{k} = {toml_value(v)}" for k, v in vals.items())
                              for s, vals in cfg.items()))
    return path


def toml_value(v):
    if isinstance(v, dict):  # an inline table: {"stop": 1} is JSON, not TOML
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    return json.dumps(v)


def run(config, nproc=1, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd + [str(TOY_RUN), str(config), *args], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def metrics(out_dir):
    """The training steps' lines of metrics.jsonl (step 0 holds only the evaluation before training)."""
    lines = metric_lines(out_dir)
    assert lines[0]["step"] == 0 and "eval_reward" in lines[0]
    return lines[1:]


def weights(folder):
    """Every tensor of a model folder's safetensors file(s)."""
    return {name: w for file in Path(folder).glob("*.safetensors") for name, w in load_file(file).items()}


# ----------------------------------------------------------------------------- config

def test_config_defaults_overrides_and_errors(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[train]\nsteps = 5\nlr = 1\n[grpo]\nstop_strings = ["</q>"]\n')
    cfg = load_config(path, ["train.steps=2", "train.output_dir=runs/a", "grpo.kl_coef=0.01", "judge.fusion='sum'"])
    assert cfg["train"]["steps"] == 2 and cfg["train"]["output_dir"] == "runs/a" and cfg["train"]["lr"] == 1.0
    assert cfg["grpo"]["kl_coef"] == 0.01 and cfg["judge"]["fusion"] == "sum" and cfg["grpo"]["stop_strings"] == ["</q>"]
    assert cfg["grpo"]["group_size"] == DEFAULTS["grpo"]["group_size"]
    for bad, message in [(["train.stpes=2"], "train.stpes"), (["trian.steps=2"], r"\[trian\]"),
                         (["train.steps=two"], "train.steps must be int"), (["train.steps=2.5"], "train.steps"),
                         (["grpo.stop_strings=[1]"], "grpo.stop_strings"), (["steps=2"], "section.key=value")]:
        with pytest.raises(ValueError, match=message):
            load_config(path, bad)


def test_cli_reports_config_errors_by_key(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[grpo]\ngroup_size = 'four'\n")
    result = subprocess.run([sys.executable, str(ROOT / "l2a.py"), "--config", str(path)], capture_output=True,
                            text=True)
    assert result.returncode != 0 and "grpo.group_size must be int" in result.stderr


def bad_input_cases(tmp_path, model_dir):
    """(name, config sections, what the one-line error must say) for each mistake a new user makes first."""
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text((ROOT / "data/demo/train.jsonl").read_text().splitlines()[0] + "\n{not json\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    return [
        ("no data file", {"data": {"train_file": str(tmp_path / "nope.jsonl")}},
         "data.train_file = '" + str(tmp_path / "nope.jsonl") + "': No such file or directory"),
        ("bad data line", {"data": {"test_file": str(bad_line)}}, f"{bad_line}:2: "),
        ("unknown model", {"model": {"path": "nobody/no-such-model"}}, "neither a model folder, a .gguf file"),
        ("folder, not a model", {"model": {"path": str(tmp_path)}}, "folder without config.json"),
        ("missing gguf", {"model": {"path": str(tmp_path / "m.gguf")}}, "no such .gguf file"),
        ("output folder", {"train": {"output_dir": str(a_file / "run")}}, "cannot be written: Not a directory"),
        ("judge url", {"judge": {"backend": "http", "base_url": "file:///etc/v1"}}, "only http:// and https://"),
        ("group of one", {"grpo": {"group_size": 1}}, "grpo.group_size = 1: GRPO learns by comparing"),
        ("used output folder", {"train": {"output_dir": str(used_run(tmp_path))}},
         "holds an earlier run's checkpoint step_3: continue it with --resume, or choose another"),
    ]


def used_run(tmp_path):
    """An output folder where an earlier run left a complete checkpoint."""
    (tmp_path / "used/checkpoints/step_3").mkdir(parents=True, exist_ok=True)
    (tmp_path / "used/checkpoints/step_3/trainer_state.json").write_text('{"step": 3}')
    return tmp_path / "used"


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_first_mistakes_are_one_clear_line(tiny_model_dir, tmp_path, mode, capsys, monkeypatch):
    def no_model_yet(*args, **kwargs):
        raise AssertionError("a model was loaded before the mistake was reported")

    monkeypatch.setattr(l2a, "load_model", no_model_yet)
    for name, sections, message in bad_input_cases(tmp_path, tiny_model_dir):
        if mode == "eval" and name in ("no data file", "group of one", "used output folder"):
            continue  # --eval reads only the test split, samples no groups and writes under eval/
        config = write_config(tmp_path / "c.toml", tiny_model_dir, tmp_path / "run", **sections)
        with pytest.raises(SystemExit) as exit:
            l2a.main(["--config", str(config)] + (["--eval"] if mode == "eval" else []))
        said = str(exit.value.code)  # sys.exit(text) prints text to stderr and exits with status 1
        assert said.startswith("error: ") and message in said and "\n" not in said, (name, said)
        assert "rank(s) on" not in capsys.readouterr().out, name  # and printed nothing of a started run


def test_a_bad_data_line_exits_non_zero_with_one_line(tiny_model_dir, tmp_path):
    [(_, sections, message)] = [c for c in bad_input_cases(tmp_path, tiny_model_dir) if c[0] == "bad data line"]
    config = write_config(tmp_path / "c.toml", tiny_model_dir, tmp_path / "run", **sections)
    result = subprocess.run([sys.executable, str(ROOT / "l2a.py"), "--config", str(config)], capture_output=True,
                            text=True)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_step_prompts_are_a_function_of_the_step():
    every = [list(range(10))]
    steps = [l2a.step_indices(every, s, 4, seed=3) for s in range(5)]
    assert sorted(steps[0] + steps[1] + steps[2][:2]) == list(range(10)), "each epoch visits every prompt once"
    assert steps[3] == l2a.step_indices(every, 3, 4, seed=3) and steps != [l2a.step_indices(every, s, 4, 4) for s in range(5)]


def test_warm_start_chains_turns_and_draws_each_chain_whole():
    """A sample follows the one whose prompt and answer begin its prompt; a second sample after the same one
    (a repeated turn) and a sample that follows nothing start chains. A pass draws every sample once, each
    chain's samples together and in order, and the rows of a step share what chains."""
    prompts, answers = [[1, 2], [1, 2, 3, 4], [1, 2, 3, 4, 5, 6], [9], [1, 2, 3, 4]], [[3], [5], [7], [1], [5]]
    chains = l2a.demonstration_chains(prompts, answers)
    assert chains == [[0, 1, 2], [3], [4]]
    # Against trying every pair, on consultations whose turns repeat (three words): identical openings,
    # and turns of two messages (an answer that is not what the next prompt holds).
    rng, many = random.Random(0), ([], [])
    for _ in range(40):
        said = [0]
        for _ in range(rng.randint(1, 5)):
            answer = [rng.randint(1, 3)] + [rng.randint(1, 3)] * rng.randint(0, 1)
            many[0].append(list(said)), many[1].append(answer)
            said += answer[:1] + [rng.randint(1, 3)]
    full = [p + a for p, a in zip(*many)]
    before = {j: max((i for i, f in enumerate(full) if p[:len(f)] == f and i != j), key=lambda i: (len(full[i]), -i))
              for j, p in enumerate(many[0]) if any(p[:len(f)] == f for f in full)}
    linked = [(i, j) for j, i in sorted(before.items()) if j == min(k for k, b in before.items() if b == i)]
    found = l2a.demonstration_chains(*many)
    assert sorted(i for c in found for i in c) == list(range(len(full))) and len(linked) > 20
    assert sorted((a, b) for c in found for a, b in zip(c, c[1:])) == sorted(linked)
    drawn = [i for s in range(5) for i in l2a.warm_start_indices(chains, s, 2, seed=3)]
    for one_pass in (drawn[:5], drawn[5:]):
        assert sorted(one_pass) == list(range(5)) and "0, 1, 2" in str(one_pass), one_pass
    assert any(l2a.warm_start_indices(chains, s, 5, 3) != l2a.warm_start_indices(chains, s, 5, 4) for s in range(10))
    rows, scored = l2a.chained_rows([3, 0, 1, 2, 4], prompts, answers)
    assert rows == [[9, 1], [1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5]] and scored == [[1], [2, 4, 6], [4]]


def test_strata_are_drawn_by_weight_in_turn_and_each_visited_whole():
    samples = [{"decision_truth": "stop" if i in (2, 7) else "continue"} for i in range(10)]
    go_on = [0, 1, 3, 4, 5, 6, 8, 9]
    assert l2a.grpo_strata(learn_to_ask, samples, {}) == [list(range(10))]
    even = l2a.grpo_strata(learn_to_ask, samples, {"continue": 1, "stop": 1})
    assert even == [go_on, [2, 7]]
    steps = [l2a.step_indices(even, s, 2, seed=3) for s in range(8)]
    assert all(a in go_on and b in (2, 7) for a, b in steps), steps  # one of each kind in every step
    assert sorted(a for a, _ in steps) == go_on, "each pass over a stratum visits every prompt once"
    two_to_one = l2a.grpo_strata(learn_to_ask, samples, {"continue": 2, "stop": 1})
    drawn = [i for s in range(8) for i in l2a.step_indices(two_to_one, s, 3, seed=3)]
    assert all(sum(i in (2, 7) for i in drawn[t:t + 3]) == 1 for t in range(0, 24, 3)), drawn  # 2 to 1 in each turn
    asked = [i for i in drawn if i not in (2, 7)]
    assert sorted(asked[:8]) == sorted(asked[8:]) == go_on, "two passes, each visiting every prompt once"
    assert drawn == [i for s in range(4) for i in l2a.step_indices(two_to_one, s, 6, seed=3)], "steps cut one order"
    for weights, says in (({"continue": 1}, "'stop'"), ({"continue": 1, "stop": 1, "maybe": 1}, "maybe")):
        with pytest.raises(BadInput, match=says):
            l2a.grpo_strata(learn_to_ask, samples, weights)


# ----------------------------------------------------------------------------- training

def test_mean_reward_rises_on_a_learnable_toy_reward(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    config = write_config(tmp_path / "c.toml", tiny_model_dir, out,
                          train={"steps": 24, "prompts_per_step": 4, "lr": 0.1},
                          grpo={"group_size": 8, "max_new_tokens": 8, "kl_coef": 0.001},
                          eval={"every": 12, "prompts": 8, "samples": 2, "max_new_tokens": 8})
    run(config)  # a random model samples near-uniform tokens: the vowel share starts to climb after ~12 steps
    rewards = [m["reward_mean"] for m in metrics(out)]
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.1, rewards
    evals = {s: json.loads((out / f"eval/step_{s}/metrics.json").read_text())["reward"] for s in (0, 12, 24)}
    assert evals[24]["mean"] > evals[0]["mean"] and evals[24]["count"] == 8 * 2
    assert [m["step"] for m in metrics(out) if "eval_reward" in m] == [12, 24]
    assert (out / "curves.png").stat().st_size > 0 and "step_24" in (out / "eval/comparison.md").read_text()
    m = metrics(out)[-1]
    for key in ["reward_std", "reward_length_chars", "loss", "clip_fraction", "approx_kl", "ref_kl", "entropy",
                "completion_length_mean", "zero_std_group_fraction", "sampled_tokens_per_second", "step_time",
                "sampling_time", "update_time", "prompt_tokens", "peak_memory_mib", "grad_norm"]:
        assert key in m and m[key] == m[key], key
    assert 0 < m["sampling_time"] + m["update_time"] <= m["step_time"] and m["prompt_tokens"] > 4 * 8
    line = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    assert len(line["completions"]) == 8 and {"response", "reward", "advantage"} <= set(line["completions"][0])


def test_two_ranks_train_exactly_like_one(tiny_model_dir, tmp_path):
    """Same seeds, same rollouts; the global token-mean loss and summed gradients make the update identical.
    Drawn by stratum, one to one: each step of 4 has 2 stop and 2 continue prompts, however the ranks split them."""
    outs = {}
    for nproc in (1, 2):
        outs[nproc] = tmp_path / f"n{nproc}"
        # different micro-batching, and activation recomputation on one side only: the update must not care
        config = write_config(tmp_path / f"c{nproc}.toml", tiny_model_dir, outs[nproc], grpo={"inner_updates": 2},
                              train={"micro_batch_size": 5 if nproc == 1 else 3, "strata": {"continue": 1, "stop": 1}},
                              model={"gradient_checkpointing": nproc == 2})
        run(config, nproc)
    decision = {s["cid"]: s["decision_truth"] for s in preprocess.load_samples(ROOT / "data/demo/train.jsonl")}
    for out in outs.values():
        steps = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
        for step in (1, 2):
            assert sorted(decision[s["cid"]] for s in steps if s["step"] == step) == ["continue"] * 2 + ["stop"] * 2
    one, two = metrics(outs[1]), metrics(outs[2])
    for a, b in zip(one, two):
        assert a["reward_mean"] == b["reward_mean"] and abs(a["loss"] - b["loss"]) < 1e-5
        assert a["approx_kl"] > 0 and abs(a["approx_kl"] - b["approx_kl"]) < 1e-7  # the 2nd update is off ratio 1
    w1, w2 = weights(outs[1] / "checkpoints/step_2"), weights(outs[2] / "checkpoints/step_2")
    initial = weights(tiny_model_dir)
    assert w1.keys() == w2.keys()
    for k in w1:  # float sums in another order differ by ~1e-6; the update itself is ~1e-2
        assert (w1[k] - w2[k]).abs().max() < 1e-5, k
        assert (w1[k] - initial[k]).abs().max() > 1e-3, k


def test_two_launchers_as_two_nodes_train_and_resume_like_one_launcher(tiny_model_dir, tmp_path):
    """The README's multi-node command, run on one machine: node 0's address is loopback, each "node" runs
    1 process and the model is tiny. Two torchrun launchers meet through c10d rendezvous and train a step,
    a second pair resumes for another; the rewards and weights equal one launcher's two processes (float
    sums may differ in the last bits)."""
    single, nodes = tmp_path / "single", tmp_path / "nodes"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    l2a_py = str(ROOT / "l2a.py")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", l2a_py,
                    "--config", str(write_config(tmp_path / "single.toml", tiny_model_dir, single))],
                   check=True, capture_output=True, env=env)
    for steps, resume in ((1, []), (2, ["--resume"])):
        config = write_config(tmp_path / "nodes.toml", tiny_model_dir, nodes, train={"steps": steps})
        port = free_port()
        launchers = [subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
             "--node_rank", str(node), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
             l2a_py, "--config", str(config), *resume], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=env) for node in (0, 1)]
        outputs = [launcher.communicate(timeout=600)[0] for launcher in launchers]
        assert [launcher.returncode for launcher in launchers] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]

    def rewards(out):
        return [m["reward_mean"] for m in metric_lines(out) if "reward_mean" in m]

    assert len(rewards(nodes)) == 2 and rewards(nodes) == rewards(single)
    a, b = weights(single / "checkpoints/step_2"), weights(nodes / "checkpoints/step_2")
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-6, k


def test_truncated_sampling_in_bf16_trains_finite_weights(tiny_model_dir, tmp_path):
    """top-k and top-p in training, in bf16: every step updates and no weight turns non-finite. (With the
    truncation recomputed by the trainer, this very run scored a sampled token -inf and its weights went NaN.)"""
    out = tmp_path / "run"
    run(write_config(tmp_path / "c.toml", tiny_model_dir, out, model={"dtype": "bfloat16"}, train={"steps": 3},
                     grpo={"top_k": 10, "top_p": 0.9, "group_size": 8, "max_new_tokens": 48}))
    assert all(m["updated"] and "nonfinite" not in m for m in metrics(out))
    w, initial = weights(out / "checkpoints/step_3"), weights(tiny_model_dir)
    for k in w:
        assert w[k].isfinite().all(), k
    assert any(not torch.equal(w[k], initial[k]) for k in w)


def test_a_nonfinite_loss_never_reaches_the_weights(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    run(write_config(tmp_path / "c.toml", tiny_model_dir, out), 1, "--inf-reward")
    for m in metrics(out):
        assert not m["updated"] and m["nonfinite"] == "loss" and m["grad_norm"] is None
        assert len(m["nonfinite_cids"]) == 4
    w, initial = weights(out / "checkpoints/step_2"), weights(tiny_model_dir)
    assert all(torch.equal(w[k], initial[k]) for k in w)


def test_nonfinite_names_the_quantity():
    fsdp.setup_distributed()  # a one-process group, as plain `python l2a.py` gets
    assert fsdp.nonfinite(0.5, torch.tensor(1.0)) is None
    assert fsdp.nonfinite(float("nan"), torch.tensor(1.0)) == "loss"
    assert fsdp.nonfinite(0.5, torch.tensor(float("inf"))) == "grad_norm"


def test_auto_dtype_is_bfloat16_only_where_the_hardware_multiplies_in_it(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    for avx512_bf16, amx, expected in ((False, False, torch.float32), (True, False, torch.bfloat16),
                                       (False, True, torch.bfloat16)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        assert fsdp.compute_dtype("auto", cpu) == expected
    for bf16, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
        assert fsdp.compute_dtype("auto", gpu) == expected  # whatever the host CPU has
    assert fsdp.compute_dtype("bfloat16", cpu) == torch.bfloat16 and fsdp.compute_dtype("float32", gpu) == torch.float32


def test_evaluation_with_fewer_prompts_than_ranks(tiny_model_dir, tmp_path):
    """One rank gets no test prompt, yet joins every collective; the rollouts equal a one-rank run's."""
    rollouts = {}
    for nproc in (1, 2):
        out = tmp_path / f"n{nproc}"
        run(write_config(tmp_path / f"c{nproc}.toml", tiny_model_dir, out, train={"steps": 1},
                         eval={"prompts": 1, "samples": 2}), nproc)
        rollouts[nproc] = (out / "eval/step_0/rollouts.jsonl").read_text()
    assert rollouts[1] == rollouts[2] and len(rollouts[1].splitlines()) == 2


def test_a_larger_evaluation_holds_the_smaller_one(tiny_model_dir, tmp_path):
    """eval.prompts = 16 answers its first 8 prompts as eval.prompts = 8 does (one batch of 8 each here), so an
    evaluation of the whole test split also gives the default's 20-prompt numbers (docs/evaluation.md)."""
    rows = {}
    for n in (8, 16):
        out = tmp_path / f"p{n}"
        run(write_config(tmp_path / f"c{n}.toml", tiny_model_dir, out, train={"steps": 1}, eval={"prompts": n}))
        rows[n] = (out / "eval/step_0/rollouts.jsonl").read_text().splitlines()
    assert len(rows[16]) == 32 and rows[16][:16] == rows[8]
    assert rows[16][16:] != rows[8]  # the other prompts' answers are not a copy of the first ones


def test_evaluation_prompts_are_spread_evenly(monkeypatch):
    """20 prompts on 8 ranks: 2 or 3 each, every prompt once, in rank order (ceil-sized shares gave one rank 0)."""
    monkeypatch.setattr(l2a.dist, "get_world_size", lambda: 8)
    shares = []
    for rank in range(8):
        monkeypatch.setattr(l2a.dist, "get_rank", lambda: rank)
        shares.append(fsdp.my_share(20))
    assert [len(s) for s in shares] == [2, 3, 2, 3, 2, 3, 2, 3]
    assert [i for s in shares for i in s] == list(range(20))
    assert list(shares[0]) == [0, 1] and list(shares[1]) == [2, 3, 4]


def test_checkpoint_loads_in_transformers_with_tied_embeddings(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    run(write_config(tmp_path / "c.toml", tiny_model_dir, out))
    model = AutoModelForCausalLM.from_pretrained(out / "checkpoints/step_2")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.allclose(model.lm_head.weight, initial.lm_head.weight)
    assert AutoTokenizer.from_pretrained(out / "checkpoints/step_2").chat_template


def load_on_two_ranks(rank, folders, store, results):
    """One of two ranks: load each folder with fsdp.load_model (meta device, then this rank's rows of each
    weight) and record the largest difference of every weight and buffer from Transformers' own loading."""
    l2a.dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    cfg = load_config(ROOT / "config.toml")
    report = {}
    for folder in folders:
        model = fsdp.load_model(folder, cfg, torch.device("cpu"))
        loaded = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        expected = {**reference.state_dict(), **dict(reference.named_buffers())}
        loaded.update(dict(model.named_buffers()))
        report[folder] = {"keys": sorted(loaded) == sorted(expected),
                          "tied": model.lm_head.weight is model.model.embed_tokens.weight,
                          "diff": max((loaded[k] - expected[k]).abs().max().item() for k in expected)}
    Path(results, str(rank)).write_text(json.dumps(report))
    l2a.dist.destroy_process_group()


def test_each_rank_loads_only_its_shards_and_gets_exactly_the_weights(tmp_path):
    """A tied model with a vocabulary that does not split evenly over 2 ranks, and an untied one stored in
    bf16 over several safetensors files (an index, as hub models are): weights and buffers (the rotary
    table) equal Transformers' from_pretrained exactly."""
    tied, untied = str(tmp_path / "tied"), str(tmp_path / "untied")
    tiny_llama(vocab_size=97).save_pretrained(tied)
    tiny_llama(vocab_size=97, tie=False).to(torch.bfloat16).save_pretrained(untied, max_shard_size="20KB")
    assert (Path(untied) / "model.safetensors.index.json").exists()
    torch.multiprocessing.spawn(load_on_two_ranks, args=([tied, untied], tmp_path / "store", tmp_path), nprocs=2)
    for rank in (0, 1):
        report = json.loads((tmp_path / str(rank)).read_text())
        assert report[tied] == {"keys": True, "tied": True, "diff": 0.0}, report
        assert report[untied] == {"keys": True, "tied": False, "diff": 0.0}, report


def test_on_a_gpu_the_process_group_carries_cpu_tensors_as_well(monkeypatch):
    """NCCL carries only CUDA tensors, but the ranks agree through small CPU ones (any_rank, the evaluation's
    progress, the missing-reward counts, pickled objects): a GPU run needs gloo beside NCCL in one group."""
    chosen = []
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(l2a.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(l2a.dist, "init_process_group", lambda backend, **kwargs: chosen.append(backend))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    assert fsdp.setup_distributed() == torch.device("cuda", 0)
    [backend] = chosen
    assert l2a.dist.distributed_c10d.BackendConfig(backend).get_device_backend_map() == {"cpu": "gloo",
                                                                                         "cuda": "nccl"}


def prepare_as_two_nodes(rank, gguf, store, folder, results):
    """One of two ranks, each the first process of its own node (LOCAL_RANK 0) with a cache of its own:
    where does the model get prepared, and is an output folder that differs between them refused?"""
    os.environ.update(LOCAL_RANK="0", XDG_CACHE_HOME=str(Path(folder, f"cache{rank}")))
    l2a.dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    fsdp.convert_gguf = lambda gguf, folder: folder.mkdir(parents=True) or (folder / "config.json").write_text("{}")
    said = {"model_ready": (Path(fsdp.resolve_model_path(gguf)) / "config.json").exists()}
    for name, out in (("same", Path(folder, "out")), ("different", Path(folder, f"out{rank}"))):
        out.mkdir(exist_ok=True)
        try:
            fsdp.check_shared(out)
            said[name] = "accepted"
        except BadInput as e:
            said[name] = str(e)
    Path(folder, f"said{rank}").write_text(json.dumps(said))
    l2a.dist.destroy_process_group()


def test_each_node_prepares_its_own_model_copy_and_an_unshared_output_folder_is_refused(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_text("")
    torch.multiprocessing.spawn(prepare_as_two_nodes, args=(str(gguf), tmp_path / "store", str(tmp_path), None),
                                nprocs=2)
    for rank in (0, 1):
        said = json.loads((tmp_path / f"said{rank}").read_text())
        assert said["model_ready"] and said["same"] == "accepted", said
        assert "is not the same folder on every rank" in said["different"], said


def test_tied_embeddings_stay_one_parameter_under_fsdp(tiny_model_dir):
    cfg = load_config(ROOT / "config.toml")
    fsdp.setup_distributed()  # a one-process group, as plain `python l2a.py` gets
    model = fsdp.load_model(str(tiny_model_dir), cfg, torch.device("cpu"))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 1000, (2, 6))
    logps, _ = grpo.token_logprobs(model, ids, torch.ones_like(ids), 3)
    logps.sum().backward()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_resume_without_a_checkpoint_is_an_error(tiny_model_dir, tmp_path):
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run([sys.executable, str(TOY_RUN), str(write_config(tmp_path / "c.toml", tiny_model_dir,
                                                                       tmp_path / "none")), "--resume"],
                       check=True, capture_output=True)


def shared_vs_plain_on_two_ranks(rank, model_dir, store, results):
    """One of two ranks: score the same rollout with and without shared prompts, padded and packed, each
    with and without the per-layer recomputation, in micro-batches that split a group, under FSDP2;
    record the largest log-prob and (full, reduced) gradient differences from plain full rows."""
    l2a.dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    cfg = load_config(ROOT / "config.toml", ["model.dtype='float32'"])
    model = fsdp.load_model(model_dir, cfg, torch.device("cpu"))
    prompts = [[[1, 5, 9, 13, 17, 21, 30], [1, 40]], [[1, 7, 7, 60, 3], [1, 8, 9]]][rank]
    with fsdp.gathered(model):
        rollout = grpo.sample(model, prompts, 3, 10, [2], 2, temperature=1.5, seeds=[rank * 6 + i for i in range(6)])
    weights = rollout.completion_mask * torch.linspace(-1, 1, 6)[:, None]
    scored = {}
    for share, recompute in [(share, recompute) for recompute in (False, True)
                             for share in (None, grpo.shared_prompt_logprobs, grpo.packed_prompt_logprobs)]:
        model.zero_grad()
        logps = []
        for rows in (slice(0, 4), slice(4, 6)):  # prompt 1's rows land in both micro-batches
            lp, _ = grpo.score_rows(model, rollout, rows, 3, share, 1.0, 7, recompute)
            (lp * weights[rows, :lp.size(1)]).sum().backward()
            logps.append(torch.nn.functional.pad(lp.detach(), (0, weights.size(1) - lp.size(1))))
        scored[share, recompute] = (torch.cat(logps) * rollout.completion_mask,
                         {n: p.grad.full_tensor() for n, p in model.named_parameters()})
    plain_lp, plain_grads = scored.pop((None, False))
    Path(results, str(rank)).write_text(json.dumps([{
        "logprob": (lp - plain_lp).abs().max().item(),
        "grad": max((grads[n] - plain_grads[n]).abs().max().item() for n in grads),
        "grad_scale": max(g.abs().max().item() for g in plain_grads.values())} for lp, grads in scored.values()]))
    l2a.dist.destroy_process_group()


def test_shared_prompts_equal_full_rows_under_fsdp_on_two_ranks(tiny_model_dir, tmp_path):
    """Padded and packed, with and without recomputed layers, each against full rows."""
    torch.multiprocessing.spawn(shared_vs_plain_on_two_ranks, args=(str(tiny_model_dir), tmp_path / "store", tmp_path),
                                nprocs=2)
    for rank in (0, 1):
        diffs = json.loads((tmp_path / str(rank)).read_text())
        assert len(diffs) == 5
        for diff in diffs:
            assert diff["logprob"] < 1e-5 and diff["grad"] < 1e-5 and diff["grad_scale"] > 1e-2, diff


def count_gathers_while_sampling(rank, model_dir, store, results):
    """One of two ranks: count FSDP2's all-gathers while sampling, with and without gathered()."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group  # where FSDP2 calls its all-gather
    l2a.dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    model = fsdp.load_model(model_dir, load_config(ROOT / "config.toml"), torch.device("cpu"))
    calls = []
    original = _fsdp_param_group.foreach_all_gather
    _fsdp_param_group.foreach_all_gather = lambda *a, **k: calls.append(1) or original(*a, **k)
    counts = []
    for max_new_tokens, gather_once in [(2, True), (10, True), (10, False)]:
        calls.clear()
        with fsdp.gathered(model) if gather_once else contextlib.nullcontext():
            grpo.sample(model, [[1, 2, 3]], 2, max_new_tokens, [], 0, seeds=[0, 1])
        counts.append(len(calls))
    Path(results, str(rank)).write_text(json.dumps(counts))
    l2a.dist.destroy_process_group()


def test_sampling_gathers_parameters_once_not_per_token(tiny_model_dir, tmp_path):
    torch.multiprocessing.spawn(count_gathers_while_sampling, args=(str(tiny_model_dir), tmp_path / "store", tmp_path),
                                nprocs=2)
    for rank in (0, 1):
        short, long, per_step = json.loads((tmp_path / str(rank)).read_text())
        assert short == long == 3, "one all-gather per FSDP unit (2 layers + root), whatever the length"
        assert per_step >= 10 * 2, "without gathered(), every decode step gathers the layers again"


# ----------------------------------------------------------------------------- warm start and reference rows

@pytest.mark.parametrize("recompute", [False, True])
def test_warm_start_loss_and_gradient_equal_a_naive_cross_entropy(tiny_model_dir, recompute):
    """warm_start_step's loss is the token-mean cross-entropy of the expert turns (then EOS) given their
    prompts, and its gradient is that of the naive loss on Transformers' own logits, row by row, with the
    layers recomputed in the backward (model.gradient_checkpointing) or not. Its rows are chained (a
    consultation's turns share one) and split into micro-batches."""
    cfg = load_config(ROOT / "config.toml", ["model.dtype='float32'", "sft.prompts_per_step=8",
                                                 "train.micro_batch_size=2",
                                                 f"model.gradient_checkpointing={str(recompute).lower()}"])
    fsdp.setup_distributed()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    samples, ids, _ = l2a.encode_prompts(preprocess.load_samples(ROOT / "data/demo/train.jsonl")[:8],
                                         preprocess.policy_messages, tokenizer,
                                         4096)
    model = fsdp.load_model(str(tiny_model_dir), cfg, torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # keeps the gradient for a look, changes nothing
    demos = [s["expert_turn"] for s in samples]
    answers = [l2a.answer_ids(tokenizer, d, cfg["grpo"]["max_new_tokens"]) for d in demos]
    chains = l2a.demonstration_chains(ids, answers)
    order = l2a.warm_start_indices(chains, 0, 8, cfg["train"]["seed"])
    rows = sum(len(l2a.chained_rows(order[b:b + 2], ids, answers)[0]) for b in range(0, 8, 2))  # micro-batches of 2
    assert sorted(order) == list(range(8)) and rows < 8, "some rows hold two turns"
    said = l2a.warm_start_step(model, optimizer, samples, ids, answers, chains, cfg, 0, torch.device("cpu"))

    naive = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    total, count = 0.0, 0
    for i in order:  # one row at a time, no padding anywhere
        target = tokenizer(samples[i]["expert_turn"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        row = torch.tensor([ids[i] + target])
        logp = naive(row).logits[0, len(ids[i]) - 1:-1].log_softmax(-1)
        total = total - logp.gather(-1, torch.tensor(target)[:, None]).sum()
        count += len(target)
    (total / count).backward()
    assert said["sft_loss"] == pytest.approx((total / count).item(), rel=1e-5) and said["sft_tokens"] == count
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
    clipped = min(1.0, cfg["train"]["grad_clip"] / (said["grad_norm"] + 1e-6))  # as clip_grad_norm_ scales them
    assert grads.keys() == dict(naive.named_parameters()).keys()
    for name, p in naive.named_parameters():
        torch.testing.assert_close(grads[name], p.grad * clipped, rtol=1e-4, atol=1e-6)


def test_reference_rows_choose_the_best_constant_on_train_and_grade_the_expert_on_test():
    samples = {split: preprocess.load_samples(ROOT / f"data/demo/{split}.jsonl") for split in ("train", "test")}
    test = samples["test"][:20]  # the default's test prompts
    reward_fn = judge.make_reward_fn({"backend": "rules", "fusion": "multiplicative"})
    fsdp.setup_distributed()
    task = l2a.load_task("learn_to_ask")
    rows = evaluation.reference_evaluations(task, samples["train"], test, reward_fn, 500)
    assert evaluation.reference_evaluations(task, samples["train"], test, reward_fn, 0) == {}

    def mean(split, answer):
        return sum(x["reward"] for x in reward_fn(split, [answer] * len(split))) / len(split)

    best = max(judge.constant_candidates(samples["train"]), key=lambda c: mean(samples["train"], c))
    constant, constant_rows = rows["constant"]
    assert {r["response"] for r in constant_rows} == {best}
    assert constant["total_reward"]["mean"] == pytest.approx(mean(test, best))
    assert constant["total_reward"]["mean"] >= mean(test, "How long have you had it?") == pytest.approx(2.17)
    expert, expert_rows = rows["expert"]
    assert [r["response"] for r in expert_rows] == [s["expert_turn"] for s in test]
    assert expert["stop_decision_accuracy"]["mean"] == 1.0 and expert["total_reward"]["mean"] > 3.5


def test_a_guided_run_trains_on_the_experts_turns_and_logs_them_apart(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    l2a_run(write_config(tmp_path / "c.toml", tiny_model_dir, out, grpo={"group_size": 4, "max_new_tokens": 48,
                                                                         "expert_in_group": True}))
    reward_fn = judge.make_reward_fn({"backend": "rules"})
    assert any(guided_groups(out, lambda sample: sample["expert_turn"], reward_fn))
    for m in metric_lines(out)[1:]:  # the training reward is the policy's own; the guides' is logged apart
        assert m["rollouts"] == 16 and "expert_reward_mean" in m and m["updated"]
        assert m["sampler_trainer_logprob_gap"] < 1e-3  # the guides, never sampled, are left out of it
    with pytest.raises(BadInput, match="expert_in_group"):  # a custom task has no expert turns
        l2a.train(load_config(write_config(tmp_path / "d.toml", tiny_model_dir, tmp_path / "d",
                                               grpo={"expert_in_group": True})), task=toy_task())


def test_a_guide_joins_only_the_groups_where_no_draw_earned_as_much(tiny_model_dir, tmp_path):
    """On 2 ranks, with guides that beat every draw (all vowels) or none (no vowel): a guide replaces the
    last draw in the first kind of group only."""
    from toy_run import vowel_guide, vowel_share
    out = tmp_path / "run"
    run(write_config(tmp_path / "c.toml", tiny_model_dir, out, grpo={"group_size": 4, "expert_in_group": True}),
        2, "--guided")
    kinds = guided_groups(out, vowel_guide, vowel_share)
    assert len(kinds) == 8 and 0 < sum(kinds) < 8  # both kinds of group were met


def guided_groups(out, guide_of, reward_fn):
    """For each group in samples.jsonl, whether its guide joined it, checked against the guide's own grade:
    a guide, graded as the run graded it, is last where no draw earned as much, and absent elsewhere."""
    samples = {s["cid"]: s for s in preprocess.load_samples(ROOT / "data/demo/train.jsonl")}
    kinds = []
    for line in map(json.loads, (out / "samples.jsonl").read_text().splitlines()):
        sample, (*drawn, last) = samples[line["cid"]], line["completions"]
        guide = guide_of(sample)
        [graded] = reward_fn([sample], [guide])
        assert not any("expert" in c for c in drawn)
        if last.get("expert"):
            assert last["response"] == guide and last["reward"] == graded["reward"]
            assert all(c["reward"] < graded["reward"] for c in drawn)
        else:
            assert max(c["reward"] for c in line["completions"]) >= graded["reward"]
        kinds.append(bool(last.get("expert")))
    return kinds


def test_a_warm_started_run_resumes_across_the_switch_to_grpo_exactly(tiny_model_dir, tmp_path):
    """Two warm start steps then two GRPO steps with a KL, straight, against a run stopped after the warm
    start (train.steps = 0), resumed for one GRPO step and resumed again: the same final weights, bit for
    bit (one process, float32). The KL's reference is the warm-started policy, so the first GRPO step's KL
    is 0; the second resume must read it from the checkpoint, not from the base model."""
    sections = {"sft": {"steps": 2, "prompts_per_step": 4}, "model": {"dtype": "float32"},
                "train": {"steps": 2, "save_minutes": 0.0}, "grpo": {"kl_coef": 0.5}}
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    l2a_run(write_config(tmp_path / "a.toml", tiny_model_dir, straight, **sections))
    config = write_config(tmp_path / "b.toml", tiny_model_dir, stopped, **sections)
    l2a_run(config, "--set", "train.steps=0")
    l2a_run(config, "--resume", "--set", "train.steps=1")
    l2a_run(config, "--resume")
    lines = metric_lines(straight)
    assert [m["step"] for m in lines] == [0, 1, 2, 3, 4] and "sft_loss" in lines[1] and "reward_mean" in lines[3]
    assert "eval_total_reward" in lines[2] and "eval_total_reward" in lines[4]  # after the warm start, at the end
    assert lines[3]["ref_kl"] == 0 < lines[4]["ref_kl"]
    assert [(m.get("sft_loss"), m.get("reward_mean"), m.get("ref_kl")) for m in lines] == \
           [(m.get("sft_loss"), m.get("reward_mean"), m.get("ref_kl")) for m in metric_lines(stopped)]
    a, b = weights(straight / "checkpoints/step_4"), weights(stopped / "checkpoints/step_4")
    assert all(torch.equal(a[k], b[k]) for k in a)
    table = (straight / "eval/comparison.md").read_text()
    assert table.startswith("| metric | step_0 | step_2 | step_4 | constant | expert |")
    # A run saved after the switch without a KL holds no reference: a KL on resume is refused in one line.
    plain = write_config(tmp_path / "c.toml", tiny_model_dir, tmp_path / "plain", **{**sections, "grpo": {}})
    l2a_run(plain, "--set", "train.steps=1")
    refused = l2a_run(plain, "--resume", "--set", "grpo.kl_coef=0.5", fails=True)
    assert "holds no KL reference" in refused.stderr, refused.stderr[-2000:]


def test_two_ranks_warm_start_exactly_like_one(tiny_model_dir, tmp_path):
    """Each rank chains its own share of a warm-start step's samples into rows, and a chain may fall across
    the two ranks; the loss over the global token count and the summed gradients still give the one-rank
    steps: the same losses and weights (different micro-batching, recomputation on one side). Then one
    GRPO step with a KL: its reference, copied shard by shard from the warm-started policy, is that policy."""
    outs = {}
    for nproc in (1, 2):
        outs[nproc] = tmp_path / f"n{nproc}"
        l2a_run(write_config(tmp_path / f"c{nproc}.toml", tiny_model_dir, outs[nproc],
                             sft={"steps": 3, "prompts_per_step": 6}, grpo={"kl_coef": 0.5},
                             train={"steps": 1, "micro_batch_size": 1 if nproc == 1 else 2, "save_minutes": 0.0},
                             model={"gradient_checkpointing": nproc == 2}), nproc=nproc)
    *one, grpo_one = metric_lines(outs[1])[1:]
    *two, grpo_two = metric_lines(outs[2])[1:]
    assert grpo_one["ref_kl"] == grpo_two["ref_kl"] == 0  # each rank copied its shards of the warm start
    assert len(one) == 3 and [m["sft_tokens"] for m in one] == [m["sft_tokens"] for m in two]
    assert all(abs(a["sft_loss"] - b["sft_loss"]) < 1e-5 for a, b in zip(one, two)), (one, two)
    w1, w2 = weights(outs[1] / "checkpoints/step_3"), weights(outs[2] / "checkpoints/step_3")
    initial = weights(tiny_model_dir)
    for k in w1:
        assert (w1[k] - w2[k]).abs().max() < 1e-5 and (w1[k] - initial[k]).abs().max() > 1e-4, k  # lr 3e-4, 3 steps


def l2a_run(config, *args, nproc=1, fails=False):
    """Run l2a.py (under torchrun for nproc > 1); assert it succeeded, or with `fails` that it failed."""
    launcher = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                                   if nproc > 1 else [])
    result = subprocess.run(launcher + [str(ROOT / "l2a.py"), "--config", str(config), *args], capture_output=True,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert (result.returncode != 0) == fails, result.stdout[-3000:] + result.stderr[-3000:]
    return result
