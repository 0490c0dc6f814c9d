"""Models: where they come from, tokenizers, the policy with its value head and
checkpoints, the reward model, and the supervised training of both."""
