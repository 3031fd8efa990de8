"""Host memory and time of loading and checkpointing a model under FSDP2, per rank, on this machine.

    python benchmarks/memory_at_scale.py [--nproc 2] [--folder /tmp/l2a-qwen2.5-0.5b-arch]

A random-init model of the Qwen2.5-0.5B architecture (494M parameters, tied embeddings, built from its
config: no hub) is saved once in bf16, as Qwen ships it. Then `nproc` ranks, one torchrun job per side:

  gathered   what l2a did before: every rank calls from_pretrained (a whole float32 copy) and shards;
             a checkpoint gathers the full float32 weights on rank 0, which writes them alone
  l2a        fsdp.load_model (built on the meta device, each rank reads only its rows) and
             checkpoint.save_checkpoint (each rank writes its shards; DCP stitches them a tensor at a time)

Both write the same AdamW state (after one step) through DCP. Printed per side: seconds, and each
rank's peak resident memory while loading and while saving (sampled every 5 ms), next to the float32
shard the rank holds. Measure alone: a second busy process on 2 cores distorts the times.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from config import load_config  # noqa: E402 (torch-free)

QWEN2_5_0_5B = {  # the published config.json of Qwen/Qwen2.5-0.5B-Instruct, architecture fields
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
    "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151645,
}


def build(folder):
    """The model folder, once; a tokenizer (SmolLM2's: only saved, never used here) makes it complete."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from bench import model_folder
    if (folder / "model.safetensors").exists():
        return
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**QWEN2_5_0_5B), dtype=torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(model_folder()).save_pretrained(folder)


def rss_gib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


class PeakRSS:
    """with PeakRSS() as peak: ...; peak.gib is the largest resident size seen in the block."""

    def __enter__(self):
        self.gib, self.done = rss_gib(), threading.Event()
        self.thread = threading.Thread(target=self.sample)
        self.thread.start()
        return self

    def sample(self):
        while not self.done.wait(0.005):
            self.gib = max(self.gib, rss_gib())

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


def gathered_load(folder):
    import torch
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for unit in [m for m in model.modules() if type(m).__name__ in model._no_split_modules] + [model]:
        fully_shard(unit)
    return model


def gathered_save(model, optimizer, tokenizer, out):
    import checkpoint
    import fsdp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    checkpoint.dcp.save(checkpoint.get_optimizer_state_dict(model, optimizer), checkpoint_id=out / "optimizer")
    if fsdp.dist.get_rank() == 0:
        model.save_pretrained(out, state_dict=weights)
        tokenizer.save_pretrained(out)
    fsdp.dist.barrier()


def child(side, folder, out):
    """One rank: load, take one optimizer step (so AdamW has its state), save; print its numbers as JSON."""
    import torch
    from transformers import AutoTokenizer
    import checkpoint
    import fsdp
    device = fsdp.setup_distributed()
    started = time.perf_counter()
    if side == "l2a":
        model = fsdp.load_model(str(folder), load_config(ROOT / "config.toml"), device)
    else:
        model = gathered_load(folder)
    fsdp.dist.barrier()
    numbers = {"rank": fsdp.dist.get_rank(), "load_s": time.perf_counter() - started,
               "load_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
               "shard_gib": sum(p.to_local().numel() * 4 for p in model.parameters()) / 2**30}
    optimizer = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    started = time.perf_counter()
    with PeakRSS() as peak:
        if side == "l2a":
            checkpoint.save_checkpoint(model, optimizer, tokenizer, 1, {}, out, keep=1)
        else:
            gathered_save(model, optimizer, tokenizer, out)
    numbers.update(save_s=time.perf_counter() - started, save_gib=peak.gib)
    print(json.dumps(numbers), flush=True)
    fsdp.dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--folder", default="/tmp/l2a-qwen2.5-0.5b-arch")
    parser.add_argument("--child", choices=["gathered", "l2a"])
    parser.add_argument("--out")
    a = parser.parse_args()
    folder = Path(a.folder)
    if a.child:
        return child(a.child, folder, Path(a.out))
    build(folder)
    print(f"| {a.nproc} ranks, Qwen2.5-0.5B architecture | load s | peak GiB per rank, loading | "
          f"save s | peak GiB per rank, saving | float32 shard GiB per rank |\n|---|---|---|---|---|---|")
    for side in ("gathered", "l2a"):
        with tempfile.TemporaryDirectory() as out:
            result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                     "--nproc_per_node", str(a.nproc), __file__, "--child", side, "--folder",
                                     str(folder), "--out", out],
                                    capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if result.returncode:
            sys.exit(result.stdout[-3000:] + result.stderr[-3000:])
        ranks = sorted((json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"rank"')),
                       key=lambda r: r["rank"])
        load_gib, save_gib, shard_gib = (", ".join(f"{r[k]:.2f}" for r in ranks)
                                         for k in ("load_gib", "save_gib", "shard_gib"))
        print(f"| {side} | {max(r['load_s'] for r in ranks):.1f} | {load_gib} | {max(r['save_s'] for r in ranks):.1f} "
              f"| {save_gib} | {shard_gib} |", flush=True)


if __name__ == "__main__":
    main()
