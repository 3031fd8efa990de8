"""GRPO from scratch: sample completions, score them as a group, push the policy toward the better ones.

One step, for N prompts with G completions each:

    sample        G completions per prompt from the current policy, with a KV cache
    reward        done by the task (judge.py), not here: one number per completion, or None when missing
    advantage     A_i = (r_i - mean(r_group)) / (std(r_group) + eps)            per group of G
    loss          -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A) + beta * k3(ref, pi)   per token
                  with rho = exp(logp - logp_old), averaged over the tokens of the whole global batch

This file knows nothing about the task, the judge, the data or distributed training: models are Hugging
Face causal LMs, prompts are lists of token ids, rewards are tensors.
"""

import importlib.util
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial

import torch
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer


def shape_logits(logits, temperature=1.0, top_k=0, top_p=1.0):
    """The distribution the sampler draws from, as float32 logits (-inf outside the kept set).

    Only the sampler truncates. The policy that is scored and trained is the tempered, untruncated
    softmax(logits / temperature), in the sampler's reported log-probs and in the trainer's alike, and
    here is why. Carrying the truncation into the trainer would make a sampled token's log-prob -inf
    whenever the trainer's recomputed kept set misses it, and it does: a cached bf16 decode and a full
    bf16 forward differ in the last bits, enough to move a token across the top-p or top-k boundary
    (seen on the real model: 2 of 978 tokens at top_p = 0.9; then rho = exp(-inf + inf) = NaN and
    every weight NaN). Under the untruncated distribution every token has a finite log-prob. The price
    is a small, known bias: tokens come from the truncated q, not from pi, and q = pi / (kept mass) on
    the kept set, so the exact importance weight pi/q is the kept mass (>= top_p), a per-position
    constant the surrogate ignores, as TRL and verl do.
    """
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p; the top token always stays.
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@dataclass
class Rollout:
    """G completions per prompt, row r belonging to prompt r // G. Prompts are left-padded, completions
    right-padded; the masks, not the pad id, say which tokens are real (pad may equal EOS)."""

    prompt_ids: torch.Tensor  # [B, P]
    prompt_mask: torch.Tensor  # [B, P] 1 on real prompt tokens
    completion_ids: torch.Tensor  # [B, T]
    completion_mask: torch.Tensor  # [B, T] 1 on sampled tokens, up to and including EOS / the stop string
    logprobs: torch.Tensor  # [B, T] log-prob of each sampled token under the tempered untruncated policy; 0 on pad
    finished: torch.Tensor  # [B] True if the row ended by EOS or a stop string, False if it hit the length cap
    sampled: torch.Tensor | None = None  # [B] False where a row was put in, not drawn (with_guides); None: all drawn


def left_pad(prompts, pad_token_id):
    """Token-id lists as one left-padded batch: (ids [N, P], mask [N, P] with 1 on real tokens)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def positions_from_mask(attention_mask):
    """Position ids that count only real tokens, so a left-padded row sees the same positions as unpadded."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


