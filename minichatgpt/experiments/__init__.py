"""Ready-made experiment configurations for the notebook API."""
