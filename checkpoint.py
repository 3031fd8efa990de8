"""What lets a run stop and go on: an output folder checked before anything loads, checkpoints written
atomically and pruned, resume, logs cut back to the checkpoint, and stopping on a scheduler's or a
user's signal with everything trained kept."""

import errno
import json
import os
import shutil
import signal
import tempfile
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from config import BadInput
from fsdp import any_rank, check_shared


class RunStopped(Exception):
    """The run stopped itself for a reason it states, keeping (in a checkpoint) every step it trained."""


def save_checkpoint(model, optimizer, tokenizer, step, trainer_state, out_dir, keep, reference=None):
    """checkpoints/step_N: a Hugging Face model folder (safetensors), the sharded optimizer state (DCP),
    each rank's random generator state, trainer_state.json and, when given, the KL's reference (DCP; only
    when it is no longer the model the run loaded). No rank gathers the model: every rank
    writes its own shards, and DCP then stitches them into one safetensors file a tensor at a time.
    Everything is written into step_N.partial, flushed to disk, then renamed: a folder named step_N is
    always complete, and a save that dies half way (killed, disk full) leaves the previous checkpoint as
    it was. Then only the newest `keep` remain."""
    root, rank = out_dir / "checkpoints", dist.get_rank()
    final, partial = root / f"step_{step}", root / f"step_{step}.partial"
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
    dist.barrier()
    error = None
    try:
        write_partial(model, optimizer, tokenizer, {"step": step, **trainer_state}, partial, reference)
    except (Exception, CheckpointException) as e:  # DCP raises CheckpointException on every rank when one fails
        error = e  # any failure (a full disk: OSError, or safetensors' own error): every rank must hear of it
    # Each decision below is taken by every rank together, before any rank can raise: a rank that raised
    # alone would leave the others waiting in the next collective.
    [written] = any_rank(error is None)
    if written and rank == 0:
        try:
            if final.exists():  # left by an earlier run into the same output_dir
                shutil.rmtree(final)
            partial.rename(final)
            fsync(root)  # the rename itself
            for old in complete_checkpoints(out_dir)[:-keep]:
                shutil.rmtree(old)
        except OSError as e:
            error = e
    failed, full = any_rank(error is not None, error is not None and disk_full(error, root, latest_checkpoint(out_dir)))
    if not failed:
        return final
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)  # room for the next try; the previous checkpoint stays
    dist.barrier()
    previous = latest_checkpoint(out_dir)
    kept = f"The previous checkpoint {previous} is intact" if previous else "There is no earlier checkpoint"
    if full:
        cause = f"No space left on device. {kept}; make room, then "
    else:  # not the disk: the cause is a bug to fix, and main prints its traceback
        cause = (f"{failure_reason(error)}. {kept}; the error is not a full disk: fix its cause (traceback above, "
                 f"from the rank that failed), then ")
    raise RunStopped(f"could not write checkpoint {final}: {cause}"
                     + ("continue with --resume." if previous else "start again.")) from error


def write_partial(model, optimizer, tokenizer, trainer_state, partial, reference=None):
    """Write every part of a checkpoint into the folder `partial` and flush it to disk; raises on failure."""
    rank = dist.get_rank()
    partial.mkdir(parents=True, exist_ok=True)
    dcp.save(weights(model), storage_writer=HuggingFaceStorageWriter(str(partial), save_distributed=True,
                                                                     enable_consolidation=True))
    dcp.save(get_optimizer_state_dict(model, optimizer), checkpoint_id=partial / "optimizer")  # fsyncs its files
    if reference is not None:
        dcp.save(weights(reference), checkpoint_id=partial / "reference")
    rng = {"torch": torch.get_rng_state().tolist()}  # plain JSON: nothing to unpickle on resume
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state().tolist()
    (partial / f"rng_rank{rank}.json").write_text(json.dumps(rng))
    fsync(partial / f"rng_rank{rank}.json")
    if rank == 0:
        shutil.rmtree(partial / "sharded")  # the shards, now stitched into the safetensors file
        model.config.save_pretrained(partial)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        (partial / "trainer_state.json").write_text(json.dumps(trainer_state))
        for path in partial.rglob("*"):
            if path.is_file():
                fsync(path)


def weights(model):
    """The model's sharded state dict, a tied weight once."""
    named = dict(model.named_parameters()) | dict(model.named_buffers())
    return {name: w for name, w in get_model_state_dict(model).items() if name in named}


def load_reference(checkpoint, reference):
    """Load the KL's reference saved in `checkpoint` (save_checkpoint) into the sharded model `reference`."""
    if not (checkpoint / "reference").is_dir():
        raise BadInput(f"--resume with grpo.kl_coef > 0 after a warm start: {checkpoint} holds no KL reference (the "
                       f"warm-started policy), since its run had grpo.kl_coef = 0; resume with grpo.kl_coef = 0")
    state = weights(reference)
    dcp.load(state, checkpoint_id=checkpoint / "reference")
    set_model_state_dict(reference, state, options=StateDictOptions(strict=False))


def fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_full(error, folder, previous):
    """Whether a failed save ran out of room; it never raises, since every rank must answer. Torch's own
    writers report ENOSPC in words of their own ("unexpected pos 704 vs 598", seen on a GPU machine's
    disk), and a buffered writer can stop with megabytes still free, so the free space left beside the
    half-written save decides: full when a save as large as the previous checkpoint would not fit in it
    (with no previous checkpoint, when under 64 MiB is left)."""
    try:
        needed = sum(f.stat().st_size for f in previous.rglob("*") if f.is_file()) if previous else 2**26
        return shutil.disk_usage(folder).free < needed
    except OSError:
        return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def failure_reason(error):
    """One line for a failed save: the OS's words (found inside DCP's wrapper), else the error's first line."""
    if isinstance(error, CheckpointException):
        errors = [e for e, _ in error.failures.values()]
        error = next((e for e in errors if isinstance(e, OSError)), errors[0] if errors else error)
    if error is None:
        return "another rank failed to write its part"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return f"{type(error).__name__}: {str(error).splitlines()[0]}" if str(error) else type(error).__name__


def complete_checkpoints(out_dir):
    """The complete checkpoints, oldest first (step_N.partial is a save that never finished)."""
    found = [p for p in (out_dir / "checkpoints").glob("step_*")
             if p.name[5:].isdigit() and (p / "trainer_state.json").exists()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(out_dir):
    return (complete_checkpoints(out_dir) or [None])[-1]


def open_output(out_dir, resume):
    """The checkpoint to continue from (None for a fresh run), once the folder is known to be usable."""
    check_writable(out_dir)
    check_shared(out_dir)
    checkpoint = latest_checkpoint(out_dir)
    if resume and checkpoint is None:
        raise BadInput(f"--resume: no complete checkpoint under {out_dir / 'checkpoints'}")
    if not resume and checkpoint:  # a fresh run here would prune the new checkpoints before the old ones
        raise BadInput(f"train.output_dir {str(out_dir)!r} holds an earlier run's checkpoint {checkpoint.name}: "
                       f"continue it with --resume, or choose another train.output_dir")
    return checkpoint


def check_writable(folder):
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise BadInput(f"output folder {str(folder)!r} cannot be written: {e.strerror}") from None


def load_trainer_state(checkpoint, optimizer, model):
    """Restore the optimizer and this rank's random generators from `checkpoint`; returns trainer_state."""
    state = get_optimizer_state_dict(model, optimizer)
    dcp.load(state, checkpoint_id=checkpoint / "optimizer")
    set_optimizer_state_dict(model, optimizer, state)
    rng_file = checkpoint / f"rng_rank{dist.get_rank()}.json"
    if rng_file.exists():  # absent when resuming on more ranks than saved: those start from the seed
        rng = json.loads(rng_file.read_text())
        torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(torch.tensor(rng["cuda"], dtype=torch.uint8))
    return json.loads((checkpoint / "trainer_state.json").read_text())


def keep_lines_up_to(path, step):
    """Drop log lines written after the checkpoint a run resumes from (step -1: every line), so each step
    appears once, and a last line that a kill cut short. The kept lines are written beside the log and
    renamed over it: a kill during the write leaves the old log whole."""
    if path.exists():
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
            except json.JSONDecodeError:
                pass
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        fsync(tmp)
        os.replace(tmp, path)


class StopTraining(Exception):
    """A reason to stop training that every rank has agreed on; train() saves what was trained, then stops."""


REPEAT_SECONDS = 3.0  # the same signal again within this long is the same request to stop


@contextmanager
def stop_on_signals():
    """SIGTERM (what a scheduler sends before it preempts a job) or SIGINT (Ctrl-C) asks the run to finish
    its step, save and exit with status 0; yields a list that holds the signal's name once one came.

    The same signal again within REPEAT_SECONDS is the same request: a scheduler that signals every
    process of a torchrun job reaches each worker twice, directly and through torchrun, which forwards
    it. Another signal, or the same one later, exits at once: the newest complete checkpoint is safe,
    since saves are atomic."""
    received, first_at = [], []

    def handle(signum, frame):
        name = signal.Signals(signum).name
        if received:
            if name == received[0] and time.monotonic() - first_at[0] < REPEAT_SECONDS:
                return
            os._exit(128 + signum)
        received.append(name)
        first_at.append(time.monotonic())
        # os.write, not print: the handler may run while the progress bar is in the middle of a write
        # to stderr, and a buffered stream refuses to be entered twice.
        os.write(2, f"\n{name}: finishing this step, then saving and stopping (the same signal again after "
                    f"{REPEAT_SECONDS:.0f} s, or another one, stops at once)\n".encode())

    previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