class InPlaceLayer(DynamicLayer):
    """A KV-cache layer that appends in place. Transformers' DynamicLayer appends with torch.cat, which
    copies the whole cache at every decode step: about a quarter of a SmolLM2-135M decode forward on a
    2-core CPU (16 rows, ~330 cached tokens). This one writes the prefill at the front of buffers with
    room for `room` more positions, writes each new position into them and hands attention a view of
    the filled part."""

    def __init__(self, room):
        super().__init__()
        self.room = room

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            shape = (*key_states.shape[:2], key_states.size(2) + self.room, key_states.size(3))
            self.key_buffer, self.value_buffer, self.length = key_states.new_empty(shape), value_states.new_empty(shape), 0
        end = self.length + key_states.size(2)
        if end > self.key_buffer.size(2):
            raise ValueError(f"InPlaceLayer: {end} positions, room for {self.key_buffer.size(2)}")
        self.key_buffer[:, :, self.length:end] = key_states
        self.value_buffer[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def batch_repeat_interleave(self, repeats):
        self.key_buffer, self.value_buffer = (x.repeat_interleave(repeats, 0) for x in (self.key_buffer, self.value_buffer))
        self.keys, self.values = self.key_buffer[:, :, :self.length], self.value_buffer[:, :, :self.length]

    def batch_select_indices(self, indices):
        self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
        self.keys, self.values = self.key_buffer[:, :, :self.length], self.value_buffer[:, :, :self.length]


def row_seeds(seed, step, first_prompt, n_prompts, group_size):
    """One sampling seed per completion, set by (seed, step, prompt position, g) alone."""
    return [hash((seed, step, first_prompt + i, g)) for i in range(n_prompts) for g in range(group_size)]


@torch.no_grad()
def sample(model, prompts, group_size, max_new_tokens, eos_token_ids, pad_token_id, temperature=1.0,
           top_k=0, top_p=1.0, stop_strings=(), tokenizer=None, seeds=None, repetition_penalty=1.0):
    """Sample `group_size` completions for each prompt (a list of token-id lists).

    The prompts are prefilled once, as one left-padded batch, and each prompt's KV cache is then copied to
    its G rows. Every row draws its tokens from its own generator (`seeds`, one per row), so a completion
    does not depend on which rows share its batch: the same seeds give the same rollouts on 1 or N ranks.
    temperature 0 is greedy decoding (log-probs then come from the temperature-1 distribution).
    A row stops at an EOS token or once its text contains a stop string (needs `tokenizer`); finished rows
    are dropped from the batch and the cache, so they cost nothing while the others go on.
    repetition_penalty divides positive and multiplies negative logits of every token already in the row,
    prompt included, as in Transformers. Like top-k and top-p it shapes only what is drawn: the reported
    log-probs, like the trainer's, are of the tempered, unpenalised policy (see shape_logits).
    """
    device = model.get_input_embeddings().weight.device
    n_rows = len(prompts) * group_size
    prompt_ids, prompt_mask = (x.to(device) for x in left_pad(prompts, pad_token_id))
    if seeds is None:
        seeds = torch.randint(2**62, (n_rows,)).tolist()
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    eos = torch.tensor(list(eos_token_ids), device=device)
    stop_window = max((len(s) for s in stop_strings), default=0)  # a token decodes to >= 1 character

    cache, logits, attention_mask, next_position = _prefill(model, prompt_ids, prompt_mask, group_size,
                                                            max_new_tokens)
    completion_ids = torch.full((n_rows, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((n_rows, max_new_tokens), device=device)
    lengths = torch.zeros(n_rows, dtype=torch.long, device=device)
    finished = torch.zeros(n_rows, dtype=torch.bool, device=device)
    alive = torch.arange(n_rows, device=device)  # rows still generating, in cache order
    if repetition_penalty != 1.0:  # seen[r, v]: token v is already in row r
        seen = _prompt_tokens(prompt_ids, prompt_mask, logits.size(-1)).repeat_interleave(group_size, 0)
    for t in range(max_new_tokens):
        drawn = logits
        if repetition_penalty != 1.0:
            penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
            drawn = torch.where(seen[alive], penalised, logits)
        token = _draw_tokens(drawn, temperature, top_k, top_p, generators, alive)
        completion_ids[alive, t] = token
        if repetition_penalty != 1.0:
            seen[alive, token] = True
        policy = logits.float() / (temperature or 1.0)  # what the trainer scores: see shape_logits
        logprobs[alive, t] = policy.log_softmax(-1).gather(-1, token[:, None]).squeeze(-1)
        lengths[alive] += 1
        done = torch.isin(token, eos)
        if stop_window:
            tails = completion_ids[alive, max(0, t + 1 - stop_window):t + 1]
            done |= _has_stop_string(tokenizer, tails, stop_strings)
        finished[alive[done]] = True
        if t == max_new_tokens - 1 or done.all():
            break
        if done.any():
            alive, token, attention_mask, next_position = _drop_rows(cache, done, alive, token, attention_mask,
                                                                     next_position)
        logits, attention_mask, next_position = _decode_step(model, cache, token, attention_mask, next_position)

    width = int(lengths.max())
    completion_mask = (torch.arange(width, device=device) < lengths[:, None]).long()
    return Rollout(prompt_ids.repeat_interleave(group_size, 0), prompt_mask.repeat_interleave(group_size, 0),
                   completion_ids[:, :width], completion_mask, logprobs[:, :width], finished)


def _prefill(model, prompt_ids, prompt_mask, group_size, max_new_tokens):
    """(KV cache, next-token logits, attention mask, next position) of the prompts, G rows for each."""
    cache = Cache(layer_class_to_replicate=partial(InPlaceLayer, max_new_tokens))
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions_from_mask(prompt_mask),
                cache=cache, use_cache=True, logits_to_keep=1)
    cache.batch_repeat_interleave(group_size)
    # Expand before sampling: the G rows of a prompt must draw their first tokens independently.
    logits = out.logits[:, -1].repeat_interleave(group_size, 0)
    attention_mask = prompt_mask.repeat_interleave(group_size, 0)
    return cache, logits, attention_mask, positions_from_mask(attention_mask)[:, -1] + 1


def _prompt_tokens(prompt_ids, prompt_mask, vocab_size):
    """[N, vocab] bool, True where the token is in the prompt; padding slots mark nothing."""
    counts = torch.zeros((prompt_ids.size(0), vocab_size), device=prompt_ids.device)
    return counts.scatter_add_(1, prompt_ids, prompt_mask.float()) > 0


def _draw_tokens(logits, temperature, top_k, top_p, generators, alive):
    """The next token of each alive row: the argmax at temperature 0, else a draw with that row's generator."""
    shaped = shape_logits(logits, temperature or 1.0, top_k, top_p)
    if temperature == 0:
        return shaped.argmax(-1)
    cdf = shaped.softmax(-1).cumsum(-1)
    u = torch.cat([torch.rand(1, generator=generators[r]) for r in alive.tolist()]).to(alive.device)
    # Inverse-CDF draw; right=True never lands on a zero-probability (truncated) token.
    token = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)
    return token.clamp(max=cdf.size(-1) - 1)


def _has_stop_string(tokenizer, tails, stop_strings):
    """[rows] bool, True where the text of a row of `tails` (token ids) contains a stop string."""
    texts = [tokenizer.decode(ids) for ids in tails]
    return torch.tensor([any(s in text for s in stop_strings) for text in texts], device=tails.device)


def _drop_rows(cache, done, *rows):
    """The row tensors without the `done` rows, which leave the KV cache too."""
    keep = (~done).nonzero().squeeze(-1)
    cache.batch_select_indices(keep)
    return [x[keep] for x in rows]


def _decode_step(model, cache, token, attention_mask, next_position):
    """(next-token logits, attention mask, next position) of the rows once each is fed its new token."""
    attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(token), 1)], dim=1)
    out = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=next_position[:, None],
                cache=cache, use_cache=True)
    return out.logits[:, -1], attention_mask, next_position + 1


