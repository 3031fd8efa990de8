"""A training run with a learnable toy reward, for the tests:
`python|torchrun toy_run.py CONFIG [--resume] [--inf-reward | --slow-reward[=SECONDS]] [--guided]`.

The toy task is the demo's prompts with the share of vowels in the response as its reward: a tiny random
model can raise it within a few steps, and it needs no judge. --inf-reward makes one reward of each
batch infinite, a broken reward function. --slow-reward takes 1.5 s (or SECONDS) per batch, as a remote judge
may: a step or an evaluation then outlasts a signal. --guided gives the task demonstrations for guided groups
(vowel_guide).
"""

import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoint  # noqa: E402
import l2a  # noqa: E402
import learn_to_ask  # noqa: E402
import preprocess  # noqa: E402
from config import load_config  # noqa: E402


def vowel_share(samples, responses):
    return [{"reward": sum(c in "aeiou" for c in r) / max(len(r), 1), "length_chars": float(len(r))}
            for r in responses]


def one_infinite(samples, responses):
    return [{"reward": float("inf")}] + vowel_share(samples, responses)[1:]


def slowly(seconds):
    def reward(samples, responses):
        time.sleep(seconds)
        return vowel_share(samples, responses)
    return reward


def vowel_guide(sample):
    """All vowels (reward 1, which no draw of a random model reaches) or none (0, which every draw reaches),
    by the parity of the sample's turn, so that a run meets groups of both kinds."""
    return "aeiou" if int(sample["cid"].split("_")[-1]) % 2 else "xyz"


def toy_task(reward=vowel_share):
    """A task as l2a.load_task returns one: the demo's samples and prompts, this reward, the defaults."""
    return SimpleNamespace(**{**l2a.OPTIONAL, "load_samples": preprocess.load_samples,
                              "messages": preprocess.policy_messages, "make_reward": lambda cfg: reward,
                              "stratum": learn_to_ask.stratum})


if __name__ == "__main__":
    slow = [a.partition("=")[2] or "1.5" for a in sys.argv if a.startswith("--slow-reward")]
    reward = one_infinite if "--inf-reward" in sys.argv else slowly(float(slow[0])) if slow else vowel_share
    try:
        task = toy_task(reward)
        if "--guided" in sys.argv:
            task.demonstration = vowel_guide
        l2a.train(load_config(sys.argv[1]), resume="--resume" in sys.argv, task=task)
    except checkpoint.RunStopped as e:  # as l2a.main says it
        sys.exit(f"stopped: {e}")
    finally:
        l2a.dist.destroy_process_group()
