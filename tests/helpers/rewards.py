"""A reward with variance within every group (TRL's reward-function convention): the completion's length."""


def reward_length(completions, **kwargs):
    return [float(len(c)) for c in completions]
