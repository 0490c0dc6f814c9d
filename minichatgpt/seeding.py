"""Per-stage, per-iteration seeds derived from the seeds in params.yaml.

Its own module so that the stages whose randomness it decides can list it as a
DVC dependency: changing the derivation reruns exactly those stages.
"""

STAGE_OFFSETS = {"rollout": 1, "score": 2, "update": 3, "evaluate": 4}


def stage_seed(base: int, stage: str, iteration: int = 0) -> int:
    """A distinct, stable seed per (params seed, stage, iteration)."""
    return (base * 1_000_003 + iteration * 101 + STAGE_OFFSETS.get(stage, 0)) % (2**63)