def with_guides(rollout, guides, group_size, pad_token_id):
    """The rollout with the last completion of each group replaced by its guide, where the group has one
    (None: the group stays as drawn): token ids (ending in EOS) that did not come from the policy, such as an
    expert's answer to that prompt. Guided groups (LUFFY, arXiv 2504.14945) let a policy learn what it never
    samples: a stop it never says, a question it never asks, is still rewarded in its group, and its
    advantage says how much better it did there.

    The guide is scored and trained like a sampled row: the trainer recomputes its old log-probs, so its
    ratio starts at 1 and its gradient is A * grad log pi(guide), imitation weighted by the advantage. That
    is biased, knowingly: pi did not draw the guide, and the importance weight pi / mu of a deterministic
    expert mu is undefined. LUFFY reshapes the term as f(pi) = pi / (pi + gamma) so that improbable expert
    tokens still teach; the plain form is used here. The guide also raises its group's mean, so sampled
    answers are judged against the expert as well as each other. Its sampler log-probs are 0 (never drawn)
    and `sampled` marks it, so that sampler statistics leave it out."""
    rows = [(g + 1) * group_size - 1 for g, guide in enumerate(guides) if guide is not None]
    guides = [guide for guide in guides if guide is not None]
    width = max([rollout.completion_ids.size(1), *map(len, guides)])
    grow = width - rollout.completion_ids.size(1)
    ids = torch.nn.functional.pad(rollout.completion_ids, (0, grow), value=pad_token_id)
    mask, logprobs = (torch.nn.functional.pad(x, (0, grow)) for x in (rollout.completion_mask, rollout.logprobs))
    finished, sampled = rollout.finished.clone(), torch.ones_like(rollout.finished)
    for row, guide in zip(rows, guides, strict=True):
        ids[row] = pad_token_id
        ids[row, :len(guide)] = torch.tensor(guide)
        mask[row], logprobs[row] = 0, 0.0
        mask[row, :len(guide)] = 1
        finished[row], sampled[row] = True, False
    return Rollout(rollout.prompt_ids, rollout.prompt_mask, ids, mask, logprobs, finished, sampled)


