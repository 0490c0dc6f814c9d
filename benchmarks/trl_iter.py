"""TRL 0.11.4 legacy ``PPOTrainer`` on a prepared workload. Runs in the TRL virtualenv
(``benchmarks/_work/trl-venv``: trl==0.11.4 transformers==4.45.2 accelerate==0.34.2),
so it must not import minichatgpt (that needs transformers 5).

    python benchmarks/trl_iter.py WORKLOAD.json   # then JSON commands on stdin

The workload (written by ``benchmarks/bench.py`` or ``benchmarks/learning.py``) names the
policy checkpoint, reward model, the initial value-head weights, the PPO settings and,
per run, the query token ids and response lengths of every iteration. ``mode: speed``
times each iteration (generate, score, step); ``mode: learning`` also saves the policy
after every iteration so the same evaluator can judge TRL and minichatgpt.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

import torch  # noqa: E402


def load_tokenizer(path: Path):
    """transformers 5 saves ``tokenizer_class: TokenizersBackend``, unknown to 4.45: load tokenizer.json."""
    from transformers import PreTrainedTokenizerFast

    cfg = json.loads((path / "tokenizer_config.json").read_text())
    special = {k: cfg[k] for k in ("eos_token", "pad_token", "unk_token", "cls_token") if isinstance(cfg.get(k), str)}
    tok = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), **special)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


class Reward:
    """Positive-class logit of the sequence classifier, batched (what sent_kwargs asks of the pipeline)."""

    def __init__(self, path: Path, batch_size: int, device: str = "cpu"):
        from transformers import AutoModelForSequenceClassification

        self.tok = load_tokenizer(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(str(path), torch_dtype=torch.float32).eval()
        self.device = torch.device(device)
        self.model.to(self.device)
        self.max_length = min(self.model.config.max_position_embeddings, 512)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> list[float]:
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tok(texts[i : i + self.batch_size], padding=True, truncation=True,
                           max_length=self.max_length, return_tensors="pt").to(self.device)
            out += self.model(**enc).logits[:, 1].float().tolist()
        return out


def build(work: dict, batch_size: int):
    from safetensors.torch import load_file
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer, create_reference_model

    ppo = work["ppo"]
    config = PPOConfig(
        model_name=work["policy"], learning_rate=ppo["learning_rate"], batch_size=batch_size,
        mini_batch_size=ppo["mini_batch_size"], ppo_epochs=ppo["ppo_epochs"],
        gradient_accumulation_steps=ppo["gradient_accumulation_steps"], init_kl_coef=ppo["init_kl_coef"],
        adap_kl_ctrl=ppo["adap_kl_ctrl"], target=ppo["target"], horizon=ppo["horizon"], gamma=ppo["gamma"],
        lam=ppo["lam"], cliprange=ppo["cliprange"], cliprange_value=ppo["cliprange_value"],
        vf_coef=ppo["vf_coef"], kl_penalty=ppo["kl_penalty"], ratio_threshold=ppo["ratio_threshold"],
        max_grad_norm=ppo["max_grad_norm"] or None, whiten_rewards=ppo["whiten_rewards"],
        seed=ppo["seed"], exp_name="bench", log_with=None,
    )
    # summary_dropout_prob=0: minichatgpt's value head has no dropout (TRL defaults to 0.1,
    # active in TRL's train mode); with it the two would not be the same model.
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        work["policy"], torch_dtype=torch.float32, summary_dropout_prob=0.0)
    head = load_file(work["value_head"])  # minichatgpt's seeded initial value head: same weights both sides
    model.v_head.summary.load_state_dict({"weight": head["weight"], "bias": head["bias"]})
    ref = create_reference_model(model)
    tokenizer = load_tokenizer(Path(work["policy"]))
    trainer = PPOTrainer(config, model, ref, tokenizer)
    return trainer, tokenizer


class Runner:
    """One contender for one run (batch size): ``step(spec)`` does one timed iteration."""

    def __init__(self, work: dict, run_spec: dict):
        torch.set_num_threads(work["threads"])
        t0 = time.perf_counter()
        import trl  # noqa: F401

        self.import_s = time.perf_counter() - t0
        self.reward = Reward(Path(work["reward"]), work["forward_batch_size"], work.get("device", "cpu"))
        self.gen_batch = work["forward_batch_size"]
        self.save_dir = run_spec.get("save_dir")
        self.save_at = set(run_spec.get("save_at") or [])  # iterations to save (empty: every one)
        torch.manual_seed(work["ppo"]["seed"])
        self.trainer, self.tokenizer = build(work, run_spec["batch_size"])
        self.gen_kwargs = {"min_length": -1, "top_k": 0, "top_p": 1.0, "do_sample": True,
                           "pad_token_id": self.tokenizer.eos_token_id}
        self.done = 0

    def step(self, spec: dict) -> dict:
        trainer, tokenizer = self.trainer, self.tokenizer
        queries = [torch.tensor(q, dtype=torch.long) for q in spec["queries"]]
        # HF generate draws one length per generation batch; give each batch the mean of
        # the per-sample lengths minichatgpt draws, so both generate as many tokens.
        chunk_lengths = iter(spec["chunk_lengths"])
        t = time.perf_counter()
        responses = trainer.generate(queries, batch_size=self.gen_batch, return_prompt=False,
                                     length_sampler=lambda: next(chunk_lengths), **self.gen_kwargs)
        t_gen = time.perf_counter()
        texts = [tokenizer.decode(torch.cat([q, r])) for q, r in zip(queries, responses)]
        scores = [torch.tensor(s) for s in self.reward(texts)]
        t_score = time.perf_counter()
        stats = trainer.step(queries, responses, scores)
        t_step = time.perf_counter()
        self.done += 1
        if self.save_dir and (not self.save_at or self.done in self.save_at):
            save = Path(self.save_dir) / str(self.done)
            save.mkdir(parents=True, exist_ok=True)
            trainer.model.pretrained_model.save_pretrained(save, safe_serialization=True)
        gpu = {"gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20} if torch.cuda.is_initialized() else {}
        return gpu | {
            "s": t_step - t, "generate_s": t_gen - t, "score_s": t_score - t_gen, "step_s": t_step - t_score,
            "response_tokens": int(sum(len(r) for r in responses)),
            "reward_mean": float(torch.stack(scores).mean()),
            "kl": float(stats["objective/kl"]), "kl_coef": float(stats["objective/kl_coef"]),
            "trl_timing": {k: float(v) for k, v in stats.items() if k.startswith("time/")},
        }


@torch.no_grad()
def probe(runner: Runner, ids: list[int]) -> dict:
    """Policy log-softmax and value at each position, reference logits, reward: to check both sides agree."""
    x = torch.tensor([ids])
    logits, _, values = runner.trainer.model(x)
    ref_logits = runner.trainer.ref_model(x)[0]
    text = runner.tokenizer.decode(ids)
    return {"logp": torch.log_softmax(logits[0], -1).max(-1).values.tolist(), "values": values[0].tolist(),
            "ref_logp": torch.log_softmax(ref_logits[0], -1).max(-1).values.tolist(),
            "reward": runner.reward([text])[0]}


def serve(work: dict) -> None:
    """Lockstep protocol with benchmarks/bench.py: one JSON line per command on stdout."""
    from common import serve_lockstep

    runner = Runner(work, work["runs"][0])
    checked = probe(runner, work["probe_ids"]) if work.get("probe_ids") else None
    serve_lockstep(work, runner.import_s, checked, lambda spec, cmd: runner.step(spec))


if __name__ == "__main__":
    serve(json.loads(Path(sys.argv[1]).read_text()))
