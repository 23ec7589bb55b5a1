"""Prompt sources, reward functions and the checks of prompts against a run (the toy task is `probe_dist.toy`)."""
