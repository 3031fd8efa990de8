"""The hand-written KV-cached sampler against Transformers' own generate and the trainer's log-probs."""

import contextlib

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

import grpo
from conftest import tiny_llama

PROMPTS = [[1, 5, 9, 13, 17, 21, 30], [1, 40], [1, 7, 7, 60, 3]]


def full_rows(rollout):
    return torch.cat([rollout.prompt_ids, rollout.completion_ids], 1), \
        torch.cat([rollout.prompt_mask, rollout.completion_mask], 1)


def test_greedy_matches_generate_token_for_token(model):
    rollout = grpo.sample(model, PROMPTS, group_size=1, max_new_tokens=12, eos_token_ids=[2], pad_token_id=2,
                          temperature=0)
    generated = model.generate(input_ids=rollout.prompt_ids, attention_mask=rollout.prompt_mask, do_sample=False,
                               max_new_tokens=12, eos_token_id=2, pad_token_id=2)
    expected = generated[:, rollout.prompt_ids.size(1):]
    assert torch.equal(rollout.completion_ids, expected[:, :rollout.completion_ids.size(1)])


def test_in_place_cache_layer_holds_what_dynamic_layer_holds():
    """The sampler's cache layer against Transformers' own through a prefill, a copy per group, decode
    steps and dropped rows; past its room it refuses rather than writing out of bounds."""
    from transformers.cache_utils import DynamicLayer
    torch.manual_seed(0)
    plain, in_place = DynamicLayer(), grpo.InPlaceLayer(room=2)
    prefill = torch.randn(2, 2, 3, 5, 4)
    for layer in (plain, in_place):
        layer.update(*prefill)
        layer.batch_repeat_interleave(2)
    for rows, change in [(4, lambda layer: None), (3, lambda layer: layer.batch_select_indices(torch.tensor([0, 2, 3])))]:
        step = torch.randn(2, rows, 3, 1, 4)
        for layer in (plain, in_place):
            change(layer)
            keys, values = layer.update(*step)
        assert torch.equal(keys, plain.keys) and torch.equal(values, plain.values)
        assert torch.equal(in_place.keys, plain.keys) and in_place.get_seq_length() == plain.get_seq_length()
    with pytest.raises(ValueError, match="room"):
        in_place.update(*torch.randn(2, 3, 3, 1, 4))


def test_left_padding_does_not_change_a_prompt(model):
    """A prompt batched with longer ones must give the same greedy output as alone (positions, masks)."""
    batched = grpo.sample(model, PROMPTS, 1, 10, [2], 2, temperature=0)
    for i, prompt in enumerate(PROMPTS):
        alone = grpo.sample(model, [prompt], 1, 10, [2], 2, temperature=0)
        n = int(alone.completion_mask.sum())
        assert torch.equal(batched.completion_ids[i, :n], alone.completion_ids[0, :n])


def test_sampler_logprobs_equal_trainer_logprobs():
    """Both sides score the tempered, untruncated, unpenalised policy, whatever truncation and repetition
    penalty the sampler drew with."""
    model = tiny_llama(seed=3)
    for temperature, top_k, top_p, penalty in [(1.0, 0, 1.0, 1.0), (0.7, 0, 1.0, 1.0), (1.3, 20, 0.9, 1.0),
                                               (1.0, 0, 0.95, 3.0)]:
        rollout = grpo.sample(model, PROMPTS, group_size=4, max_new_tokens=16, eos_token_ids=[2], pad_token_id=2,
                              temperature=temperature, top_k=top_k, top_p=top_p, seeds=list(range(12)),
                              repetition_penalty=penalty)
        ids, mask = full_rows(rollout)
        logps, entropy = grpo.token_logprobs(model, ids, mask, rollout.completion_ids.size(1), temperature,
                                             chunk_tokens=7)
        m = rollout.completion_mask.bool()
        assert torch.allclose(logps[m], rollout.logprobs[m], atol=1e-4)
        assert (entropy[m] >= 0).all()


