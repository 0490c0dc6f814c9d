"""The notebook API: ``Lab`` and ``PPOTrainer`` (TRL legacy names), built on the same
step functions as the stages."""