def guide_needed(rewards, guide_rewards, group_size):
    """[N] True for the groups whose guide should join them: those where no drawn completion earned as much
    as the guide (rewards [N * G], guide_rewards [N]; NaN where missing: a missing guide never joins).

    Why not every group: where the policy already finds an answer as good as the expert's, the guide
    teaches nothing new and adds its bias, imitation of the expert's words rather than of a better answer,
    and one more push toward a decision the policy already takes. Giving the guide only where every draw
    falls short is the adaptive guidance of Guide-GRPO (Nath et al., arXiv 2506.13923), there with hints,
    here with the expert's turn. A guide is graded like a draw, so it counts toward the judge's missing
    fraction (train.max_missing_fraction), and an HTTP judge gets one more request per group."""
    best = rewards.nan_to_num(nan=float("-inf")).view(-1, group_size).amax(dim=1)
    return guide_rewards > best


def token_logprobs(model, input_ids, attention_mask, n_completion, temperature=1.0, chunk_tokens=2048):
    """Teacher-forced log-probs and entropies of the last `n_completion` tokens of each row: ([B, T], [B, T]),
    under the tempered, untruncated policy softmax(logits / temperature) (why untruncated: shape_logits).

    The logits at position t predict token t + 1, so the completion's T tokens are scored by the hidden
    states at positions L - T - 1 ... L - 2.
    """
    targets = input_ids[:, -n_completion:]
    return _scored_forward(model, targets, temperature, chunk_tokens, lambda h: h[:, :-1], input_ids=input_ids,
                           attention_mask=attention_mask, position_ids=positions_from_mask(attention_mask),
                           use_cache=False, logits_to_keep=n_completion + 1)


class PromptKV(DynamicLayer):
    """One layer's keys and values in the shared-prompt passes, kept so that the layer's forward is a pure
    function of its inputs: run again in the backward (activation checkpointing, recomputed_layers), it
    gives what it gave the first time, and the gradient still reaches the prompt pass.

    In the prompt pass (prompt None) the first call keeps the layer's keys and values, and a
    recomputation keeps nothing. In the answer pass (prompt: the prompt pass's keys and values) a call
    returns each row's prompt, prompt[rows] (all the prompts, packed, when rows is None), then the rows'
    own keys and values, and keeps nothing. The rows are picked inside the layer, so under checkpointing
    the G copies of a prompt's keys and values exist for one layer at a time."""

    def __init__(self, prompt=None, rows=None):
        super().__init__()
        self.prompt, self.rows = prompt, rows
        if prompt is not None:
            self.lazy_initialization(*prompt)
            self.keys, self.values = prompt

    def update(self, key_states, value_states, *args, **kwargs):
        if self.prompt is None:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self.keys, self.values = key_states, value_states
            return key_states, value_states
        keys, values = self.prompt if self.rows is None else (x[self.rows] for x in self.prompt)
        return torch.cat([keys, key_states], -2), torch.cat([values, value_states], -2)


def answer_cache(prompt_cache, rows=None):
    """The answer pass's cache, reading the prompt pass's (PromptKV)."""
    return Cache(layers=[PromptKV((layer.keys, layer.values), rows) for layer in prompt_cache.layers])


@contextmanager
def recomputed_layers(model):
    """Per-layer activation checkpointing of the forwards run in this block: each decoder layer keeps its
    input for the backward and runs again there for the rest (torch's non-reentrant checkpoint), as
    torchtitan and TRL checkpoint. It costs one more forward of the layers (about a third more FLOPs) and
    frees their activations.

    Transformers' own checkpointing switches the KV cache off, which the shared-prompt passes need. This
    one leaves the layer's arguments alone, cache included, and PromptKV makes the layer's forward pure.
    Under FSDP2 the checkpoint sits inside the layer's forward hooks, so the layer's weights are gathered
    for its backward before the recomputation needs them."""
    def run(forward, attention, *args, **kwargs):
        with attention_as(model, attention):
            return forward(*args, **kwargs)

    def checkpointed(forward, *args, **kwargs):
        # The recomputation runs after the forward's `with attention_as(...)` has ended (the packed path's):
        # the attention the layer ran with goes along as an argument, and it runs with that again.
        return checkpoint(run, forward, model.config._attn_implementation, *args, use_reentrant=False, **kwargs)

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.forward = partial(checkpointed, layer.forward)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def _prompt_pass(model, **inputs):
    """The prompt's forward of the shared and packed paths: its keys and values (PromptKV), and the hidden
    states that reach the LM head, which projects none of them (no prompt token is scored)."""
    kept, cache = {}, Cache(layer_class_to_replicate=PromptKV)

    def keep(module, args):
        kept["h"] = args[0]
        return (args[0][:, :0],)

    handle = model.get_output_embeddings().register_forward_pre_hook(keep)
    try:
        model(cache=cache, use_cache=True, **inputs)
    finally:
        handle.remove()
    return cache, kept["h"]


