"""The whole pipeline from a policy, reward model and dataset in local directories: the
`from_pretrained` / `load_dataset` path a Hugging Face Hub name takes, offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import torch
from safetensors.torch import load_file

from minichatgpt.models.reward import RewardModel
from minichatgpt.models.tokenizer import train_bpe_tokenizer
from minichatgpt.pipeline.data import load_reviews
from tests.conftest import TINY_PARAMS, make_pipeline_repo, sh

pytestmark = pytest.mark.e2e


def save_small_models(root: Path) -> tuple[Path, Path, Path]:
    """A GPT-2, a BERT classifier (random weights, real tokenizers) and a reviews CSV."""
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    reviews = load_reviews()
    rng = np.random.default_rng(0)
    pick = rng.choice(reviews.num_rows, size=600, replace=False)
    subset = pa.table({"text": [reviews["text"][int(i)].as_py() for i in pick],
                       "label": [reviews["label"][int(i)].as_py() for i in pick]})
    root.mkdir(parents=True)
    data = root / "reviews.csv"
    pacsv.write_csv(subset, data)

    torch.manual_seed(0)
    tokenizer = train_bpe_tokenizer(subset["text"].to_pylist(), 300)
    policy = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=2,
                                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id))
    policy.save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    classifier = BertForSequenceClassification(BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, num_labels=2, pad_token_id=tokenizer.pad_token_id))
    classifier.save_pretrained(root / "reward")
    tokenizer.save_pretrained(root / "reward")
    return root / "policy", root / "reward", data


def test_pipeline_runs_from_local_model_directories_and_dataset(tmp_path: Path) -> None:
    policy_dir, reward_dir, data = save_small_models(tmp_path / "models")
    params = json.loads(json.dumps(TINY_PARAMS))
    params["pretrain"]["model"] = str(policy_dir)
    params["reward"]["model"] = str(reward_dir)
    params["data"]["dataset"] = str(data)
    params["data"]["max_reviews"] = 0
    repo = make_pipeline_repo(tmp_path / "repo", params)
    sh(["dvc", "repro"], repo)

    assert json.loads((repo / "checkpoints/0/source.json").read_text()) == {"model": str(policy_dir)}
    assert json.loads((repo / "models/reward/source.json").read_text()) == {"model": str(reward_dir)}
    import pyarrow.parquet as pq

    corpus = pq.read_table(repo / "data/corpus.parquet")
    assert corpus.num_rows == 600
    # PPO moved the local policy's weights
    start = load_file(policy_dir / "model.safetensors")
    final = load_file(repo / "checkpoints/2/model.safetensors")
    assert any(not torch.equal(start[k], final[k]) for k in start)
    scored = pq.read_table(repo / "runs/scored/1.parquet")
    texts = [q + r for q, r in zip(scored["query"].to_pylist(), scored["response"].to_pylist())]
    expected = RewardModel(reward_dir).score(texts)
    np.testing.assert_allclose(scored["score"].to_numpy(), expected, rtol=1e-5, atol=1e-6)
    summary = json.loads((repo / "metrics/summary.json").read_text())
    assert np.isfinite(summary["reward_after"]) and summary["n_prompts"] == params["data"]["eval_prompts"]


def test_example_custom_reward_loads_as_module_function() -> None:
    reward = RewardModel("examples.lexicon_reward:score")
    scores = reward.score(["a great and fun film", "boring, bad and awful"])
    assert scores[0] > 0 > scores[1]
    assert reward(["great"])[0][1]["score"] == pytest.approx(10.0)