def test_truncated_bf16_sampling_never_gives_the_trainer_an_impossible_token():
    """In bf16 the cached decode and the full forward differ in the last bits, enough to move a token across
    the top-k / top-p boundary; scored under a recomputed truncation it would get log-prob -inf. Both sides
    score the untruncated policy instead: finite, and equal up to bf16 noise (the sampler's old truncated
    log-probs were off by more than 0.1 here)."""
    model = tiny_llama(seed=3, vocab_size=512).to(torch.bfloat16)
    prompts = [[1 + (7 * i + j) % 500 for j in range(5 + 3 * i)] for i in range(8)]
    rollout = grpo.sample(model, prompts, group_size=8, max_new_tokens=24, eos_token_ids=[2], pad_token_id=2,
                          temperature=1.0, top_k=10, top_p=0.9, seeds=list(range(64)))
    ids, mask = full_rows(rollout)
    logps, _ = grpo.token_logprobs(model, ids, mask, rollout.completion_ids.size(1))
    m = rollout.completion_mask.bool()
    assert logps[m].isfinite().all()
    assert (logps[m] - rollout.logprobs[m]).abs().max() < 0.1  # bf16 noise, not a different distribution


def test_token_logprobs_against_full_logits(model):
    """The chunked, hook-based projection equals log_softmax of the model's ordinary logits, with gradients."""
    ids = torch.tensor([[2, 2, 1, 5, 9, 4, 8], [1, 3, 7, 11, 12, 40, 41]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    logps, _ = grpo.token_logprobs(model, ids, mask, 3, chunk_tokens=2)
    logps.sum().backward()
    chunked_grad = model.model.embed_tokens.weight.grad.clone()
    model.zero_grad()

    logits = model(input_ids=ids, attention_mask=mask, position_ids=grpo.positions_from_mask(mask)).logits
    reference = logits[:, -4:-1].log_softmax(-1).gather(-1, ids[:, -3:, None]).squeeze(-1)
    reference.sum().backward()
    assert torch.allclose(logps, reference, atol=1e-5)
    assert torch.allclose(chunked_grad, model.model.embed_tokens.weight.grad, atol=1e-5)


def shared_against_full_rows(path, recompute):
    """Score one rollout as full rows and with each prompt run once (`path`), both under recomputed_layers
    when `recompute`, rows weighted differently in the loss. Returns the largest log-prob, entropy and
    gradient differences, the largest full-row gradient, and the bytes autograd kept for each."""
    model = tiny_llama(seed=4).train()
    group_size = 3
    rollout = grpo.sample(model, PROMPTS, group_size, 10, [2], 2, temperature=1.5, seeds=list(range(9)))
    assert len(set(rollout.completion_mask.sum(1).tolist())) > 1, "rows of different lengths"
    ids, mask = full_rows(rollout)
    m = rollout.completion_mask.float()
    results = []
    for share in (False, True):
        model.zero_grad()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t), \
                grpo.recomputed_layers(model) if recompute else contextlib.nullcontext():
            if share:
                logps, entropy = path(model, rollout.prompt_ids[::group_size], rollout.prompt_mask[::group_size],
                                      torch.arange(len(ids)) // group_size, rollout.completion_ids,
                                      rollout.completion_mask, temperature=0.8, chunk_tokens=7)
            else:
                logps, entropy = grpo.token_logprobs(model, ids, mask, rollout.completion_ids.size(1), 0.8, 7)
        (logps * m * torch.linspace(-1, 1, len(ids))[:, None]).sum().backward()
        results.append((logps.detach(), entropy.detach(), {n: p.grad.clone() for n, p in model.named_parameters()},
                        sum(saved)))
    (plain_lp, plain_ent, plain_grads, plain_saved), (lp, ent, grads, shared_saved) = results
    on = m.bool()
    return {"logprob": (lp - plain_lp)[on].abs().max().item(), "entropy": (ent - plain_ent)[on].abs().max().item(),
            "grad": max((grads[n] - plain_grads[n]).abs().max().item() for n in grads),
            "grad_scale": max(g.abs().max().item() for g in plain_grads.values()), "saved": (plain_saved, shared_saved)}


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("path", [grpo.shared_prompt_logprobs, grpo.packed_prompt_logprobs])
def test_shared_prompt_logprobs_equal_full_rows(path, recompute):
    """Each prompt run once for its G rows, padded or packed, with or without the per-layer recomputation,
    gives the full rows' log-probs, entropies and gradients."""
    diff = shared_against_full_rows(path, recompute)
    assert diff["logprob"] < 1e-5 and diff["entropy"] < 1e-4 and diff["grad"] < 1e-5, diff
    assert diff["grad_scale"] > 1e-2, diff  # the gradients compared are not all ~0


def test_recomputed_layers_keep_a_fraction_of_the_activations():
    kept = {recompute: shared_against_full_rows(grpo.shared_prompt_logprobs, recompute)["saved"]
            for recompute in (False, True)}
    for plain_or_shared in (0, 1):  # what autograd keeps outside the layers' checkpoints
        assert kept[True][plain_or_shared] < 0.5 * kept[False][plain_or_shared], kept


@pytest.mark.parametrize("mutation", ["a row reads the next row's prompt", "one padding key visible"])
def test_a_broken_prompt_cache_fails_the_equality(monkeypatch, mutation):
    """The equality above can fail: the recomputed shared path with one thing wrong in how an answer
    sees its prompt is far from the full rows."""
    if mutation.startswith("a row"):
        original = grpo.answer_cache
        monkeypatch.setattr(grpo, "answer_cache", lambda cache, rows=None: original(cache, rows.roll(1)))
    else:
        original = grpo._scored_forward

        def one_more_key(*args, attention_mask, **kwargs):
            return original(*args, attention_mask=attention_mask.index_fill(1, torch.tensor([0]), 1), **kwargs)
        monkeypatch.setattr(grpo, "_scored_forward", one_more_key)
    assert shared_against_full_rows(grpo.shared_prompt_logprobs, True)["logprob"] > 1e-3


def tiny_mistral(**config):
    torch.manual_seed(5)
    return MistralForCausalLM(MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, bos_token_id=1,
                                            eos_token_id=2, pad_token_id=2, **config)).eval()


