"""scripts/gpu_check.py, the check anyone with a GPU runs in minutes, kept from rotting: its CPU mode."""

import json
import os
import subprocess
import sys

from conftest import ROOT


def test_the_gpu_check_runs_on_cpu(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts/gpu_check.py"), "--device", "cpu", "--out",
                             str(tmp_path)], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    tiny = json.loads((tmp_path / "gpu_check.json").read_text())["tiny"]
    assert tiny["resumed"] and tiny["greedy_equal"] == "4/4", tiny  # float32 on CPU: token for token
    assert tiny["packed_gap"] < 1e-4, tiny
    assert tiny["recompute_logprob_gap"] < 1e-5 and tiny["recompute_grad_gap"] < 1e-4, tiny  # float32: the same
    assert tiny["update_tflops"] > 0 and tiny["sample_tok_s"] > 0 and tiny["generate_tok_s"] > 0
    assert "| tiny | " in result.stdout
    # every kind of collective l2a makes ran (here all on gloo): rank agreement and counters on CPU tensors
    assert {"all_reduce:cpu", "all_gather_object:no tensor", "barrier:no tensor"} <= set(tiny["collectives"]), tiny
