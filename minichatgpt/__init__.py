"""minichatgpt: reproducible RLHF with PPO as a DVC pipeline.

Heavy imports are lazy so that stages needing only pyarrow/numpy start fast.
"""

__version__ = "0.1.0"