def shared_prompt_logprobs(model, prompt_ids, prompt_mask, prompt_of_row, completion_ids, completion_mask,
                           temperature=1.0, chunk_tokens=2048):
    """token_logprobs of the rows [prompt_ids[prompt_of_row[r]], completion_ids[r]], each prompt run once.

    A Learn-to-Ask row is a long consultation and a short answer, and the G answers of a group share
    their prompt: scoring full rows runs the prompt G times, forward and backward. Here each distinct
    prompt (prompt_ids: [N, P], left-padded) goes through the model once; its KV cache is then indexed
    out to its rows inside each layer (PromptKV, a differentiable gather), and the completions ([B, T],
    right-padded) run as a second forward that attends to it, exactly like the sampler's decode. The gradients of all rows flow
    back through the gathered keys and values into the one prompt pass. The prompt's last hidden state
    scores each row's first token. Equal to token_logprobs on the full rows up to float error (tested),
    also under recomputed_layers.
    """
    cache, last = _prompt_pass(model, input_ids=prompt_ids, attention_mask=prompt_mask,
                               position_ids=positions_from_mask(prompt_mask), logits_to_keep=1)
    row_prompt_mask = prompt_mask[prompt_of_row]
    # Positions continue from each prompt's real length; the mask spans the padded prompt, then the answer.
    positions = row_prompt_mask.sum(-1, keepdim=True) + torch.arange(completion_ids.size(1), device=prompt_ids.device)
    first = last[prompt_of_row]
    return _scored_forward(model, completion_ids, temperature, chunk_tokens, lambda h: torch.cat([first, h[:, :-1]], 1),
                           input_ids=completion_ids, attention_mask=torch.cat([row_prompt_mask, completion_mask], 1),
                           position_ids=positions, cache=answer_cache(cache, prompt_of_row),
                           use_cache=True, logits_to_keep=completion_ids.size(1))


@dataclass
class Packing:
    """Where each segment of a packed row lies: its queries at cu_q[s]:cu_q[s+1], its keys (after
    key_index picks them out of the layer's keys, or all of them in order when None) at cu_k[s]:cu_k[s+1]."""
    cu_q: list[int]
    cu_k: list[int]
    key_index: torch.Tensor | None = None


def packed_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, packing=None, **kwargs):
    """Attention over one packed row ([1, heads, length, dim]): each segment's queries attend causally to
    its own keys, aligned at the end, so a segment with fewer queries than keys continues what they hold
    (a completion after its prompt). FlashAttention's variable-length kernel where it runs (CUDA with
    flash-attn installed); elsewhere one SDPA call per segment. On a CPU that is slower than the padded
    batch for a group's many short answers, and faster for prompts of unequal lengths (the warm start's:
    benchmarks/warm_start.py); everywhere it lets the packed path be tested against the padded one."""
    # Plain causal attention only: ignoring a window (Mistral, Qwen2, Gemma2), a soft cap (Gemma2), sinks
    # (gpt-oss) or dropout would give such a model wrong log-probs without a word. None means not used.
    asked = [name for name in ("sliding_window", "softcap", "s_aux") if kwargs.get(name) is not None]
    asked += ["dropout"] if dropout > 0 else []
    if asked:
        raise ValueError(f"the packed attention does not implement {', '.join(asked)}, which this model passes: "
                         "score it on the padded shared-prompt path (grpo.shared_prompt_logprobs), which keeps the "
                         "model's own attention; l2a takes that path when FlashAttention is not installed "
                         "(pip uninstall flash-attn)")
    if packing.key_index is not None:
        key, value = key[:, :, packing.key_index], value[:, :, packing.key_index]
    if query.is_cuda and importlib.util.find_spec("flash_attn") is not None:
        from flash_attn import flash_attn_varlen_func
        cu_q, cu_k = (torch.tensor(cu, dtype=torch.int32, device=query.device) for cu in (packing.cu_q, packing.cu_k))
        longest_q, longest_k = (max(b - a for a, b in zip(cu, cu[1:])) for cu in (packing.cu_q, packing.cu_k))
        out = flash_attn_varlen_func(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                                     cu_q, cu_k, longest_q, longest_k, softmax_scale=scaling, causal=True)
        return out[None], None
    outs = []
    for (q0, q1), (k0, k1) in zip(zip(packing.cu_q, packing.cu_q[1:]), zip(packing.cu_k, packing.cu_k[1:])):
        visible = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool, device=query.device).tril(k1 - k0 - (q1 - q0))
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            query[:, :, q0:q1], key[:, :, k0:k1], value[:, :, k0:k1], attn_mask=visible, scale=scaling,
            enable_gqa=True))
    return torch.cat(outs, 2).transpose(1, 2), None