def shared_prompt_rows(model, rollout, path):
    return path(model, rollout.prompt_ids[::2], rollout.prompt_mask[::2], torch.arange(6) // 2,
                rollout.completion_ids, rollout.completion_mask)[0][rollout.completion_mask.bool()]


@pytest.mark.parametrize("config, train, argument", [({"sliding_window": 4}, False, "sliding_window"),
                                                     ({"sliding_window": None, "attention_dropout": 0.1}, True,
                                                      "dropout")])
def test_packed_path_refuses_attention_it_would_get_wrong(config, train, argument):
    """The packed attention has no window, soft cap, sinks or dropout: a model that asks for one is
    refused, not scored as if it had not asked."""
    model = tiny_mistral(**config)
    rollout = grpo.sample(model, PROMPTS, 2, 6, [2], 2, seeds=list(range(6)))
    with pytest.raises(ValueError, match=argument):
        shared_prompt_rows(model.train(train), rollout, grpo.packed_prompt_logprobs)


def test_packed_path_takes_a_mistral_without_window():
    """Mistral passes sliding_window=None when it has no window: that is plain causal attention."""
    model = tiny_mistral(sliding_window=None)
    rollout = grpo.sample(model, PROMPTS, 2, 6, [2], 2, seeds=list(range(6)))
    assert torch.allclose(shared_prompt_rows(model, rollout, grpo.packed_prompt_logprobs),
                          shared_prompt_rows(model, rollout, grpo.shared_prompt_logprobs), atol=1e-5)


