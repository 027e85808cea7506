"""uapt: experiment orchestration for token-level uncertainty-aware LM post-training."""

__version__ = "0.1.0"
