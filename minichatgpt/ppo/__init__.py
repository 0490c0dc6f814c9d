"""One PPO iteration, shared by the DVC stages and the notebook API: generation, the
per-phase step functions on Arrow tables, and the PPO update. The tensor math is in
:mod:`minichatgpt.core`."""