# Not a mask function: Transformers then builds no [L, L] mask for it, which packing makes needless.
AttentionInterface.register("l2a_packed", packed_attention)


@contextmanager
def attention_as(model, implementation):
    config, before = model.config, model.config._attn_implementation
    config._attn_implementation = implementation
    try:
        yield
    finally:
        config._attn_implementation = before


def packed_prompt_logprobs(model, prompt_ids, prompt_mask, prompt_of_row, completion_ids, completion_mask,
                           temperature=1.0, chunk_tokens=2048):
    """shared_prompt_logprobs without padding: the same arguments and results (0 at padding).

    Rows of different lengths padded to the longest spend the padding's share of every matmul; on a GPU
    with FlashAttention that is pure waste. Here the prompts run back to back as one row, each attending
    only to itself (positions restart per prompt), and then the completions, each attending to its
    prompt's keys and values (gathered from that pass, so gradients flow back as in the padded path) and
    to its own. Equal to the padded path up to float error (tested); used where FlashAttention is.
    """
    device = prompt_ids.device
    in_prompt, in_completion = prompt_mask.bool(), completion_mask.bool()
    prompt_len, completion_len = prompt_mask.sum(1), completion_mask.sum(1)
    cu_p, cu_c = ([0] + lengths.cumsum(0).tolist() for lengths in (prompt_len, completion_len))
    with attention_as(model, "l2a_packed"):
        cache, hidden = _prompt_pass(model, input_ids=prompt_ids[in_prompt][None], logits_to_keep=0,
                                     position_ids=positions_from_mask(prompt_mask)[in_prompt][None],
                                     packing=Packing(cu_p, cu_p))
    prompt_last = hidden[0, torch.tensor(cu_p[1:], device=device) - 1]  # [N, hidden]
    # Row r's keys: its prompt's, from the prompt pass, then its own, which land behind all the prompts'.
    rows = list(enumerate(prompt_of_row.tolist()))
    key_index = torch.cat([torch.cat([torch.arange(cu_p[p], cu_p[p + 1]), cu_p[-1] + torch.arange(cu_c[r], cu_c[r + 1])])
                           for r, p in rows]).to(device)
    cu_k = [0] + (prompt_len[prompt_of_row] + completion_len).cumsum(0).tolist()
    positions = prompt_len[prompt_of_row][:, None] + torch.arange(completion_ids.size(1), device=device)
    # A row's first token is scored by its prompt's last hidden state, the others by the token before them.
    n_rows, flat = len(rows), torch.arange(cu_c[-1], device=device)
    row_of = torch.arange(n_rows, device=device).repeat_interleave(completion_len)
    source = torch.where(flat == torch.tensor(cu_c[:-1], device=device)[row_of], row_of, n_rows + flat - 1)
    with attention_as(model, "l2a_packed"):
        logps, entropies = _scored_forward(
            model, completion_ids[in_completion], temperature, chunk_tokens,
            lambda h: torch.cat([prompt_last[prompt_of_row], h[0]])[source],
            input_ids=completion_ids[in_completion][None], position_ids=positions[in_completion][None],
            cache=answer_cache(cache), use_cache=True, logits_to_keep=cu_c[-1], packing=Packing(cu_c, cu_k, key_index))
    padded = torch.zeros(completion_ids.shape, dtype=logps.dtype, device=device)
    return padded.masked_scatter(in_completion, logps), padded.masked_scatter(in_completion, entropies)


def packed_row_logprobs(model, rows, scored, chunk_tokens=2048):
    """Teacher-forced log-probs of chosen tokens of whole rows (lists of token ids): rows[r]'s tokens at the
    positions scored[r], given the tokens before them, under the untempered policy; flat, in order.

    The rows run back to back as one packed row, each attending only to itself (positions restart per
    row), like packed_prompt_logprobs' prompt pass, and only the scored positions reach the output layer.
    The warm start scores a chain of a consultation's turns this way: each answer given its prompt, all of
    them in one pass over the longest prompt (l2a.chained_rows). Equal to token_logprobs row by row (tested)."""
    device = next(model.parameters()).device
    cu = [0] + torch.tensor([len(r) for r in rows]).cumsum(0).tolist()
    ids = torch.tensor([t for r in rows for t in r], device=device)
    where = torch.tensor([cu[r] + k for r, ks in enumerate(scored) for k in ks], device=device)
    positions = torch.cat([torch.arange(len(r)) for r in rows]).to(device)
    with attention_as(model, "l2a_packed"):
        logps, _ = _scored_forward(model, ids[where], 1.0, chunk_tokens, lambda h: h[0, where - 1],
                                   input_ids=ids[None], position_ids=positions[None], use_cache=False,
                                   logits_to_keep=0, packing=Packing(cu, cu))
    return logps


