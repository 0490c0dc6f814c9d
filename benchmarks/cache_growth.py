"""DVC cache bytes added per PPO iteration: full fine-tuning vs LoRA adapters.

Runs the pipeline twice in scratch repositories (tiny batch, 2 iterations) from a
GPT-2-124M-sized policy (GPT2Config() defaults, random weights, saved to a local
directory: the `pretrain.model` path a Hub name takes) and measures `.dvc/cache`
before and after the iterations. Usage: python benchmarks/cache_growth.py [--out F]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import TINY_PARAMS, make_pipeline_repo, sh  # noqa: E402


def cache_bytes(repo: Path) -> int:
    return sum(p.stat().st_size for p in (repo / ".dvc" / "cache").rglob("*") if p.is_file())


def save_gpt2_124m(dest: Path) -> int:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from minichatgpt.models.tokenizer import train_bpe_tokenizer
    from minichatgpt.pipeline.data import load_reviews

    torch.manual_seed(0)
    tokenizer = train_bpe_tokenizer(load_reviews()["text"].to_pylist()[:2000], 2048)
    model = GPT2LMHeadModel(GPT2Config(eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return sum(p.numel() for p in model.parameters())


def run(mode: str, policy: Path, work: Path, iterations: int) -> dict:
    params = json.loads(json.dumps(TINY_PARAMS))
    params["pretrain"]["model"] = str(policy)
    params["runtime"]["threads"] = 2
    params["ppo"]["iterations"] = iterations
    if mode == "lora":
        params["lora"] = {"r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": "auto"}
    repo = make_pipeline_repo(work / mode, params)
    sh(["dvc", "repro", "prepare", "pretrain", "train_reward"], repo)
    before = cache_bytes(repo)
    sh(["dvc", "repro"], repo)
    added = cache_bytes(repo) - before
    ckpt = sum(p.stat().st_size for p in (repo / "checkpoints" / "1").rglob("*") if p.is_file())
    return {"cache_bytes_per_iteration": added // iterations, "checkpoint_bytes": ckpt}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "cache_growth.json"))
    p.add_argument("--iterations", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        n_params = save_gpt2_124m(work / "gpt2-124m")
        results = {"policy_parameters": n_params, "iterations": args.iterations}
        for mode in ("full", "lora"):
            results[mode] = run(mode, work / "gpt2-124m", work, args.iterations)
            print(mode, results[mode], flush=True)
    results["full_over_lora"] = round(results["full"]["cache_bytes_per_iteration"]
                                      / results["lora"]["cache_bytes_per_iteration"], 1)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