def test_rows_stop_independently_and_eos_is_trained_once():
    model = tiny_llama(seed=1)
    eos = 7  # a frequent token of this random model, so that some rows end early
    rollout = grpo.sample(model, PROMPTS, group_size=4, max_new_tokens=20, eos_token_ids=[eos], pad_token_id=eos,
                          temperature=1.5, seeds=list(range(12)))
    lengths = rollout.completion_mask.sum(1)
    assert len(set(lengths.tolist())) > 1, "rows should finish at different steps"
    for row, n in zip(range(len(lengths)), lengths.tolist()):
        ids = rollout.completion_ids[row]
        hit = (ids[:n] == eos).nonzero().flatten().tolist()
        if rollout.finished[row]:
            assert hit == [n - 1], "EOS is the last trained token, exactly once, even though pad == EOS"
        else:
            assert hit == [] and n == 20
        assert (rollout.completion_mask[row, n:] == 0).all() and (rollout.logprobs[row, n:] == 0).all()
        assert (rollout.logprobs[row, :n] < 0).all()


def test_first_token_is_sampled_per_row_not_per_prompt(model):
    rollout = grpo.sample(model, [PROMPTS[0]], group_size=16, max_new_tokens=1, eos_token_ids=[2], pad_token_id=2,
                          temperature=2.0, seeds=list(range(16)))
    assert len(set(rollout.completion_ids[:, 0].tolist())) > 1


def test_rollouts_do_not_depend_on_batch_company(model):
    """Per-row seeds: a prompt's completions are the same alone or next to other prompts."""
    together = grpo.sample(model, PROMPTS, 2, 8, [2], 2, seeds=list(range(6)))
    alone = grpo.sample(model, [PROMPTS[1]], 2, 8, [2], 2, seeds=[2, 3])
    n = alone.completion_ids.size(1)
    assert torch.equal(together.completion_ids[2:4, :n], alone.completion_ids)


def test_stop_strings_end_a_row():
    class CharTokenizer:  # token id i decodes to the letter chr(97 + i % 26)
        def decode(self, ids):
            return "".join(chr(97 + i % 26) for i in ids)

    model = tiny_llama(seed=2)
    free = grpo.sample(model, [PROMPTS[0]], 1, 12, [], 2, temperature=0)
    text = CharTokenizer().decode(free.completion_ids[0].tolist())
    stop = text[3:5]
    first = text.find(stop) + len(stop)
    stopped = grpo.sample(model, [PROMPTS[0]], 1, 12, [], 2, temperature=0, stop_strings=[stop],
                          tokenizer=CharTokenizer())
    assert stopped.finished[0] and int(stopped.completion_mask.sum()) == first


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    assert torch.isinf(grpo.shape_logits(logits, top_k=2)[0, 2:]).all()
    probs = logits.softmax(-1)[0]  # 0.644, 0.237, 0.087, 0.032
    # the smallest set of top tokens whose mass reaches top_p
    assert probs[:2].sum() < 0.9 < probs[:3].sum()
    assert grpo.shape_logits(logits, top_p=0.9).isfinite()[0].tolist() == [True, True, True, False]
    assert grpo.shape_logits(logits, top_p=0.85).isfinite()[0].tolist() == [True, True, False, False]
    assert grpo.shape_logits(logits, top_p=0.5).isfinite()[0].tolist() == [True, False, False, False]
    assert torch.allclose(grpo.shape_logits(logits, temperature=2.0), logits / 2)


def test_repetition_penalty_matches_generate(model):
    for prompt in PROMPTS:  # one prompt at a time: generate marks a left-padding slot's pad id as seen
        rollout = grpo.sample(model, [prompt], 1, 12, [2], 2, temperature=0, repetition_penalty=20.0)
        generated = model.generate(input_ids=torch.tensor([prompt]), do_sample=False, max_new_tokens=12,
                                   eos_token_id=2, pad_token_id=2, repetition_penalty=20.0)
        assert torch.equal(rollout.completion_ids[0], generated[0, len(prompt):][:rollout.completion_ids.size(1)])
    plain = grpo.sample(model, PROMPTS, 1, 12, [2], 2, temperature=0)
    penalised = grpo.sample(model, PROMPTS, 1, 12, [2], 2, temperature=0, repetition_penalty=20.0)
    assert not torch.equal(penalised.completion_ids, plain.completion_ids), "the penalty must change something"


