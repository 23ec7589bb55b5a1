"""probe_dist: entropy probe for RL fine-tuning checkpoints."""
__version__ = "0.1.0"
