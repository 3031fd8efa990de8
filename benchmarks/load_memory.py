"""Host memory of loading a model under FSDP2, per rank, on this machine.

    python benchmarks/load_memory.py [--nproc 2] [--folder /tmp/l2a-qwen2.5-0.5b-arch]

A random-init model of the Qwen2.5-0.5B architecture (494M parameters, tied embeddings, built from its
config: no hub) is saved once in bf16, as Qwen ships it. Then `nproc` ranks, one torchrun job per side:
  transformers   each rank calls from_pretrained (a whole float32 copy), then shards: what l2a did before
  l2a            l2a.load_model: built on the meta device, sharded, each rank reads only its own rows
Printed per side: the seconds to load, each rank's peak resident memory, and the float32 shard each
rank holds once loaded (what it needs; the rest of the peak is what loading cost on top).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QWEN2_5_0_5B = {  # the published config.json of Qwen/Qwen2.5-0.5B-Instruct, architecture fields
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
    "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151645,
}


def build(folder):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    if (folder / "model.safetensors").exists():
        return
    config = AutoConfig.for_model(**QWEN2_5_0_5B)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)


def peak_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def child(side, folder):
    """One rank: load the model one way; print this rank's seconds and peak memory as JSON."""
    import torch
    import l2a
    device = l2a.setup_distributed()
    started = time.perf_counter()
    if side == "l2a":
        model = l2a.load_model(str(folder), l2a.load_config(ROOT / "config.toml"), device)
    else:
        from torch.distributed.fsdp import fully_shard
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        for unit in [m for m in model.modules() if type(m).__name__ in model._no_split_modules] + [model]:
            fully_shard(unit)
    l2a.dist.barrier()
    held = sum(p.to_local().numel() * p.element_size() for p in model.parameters()) / 2**30
    print(json.dumps({"rank": l2a.dist.get_rank(), "seconds": time.perf_counter() - started, "peak_gib": peak_gib(),
                      "shard_gib": held}), flush=True)
    l2a.dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--folder", default="/tmp/l2a-qwen2.5-0.5b-arch")
    parser.add_argument("--child", choices=["transformers", "l2a"])
    a = parser.parse_args()
    folder = Path(a.folder)
    if a.child:
        return child(a.child, folder)
    build(folder)
    print(f"| loading, {a.nproc} ranks, Qwen2.5-0.5B architecture | seconds | peak GiB per rank | "
          f"float32 shard GiB per rank |\n|---|---|---|---|")
    for side in ("transformers", "l2a"):
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 str(a.nproc), __file__, "--child", side, "--folder", str(folder)],
                                capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if result.returncode:
            sys.exit(result.stdout[-3000:] + result.stderr[-3000:])
        ranks = sorted((json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"rank"')),
                       key=lambda r: r["rank"])
        peaks, shards = (", ".join(f"{r[key]:.2f}" for r in ranks) for key in ("peak_gib", "shard_gib"))
        print(f"| {side} | {max(r['seconds'] for r in ranks):.1f} | {peaks} | {shards} |", flush=True)


if __name__ == "__main__":
    main()