def prompt_sharing(model, group_size):
    """How score_rows runs the prompts: once per group instead of G times (shared_prompt_logprobs),
    and packed without padding where FlashAttention's variable-length kernel makes that pay
    (packed_prompt_logprobs); None, each row whole, when there is nothing to share."""
    if group_size == 1:
        return None
    if model.config._attn_implementation == "flash_attention_2":
        return packed_prompt_logprobs
    return shared_prompt_logprobs


def score_rows(model, result, rows, group_size, share, temperature, chunk_tokens, recompute=False):
    """Log-probs and entropies of the completions of `rows` (a slice of the rollout), trimmed to the rows'
    own longest prompt (left padding) and completion (right padding). With `share` (prompt_sharing), each
    prompt of the slice runs once for all its rows there, whole groups or not; with `recompute`, under
    recomputed_layers."""
    prompt_columns = result.prompt_mask[rows].any(0)
    width = int(result.completion_mask[rows].sum(1).max())
    completion_ids, completion_mask = result.completion_ids[rows, :width], result.completion_mask[rows, :width]
    with recomputed_layers(model) if recompute else nullcontext():
        if share:
            prompt_of_row = torch.arange(len(result.prompt_ids), device=completion_ids.device)[rows] // group_size
            first_rows = prompt_of_row.unique() * group_size
            return share(model, result.prompt_ids[first_rows][:, prompt_columns],
                         result.prompt_mask[first_rows][:, prompt_columns], prompt_of_row - prompt_of_row[0],
                         completion_ids, completion_mask, temperature, chunk_tokens)
        ids = torch.cat([result.prompt_ids[rows][:, prompt_columns], completion_ids], 1)
        mask = torch.cat([result.prompt_mask[rows][:, prompt_columns], completion_mask], 1)
        return token_logprobs(model, ids, mask, width, temperature, chunk_tokens)


def _scored_forward(model, targets, temperature, chunk_tokens, hidden_for_targets, **inputs):
    """model(**inputs) with its output layer replaced: hidden_for_targets(the hidden states that reach it)
    lines up one hidden state with each token of `targets` (any shape), which it scores. Returns log-probs
    and entropies shaped like `targets`.

    The vocabulary projection runs on chunks of `chunk_tokens` tokens, each recomputed in backward
    (activation checkpointing), so [B, T, vocab] float32 logits never exist at once. It runs inside the
    model's own forward, through hooks on the output layer, because under FSDP that is where the (possibly
    tied) output weight is gathered and where gradients are tracked.
    """
    head = model.get_output_embeddings()
    flat_targets = targets.reshape(-1)
    hidden = {}

    def take_hidden(module, args):
        hidden["h"] = args[0]
        return (args[0][:, :0],)  # the head projects nothing itself

    def project_in_chunks(module, args, output):
        h = hidden_for_targets(hidden.pop("h")).reshape(flat_targets.numel(), -1)
        logps, entropies = [], []
        for start in range(0, flat_targets.numel(), chunk_tokens):
            part = slice(start, start + chunk_tokens)
            args = (h[part], module.weight, module.bias, flat_targets[part], temperature)
            lp, ent = checkpoint(_chunk_logprobs, *args, use_reentrant=False) if torch.is_grad_enabled() \
                else _chunk_logprobs(*args)
            logps.append(lp)
            entropies.append(ent)
        return torch.cat(logps), torch.cat(entropies)  # flat: FSDP warns about view outputs

    handles = [head.register_forward_pre_hook(take_hidden), head.register_forward_hook(project_in_chunks)]
    try:
        out = model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    logps, entropies = out.logits
    return logps.view(targets.shape), entropies.view(targets.shape)


def _chunk_logprobs(h, weight, bias, targets, temperature):
    logp = (torch.nn.functional.linear(h, weight, bias).float() / temperature).log_softmax(-1)
    with torch.no_grad():  # entropy is only logged
        entropy = torch.special.entr(logp.exp()).sum(-1)
    return logp.gather(-1, targets[:, None]).squeeze(-1), entropy


