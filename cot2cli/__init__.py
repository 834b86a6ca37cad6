"""cot2: an experiment runner for continuous chain-of-thought (CoT2) research."""

__version__ = "0.1.0"