def test_repetition_penalty_does_not_depend_on_batch_company(model):
    """Padding slots mark no token as seen: a prompt's completions and their log-probs are the same alone
    or behind a longer prompt that ends in another token."""
    together = grpo.sample(model, PROMPTS, 2, 8, [2], 2, seeds=list(range(6)), repetition_penalty=3.0)
    for i, prompt in enumerate(PROMPTS):
        alone = grpo.sample(model, [prompt], 2, 8, [2], 2, seeds=[2 * i, 2 * i + 1], repetition_penalty=3.0)
        n = alone.completion_ids.size(1)
        assert torch.equal(together.completion_ids[2 * i:2 * i + 2, :n], alone.completion_ids)
        assert torch.allclose(together.logprobs[2 * i:2 * i + 2, :n], alone.logprobs, atol=1e-5)


def two_groups_of_two():
    return grpo.Rollout(prompt_ids=torch.ones(4, 3, dtype=torch.long), prompt_mask=torch.ones(4, 3, dtype=torch.long),
                        completion_ids=torch.tensor([[11, 2], [12, 2], [13, 0], [14, 2]]),
                        completion_mask=torch.tensor([[1, 1], [1, 1], [1, 0], [1, 1]]),
                        logprobs=torch.tensor([[-1.0, -2.0], [-3.0, -4.0], [-5.0, 0.0], [-6.0, -7.0]]),
                        finished=torch.tensor([True, True, False, True]))


def test_with_guides_puts_each_guide_last_in_its_group_and_marks_it_not_sampled():
    rollout = two_groups_of_two()
    guided = grpo.with_guides(rollout, [[5, 6, 2], [7, 2]], group_size=2, pad_token_id=0)
    assert guided.completion_ids.tolist() == [[11, 2, 0], [5, 6, 2], [13, 0, 0], [7, 2, 0]]
    assert guided.completion_mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert guided.logprobs.tolist() == [[-1.0, -2.0, 0.0], [0.0, 0.0, 0.0], [-5.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert guided.finished.tolist() == [True, True, False, True] and guided.sampled.tolist() == [True, False, True, False]
    assert torch.equal(guided.prompt_ids, rollout.prompt_ids) and rollout.sampled is None  # the input is unchanged


def test_with_guides_leaves_a_group_without_a_guide_as_drawn():
    rollout = two_groups_of_two()
    guided = grpo.with_guides(rollout, [None, [7, 2]], group_size=2, pad_token_id=0)
    assert guided.completion_ids.tolist() == [[11, 2], [12, 2], [13, 0], [7, 2]]
    assert guided.logprobs[:3].tolist() == rollout.logprobs[:3].tolist() and guided.logprobs[3].tolist() == [0.0, 0.0]
    assert guided.sampled.tolist() == [True, True, True, False]
    unguided = grpo.with_guides(rollout, [None, None], group_size=2, pad_token_id=0)
    assert torch.equal(unguided.completion_ids, rollout.completion_ids) and unguided.sampled.all()


def test_guide_joins_only_groups_where_no_draw_earned_as_much():
    nan = float("nan")
    rewards = torch.tensor([1.0, 3.0, 1.0, 2.0, nan, nan, 2.0, nan])  # groups of 2: best 3, 2, none, 2
    guide_rewards = torch.tensor([3.0, 2.5, 0.0, nan])
    # a tie keeps the draws; a group with no valid draw takes any valid guide; a missing guide never joins
    assert grpo.guide_needed(rewards, guide_rewards, 2).tolist() == [False, True, True, False]