def group_advantages(rewards, group_size, scale_by_std=True, eps=1e-6):
    """A_i = (r_i - mean) / (std + eps) within each group of `group_size` consecutive rewards.

    `rewards` is a float tensor with NaN for a missing reward (the judge failed). Missing rewards are left
    out of their group's statistics and get advantage 0; a group with fewer than two valid rewards has no
    baseline and gets 0 everywhere; a group whose rewards are all equal gets 0, not NaN. std is the sample
    standard deviation (n - 1), as in torch.std. scale_by_std=False drops the division (Dr. GRPO).
    """
    r = rewards.view(-1, group_size)
    valid = ~r.isnan()
    count = valid.sum(-1, keepdim=True)
    mean = torch.where(valid, r, 0.0).sum(-1, keepdim=True) / count.clamp(min=1)
    centered = torch.where(valid, r - mean, 0.0)
    advantages = centered
    if scale_by_std:
        std = ((centered ** 2).sum(-1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()
        advantages = centered / (std + eps)
    return torch.where(count >= 2, advantages, 0.0).view(-1)


def trained_rows(rewards, group_size):
    """Rows that enter the loss: a valid reward in a group with at least two valid rewards."""
    valid = ~rewards.view(-1, group_size).isnan()
    return (valid & (valid.sum(-1, keepdim=True) >= 2)).view(-1)


def loss_normalizer(mask, aggregation, max_new_tokens):
    """This batch's share of the loss denominator. Sum it over every micro-batch and rank *before* the
    backward passes, so that neither gradient accumulation nor the number of ranks changes the update.

    token      every trained token weighs the same: the global token count (longer answers weigh more)
    sequence   every sequence weighs the same: the global sequence count, each sequence its own token mean
               (biased: a long wrong answer is penalised less per token than a short one)
    constant   the global sequence count times max_new_tokens (Dr. GRPO): unbiased and length-independent
    """
    sequences = (mask.sum(-1) > 0).sum()
    if aggregation == "token":
        return mask.sum().float()
    if aggregation == "sequence":
        return sequences.float()
    if aggregation == "constant":
        return sequences.float() * max_new_tokens
    raise ValueError(f"unknown aggregation {aggregation!r}: use token, sequence or constant")


def policy_loss(logprobs, old_logprobs, advantages, mask, normalizer, aggregation="token", clip_low=0.2,
                clip_high=0.2, ref_logprobs=None, kl_coef=0.0):
    """Clipped surrogate loss of one micro-batch, already divided by the global `normalizer`
    (from `loss_normalizer`): summing it over micro-batches and ranks gives the batch loss.

    logprobs, old_logprobs, ref_logprobs, mask: [B, T]; advantages: [B]. Returns (loss, stats) where stats
    holds token sums (divide by stats["tokens"] summed the same way) of: clipped (tokens where the clip is
    active), approx_kl (k3 estimate of KL(old || new)), ref_kl (k3 estimate of KL(new || ref)).
    """
    # Padding may hold any log-prob (-1e4 from a masked logit): exp of it overflows, and inf * 0 is NaN in the
    # loss and in exp's backward. So padded positions get log-probs of 0, which send back no gradient.
    keep = mask.bool()
    logprobs, old_logprobs = (torch.where(keep, lp, 0.0) for lp in (logprobs, old_logprobs))
    if ref_logprobs is not None:
        ref_logprobs = torch.where(keep, ref_logprobs, 0.0)
    mask = mask.float()
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages[:, None]
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * advantages[:, None]
    per_token = -torch.minimum(unclipped, clipped)
    stats = {"tokens": mask.sum().item()}
    if ref_logprobs is not None:
        # k3 = exp(ref - logp) - (ref - logp) - 1 >= 0: an unbiased, low-variance estimate of KL(pi || ref)
        # on tokens sampled from pi; its gradient pulls logp toward ref.
        log_ratio = ref_logprobs - logprobs
        ref_kl = torch.exp(log_ratio) - log_ratio - 1
        per_token = per_token + kl_coef * ref_kl
        stats["ref_kl"] = (ref_kl.detach() * mask).sum().item()
    weights = mask / mask.sum(-1, keepdim=True).clamp(min=1) if aggregation == "sequence" else mask
    loss = (per_token * weights).sum() / normalizer
    with torch.no_grad():
        stats["clipped"] = ((clipped < unclipped).float() * mask).sum().item()
        stats["approx_kl"] = ((ratio - 1 - (logprobs - old_logprobs)) * mask).sum().item()
    return loss, stats
