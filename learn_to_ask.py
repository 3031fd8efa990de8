"""Learn-to-Ask as a task of the trainer (config: task.name = "learn_to_ask", the default): what l2a.py
needs to know about it, and where each piece lives. A task is any module with these names;
examples/clarify/task.py is a second one, written to be copied.

    load_samples(path)            the samples of a data file, each with a "cid"       (preprocess.py)
    messages(sample)              the chat the policy answers                          (preprocess.py)
    make_reward(cfg)              reward_fn(samples, responses) -> [{"reward": ...}]   (judge.py)
    rollout_metrics(sample, score)  the evaluation's metrics of one graded answer      (judge.py)
    CURVES                        the task's panels in curves.png
    demonstration(sample)         an expert's answer: the warm start's target, a guide in each GRPO
                                  group and the "expert" reference row (optional)
    constant_candidates(samples)  answers that read nothing, for the "constant" reference row (optional)
    stratum(sample)               the kind of prompt, which train.strata weighs (optional)
"""

import judge
import preprocess

load_samples = preprocess.load_samples
messages = preprocess.policy_messages
rollout_metrics = judge.rollout_metrics
constant_candidates = judge.constant_candidates


def make_reward(cfg):
    """The judge of the config's [judge] section."""
    return judge.make_reward_fn(cfg["judge"])


def demonstration(sample):
    """The pharmacist's next turn verbatim, or <stop /> where they stopped (None where the log lacks it)."""
    return sample.get("expert_turn")


def stratum(sample):
    """The expert's decision: stop and continue prompts, weighed in GRPO's draws by train.strata."""
    return sample["decision_truth"]


CURVES = [  # (panel title, metrics.jsonl keys)
    ("reward", ["reward_mean", "eval_total_reward"]),
    ("reward components (smoothed)", ["reward_action", "reward_content", "reward_format"]),
    ("test decision accuracy", ["eval_total_decision_accuracy", "eval_stop_decision_accuracy",
                                "eval_continue_decision_accuracy"]),
]
