"""minichatgpt's in-process ``PPOTrainer`` (the notebook API) on the same workload as
``trl_iter.py``; runs in the project's .venv.

    python benchmarks/ours_iter.py WORKLOAD.json [--profile FILE]   # then JSON commands on stdin

One iteration = ``trainer.generate`` (batched, per-sample lengths) -> reward model ->
``trainer.step`` (score, advantages, PPO update), exactly the notebook's loop.
``--profile`` writes a cProfile summary of every ``profile: true`` step.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class Runner:
    def __init__(self, work: dict, run_spec: dict):
        t0 = time.perf_counter()
        import torch

        from minichatgpt import PPOTrainer
        from minichatgpt.experiments.imdb import PPOConfig
        from minichatgpt.models.policy import load_causal_lm, load_policy
        from minichatgpt.models.reward import RewardModel

        self.import_s = time.perf_counter() - t0
        torch.set_num_threads(work["threads"])
        from minichatgpt.runtime.host import keep_freed_memory

        keep_freed_memory()  # as every stage process does (setup_torch); PPOTrainer leaves the process alone
        self.reward = RewardModel(work["reward"], batch_size=work["forward_batch_size"])
        config = PPOConfig(**work["ppo"] | {"batch_size": run_spec["batch_size"]},
                           forward_batch_size=work["forward_batch_size"])
        policy, self.tokenizer, _ = load_policy(work["policy"], work["ppo"]["seed"])
        self.trainer = PPOTrainer(config, policy, load_causal_lm(work["policy"]), self.tokenizer)
        self.save_dir = run_spec.get("save_dir")
        self.save_at = set(run_spec.get("save_at") or [])  # iterations to save (empty: every one)
        self.done = 0

    def step(self, spec: dict, profile: str | None = None) -> dict:
        import torch

        queries = [torch.tensor(q, dtype=torch.long) for q in spec["queries"]]
        lengths = iter(spec["lengths"])
        profiler = None
        if profile:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        t = time.perf_counter()
        responses = self.trainer.generate(queries, length_sampler=lambda: next(lengths), return_prompt=False)
        t_gen = time.perf_counter()
        texts = [self.tokenizer.decode(torch.cat([q, x])) for q, x in zip(queries, responses)]
        scores = [torch.tensor(out[1]["score"]) for out in self.reward(texts, function_to_apply="none")]
        t_score = time.perf_counter()
        stats = self.trainer.step(queries, responses, scores)
        t_step = time.perf_counter()
        if profiler is not None:
            import io
            import pstats

            profiler.disable()
            buf = io.StringIO()
            pstats.Stats(profiler, stream=buf).sort_stats("cumulative").print_stats(60)
            Path(profile).write_text(buf.getvalue())
        self.done += 1
        if self.save_dir and (not self.save_at or self.done in self.save_at):
            from minichatgpt.models.policy import save_policy

            save_policy(Path(self.save_dir) / str(self.done), self.trainer.model, self.tokenizer)
        return {
            "s": t_step - t, "generate_s": t_gen - t, "score_s": t_score - t_gen, "step_s": t_step - t_score,
            "response_tokens": int(sum(len(x) for x in responses)),
            "reward_mean": float(torch.stack(scores).mean()),
            "kl": float(stats["objective/kl"]), "kl_coef": float(stats["objective/kl_coef"]),
        }


def probe(runner: Runner, ids: list[int]) -> dict:
    """Policy log-softmax and value at each position, reference logits, reward: to check both sides agree."""
    import torch

    with torch.no_grad():
        x = torch.tensor([ids])
        logits, values, _ = runner.trainer.model(x)
        ref_logits = runner.trainer.ref_model(input_ids=x).logits
        text = runner.tokenizer.decode(ids)
        return {"logp": torch.log_softmax(logits[0], -1).max(-1).values.tolist(), "values": values[0].tolist(),
                "ref_logp": torch.log_softmax(ref_logits[0], -1).max(-1).values.tolist(),
                "reward": float(runner.reward.score([text])[0])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workload")
    ap.add_argument("--profile", help="cProfile summary of steps sent with profile: true")
    args = ap.parse_args()
    work = json.loads(Path(args.workload).read_text())
    from common import serve_lockstep

    runner = Runner(work, work["runs"][0])
    checked = probe(runner, work["probe_ids"]) if work.get("probe_ids") else None
    serve_lockstep(work, runner.import_s, checked,
                   lambda spec, cmd: runner.step(spec, args.profile if cmd.get("profile") else None))


if __name__ == "__main__":
    main()
