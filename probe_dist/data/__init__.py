"""Prompt sources, reward functions and the built-in toy task."""
