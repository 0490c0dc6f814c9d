"""runtime.device / runtime.dtype: resolution, where tensors are made, bfloat16 autocast, the warm worker.

No GPU is needed. Where the code must put every tensor on the model's device, the tests make
the CPU models' neighbourhood hostile: torch's default device becomes ``meta``, so any tensor
created without naming its device lands there and breaks the computation (a meta tensor has no
values); with a GPU, such a tensor would sit on the CPU beside CUDA operands. Results must
then equal those of a normal run.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from minichatgpt.models.policy import PolicyWithValueHead
from minichatgpt.params import PPOParams, PretrainParams, RewardParams
from minichatgpt.ppo.generation import forward_responses, generate, pack
from minichatgpt.ppo.update import PPOBatch, adam, ppo_update
from minichatgpt.runtime import device as placement_module
from minichatgpt.runtime.device import CPU, DeviceError, Placement, resolve
from tests.conftest import ROOT

VOCAB, EOS = 60, 0
QUERIES = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10], [11, 12]]
LENGTHS = [4, 3, 6, 2, 5]


@contextlib.contextmanager
def meta_by_default() -> Iterator[None]:
    """Every tensor made without an explicit device is a meta tensor (no values) while this is active."""
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def tiny_policy(seed: int = 0) -> PolicyWithValueHead:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=16, n_positions=32, bos_token_id=EOS,
                        eos_token_id=EOS, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    return PolicyWithValueHead(GPT2LMHeadModel(config), seed=seed).eval()


class NoLogitsToKeep(GPT2LMHeadModel):
    """A causal LM without ``logits_to_keep``: forward passes take the padded path."""

    def forward(self, input_ids=None, **kwargs):
        kwargs.pop("logits_to_keep", None)
        return super().forward(input_ids=input_ids, **kwargs)


# ---- resolution --------------------------------------------------------------------------------------------


def test_the_default_is_the_cpu_in_float32_and_records_nothing() -> None:
    place = resolve()
    assert place == CPU and not place.mixed
    assert place.record() == {} and place.metrics() == {}


def test_auto_is_the_cpu_where_torch_sees_no_gpu(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve("auto") == CPU


def test_cuda_where_there_is_none_is_refused_naming_the_setting(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match=r"runtime.device='cuda:1'.*no CUDA device"):
        resolve("cuda:1")


@pytest.mark.parametrize("device, dtype, message", [
    ("gpu", "float32", "runtime.device='gpu'"), ("cuda:x", "float32", "runtime.device='cuda:x'"),
    ("cpu", "float16", "runtime.dtype='float16'"),
])
def test_values_that_name_no_placement_are_refused(device: str, dtype: str, message: str) -> None:
    with pytest.raises(DeviceError, match=message):
        resolve(device, dtype)


@pytest.fixture
def four_gpus(monkeypatch) -> list:
    """torch.cuda answering as on a machine with four GPUs (the choice of device is all that is tested)."""
    chosen: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(placement_module, "deterministic_cuda", lambda: None)
    return chosen


def test_each_launched_process_takes_the_gpu_of_its_local_rank(four_gpus: list) -> None:
    launched = {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    assert resolve("cuda", environ=launched).device == torch.device("cuda", 1)
    assert resolve("auto", "bfloat16", environ=launched) == Placement(torch.device("cuda", 1), torch.bfloat16)
    assert resolve("cuda:2", environ={}).device == torch.device("cuda", 2)
    assert four_gpus == [torch.device("cuda", 1)] * 2 + [torch.device("cuda", 2)]
    with pytest.raises(DeviceError, match="LOCAL_RANK"):
        resolve("cuda:2", environ=launched)
    with pytest.raises(DeviceError, match="cuda:4, but torch sees 4"):
        resolve("cuda:4", environ={})


@pytest.mark.parametrize("device, backend", [("cuda:1", "nccl"), ("cpu", "gloo")])
def test_launched_processes_join_over_nccl_on_gpus_and_gloo_on_cpus(monkeypatch, device: str, backend: str) -> None:
    import torch.distributed as dist

    from minichatgpt.runtime.parallel import current_world

    joined: list[str] = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(joined))
    monkeypatch.setattr(dist, "init_process_group", lambda backend: joined.append(backend))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    world = current_world(torch.device(device))
    assert joined == [backend] and (world.rank, world.size, world.device) == (1, 2, torch.device(device))


def test_a_bfloat16_placement_is_recorded() -> None:
    place = resolve("cpu", "bfloat16")
    assert place == Placement(torch.device("cpu"), torch.bfloat16)
    assert place.record() == {"device": "cpu", "device_name": "cpu", "dtype": "bfloat16"}
    assert place.metrics()["runtime/dtype"] == "bfloat16"


# ---- every tensor where the model is -----------------------------------------------------------------------


def _rollout_and_forward(policy: torch.nn.Module) -> tuple:
    out = generate(policy, QUERIES, LENGTHS, EOS, EOS, torch.Generator().manual_seed(3))
    batch = pack(QUERIES, out.response_ids, EOS)
    scored = forward_responses(policy, batch)
    lm_only = forward_responses(policy.pretrained_model, batch, with_values=False, with_logits=True)
    return (out.response_ids, out.logprobs, out.values, scored["logprobs"].tolist(), scored["values"].tolist(),
            lm_only["logprobs"].tolist(), lm_only["entropy"].tolist())


@pytest.mark.parametrize("lm_class", [GPT2LMHeadModel, NoLogitsToKeep], ids=["packed", "padded"])
def test_generation_and_forward_passes_make_every_tensor_where_the_model_is(lm_class) -> None:
    policy = tiny_policy()
    policy.pretrained_model.__class__ = lm_class
    expected = _rollout_and_forward(policy)
    with meta_by_default():
        assert _rollout_and_forward(policy) == expected


def _batch(policy: PolicyWithValueHead) -> PPOBatch:
    out = generate(policy, QUERIES, LENGTHS, EOS, EOS, torch.Generator().manual_seed(5))
    scored = forward_responses(policy, pack(QUERIES, out.response_ids, EOS))
    mask = scored["mask"]
    advantages = torch.linspace(-1, 1, mask.numel()).view_as(mask) * mask
    return PPOBatch(QUERIES, out.response_ids, scored["logprobs"].detach(), scored["values"].detach(),
                    advantages, scored["values"].detach() + 0.5 * mask, mask)


def _updated(policy: PolicyWithValueHead, batch: PPOBatch, placement: Placement = CPU) -> tuple[dict, dict]:
    params = PPOParams(batch_size=len(batch), mini_batch_size=2, ppo_epochs=2, gradient_accumulation_steps=2)
    optimizer = adam(list(policy.parameters()), 1e-2)
    with placement.autocast():
        stats = ppo_update(policy, optimizer, batch, params, torch.Generator().manual_seed(0), EOS, progress=False)
    return stats, {k: v.detach().clone() for k, v in policy.state_dict().items()}


def test_the_ppo_update_makes_every_tensor_where_the_policy_is() -> None:
    batch = _batch(tiny_policy())
    stats, weights = _updated(tiny_policy(), batch)
    policy = tiny_policy()
    with meta_by_default():
        stats_meta, weights_meta = _updated(policy, batch)
    assert stats_meta == stats
    assert all(torch.equal(weights[k], weights_meta[k]) for k in weights)


def _reward_dir(tmp_path: Path) -> Path:
    from minichatgpt.models.tokenizer import train_bpe_tokenizer
    from minichatgpt.pipeline.data import load_reviews

    tokenizer = train_bpe_tokenizer(load_reviews()["text"].to_pylist()[:200], 300)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=64))
    model.save_pretrained(tmp_path / "reward")
    tokenizer.save_pretrained(tmp_path / "reward")
    return tmp_path / "reward"


def test_reward_scoring_makes_every_tensor_where_the_model_is(tmp_path: Path) -> None:
    from minichatgpt.models.reward import RewardModel

    reward = RewardModel(_reward_dir(tmp_path), batch_size=2, device="cpu")
    texts = ["a lovely film", "the worst plot I have seen", "fine", "I laughed and cried at once"]
    expected = reward.score(texts).tolist()
    with meta_by_default():
        assert reward.score(texts).tolist() == expected


def test_supervised_training_makes_every_tensor_where_the_model_is() -> None:
    import numpy as np

    from minichatgpt.models.supervised import classifier_accuracy, pretrain_lm, train_classifier

    stream = np.random.default_rng(0).integers(1, VOCAB, 3000).astype(np.int32)
    lm_params = PretrainParams(n_positions=32, block_size=16, batch_size=4, max_steps=3)
    reward_params = RewardParams(batch_size=4, max_steps=3)
    examples, labels = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]] * 3, [0, 1, 1, 0] * 3

    def models() -> tuple:
        torch.manual_seed(0)
        clf = BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                                                       num_attention_heads=2, intermediate_size=32))
        return tiny_policy().pretrained_model.train(), clf

    def train(lm, clf) -> tuple:
        metrics = pretrain_lm(lm, stream[:2000], stream[2000:], lm_params)
        train_classifier(clf, examples, labels, 0, reward_params)
        return metrics, classifier_accuracy(clf, examples, labels, 0), [p.detach().clone() for p in clf.parameters()]

    metrics, accuracy, weights = train(*models())
    built = models()  # on the CPU, as a stage builds them
    with meta_by_default():
        metrics_meta, accuracy_meta, weights_meta = train(*built)
    assert (metrics_meta, accuracy_meta) == (metrics, accuracy)
    assert all(torch.equal(a, b) for a, b in zip(weights, weights_meta))


def test_the_notebook_trainer_makes_every_tensor_where_its_models_are() -> None:
    from minichatgpt.experiments.imdb import PPOConfig
    from minichatgpt.models.tokenizer import train_bpe_tokenizer
    from minichatgpt.notebook.trainer import PPOTrainer
    from minichatgpt.pipeline.data import load_reviews

    tokenizer = train_bpe_tokenizer(load_reviews()["text"].to_pylist()[:200], 300)
    config = PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=2, forward_batch_size=2, device="cpu")
    queries = [torch.tensor(tokenizer(t)["input_ids"]) for t in ("A lovely", "The plot", "Worst film", "I really")]

    def models() -> tuple:
        torch.manual_seed(0)
        config_lm = GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_head=2, n_embd=16, n_positions=32,
                               eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
        return PolicyWithValueHead(GPT2LMHeadModel(config_lm), seed=0), GPT2LMHeadModel(config_lm).eval()

    def step(policy, reference) -> tuple:
        trainer = PPOTrainer(config, policy, reference, tokenizer)
        responses = trainer.generate(queries, return_prompt=False, max_new_tokens=4)
        stats = trainer.step(queries, responses, [torch.tensor(float(len(r)), device="cpu") for r in responses])
        return [r.tolist() for r in responses], stats, [p.detach().clone() for p in policy.parameters()]

    responses, stats, weights = step(*models())
    built = models()
    with meta_by_default():
        responses_meta, stats_meta, weights_meta = step(*built)
    assert (responses_meta, stats_meta) == (responses, stats)
    assert all(torch.equal(a, b) for a, b in zip(weights, weights_meta))


# ---- bfloat16 ----------------------------------------------------------------------------------------------


def test_bfloat16_autocast_runs_the_forward_passes_in_bfloat16_and_keeps_float32_weights_and_adam() -> None:
    bf16 = resolve("cpu", "bfloat16")
    policy = tiny_policy()
    with bf16.autocast():
        logits, values, _ = policy(torch.tensor([[1, 2, 3]]))
    assert logits.dtype == torch.bfloat16  # the autocast is real
    batch = _batch(tiny_policy())
    stats32, weights32 = _updated(tiny_policy(), batch)
    policy = tiny_policy()
    stats16, weights16 = _updated(policy, batch, bf16)
    assert all(w.dtype == torch.float32 for w in weights16.values())
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in policy.parameters())
    assert stats16.keys() == stats32.keys()
    assert all(torch.isfinite(torch.tensor(v)) for v in stats16.values())
    moved = [k for k in weights32 if not torch.equal(weights32[k], weights16[k])]
    assert moved, "bfloat16 forward passes should change the numbers"
    # but not where the update goes: the weights move the way the float32 update moves them (six Adam
    # steps, whose sign-like updates flip on small gradients; unrelated updates would score about 0)
    start = tiny_policy().state_dict()
    delta32 = torch.cat([(weights32[k] - start[k]).reshape(-1) for k in start])
    delta16 = torch.cat([(weights16[k] - start[k]).reshape(-1) for k in start])
    assert torch.nn.functional.cosine_similarity(delta32, delta16, dim=0) > 0.6


def test_bfloat16_adam_state_stays_float32() -> None:
    batch = _batch(tiny_policy())
    policy = tiny_policy()
    params = PPOParams(batch_size=len(batch), mini_batch_size=5, ppo_epochs=1)
    optimizer = adam(list(policy.parameters()), 1e-2)
    with resolve("cpu", "bfloat16").autocast():
        ppo_update(policy, optimizer, batch, params, torch.Generator().manual_seed(0), EOS, progress=False)
    states = [s for s in optimizer.state.values() if s]
    assert states and all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.float32 for s in states)


def test_bfloat16_generation_gives_float32_logprobs_of_a_distribution() -> None:
    policy = tiny_policy()
    with resolve("cpu", "bfloat16").autocast():
        out = generate(policy, QUERIES, LENGTHS, EOS, EOS, torch.Generator().manual_seed(3))
        scored = forward_responses(policy, pack(QUERIES, out.response_ids, EOS))
    assert scored["logprobs"].dtype == torch.float32 and scored["values"].dtype == torch.float32
    flat = [x for row in out.logprobs for x in row]
    assert all(x <= 0 and x > -20 for x in flat)
    # the recorded logprobs are what a forward pass of the same (bfloat16) policy gives
    again = [x for i, row in enumerate(out.logprobs) for x in scored["logprobs"][i, : len(row)].tolist()]
    assert max(abs(a - b) for a, b in zip(flat, again)) < 0.1


# ---- the stages and the warm worker -------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_check_params_refuses_a_gpu_this_machine_lacks_before_any_stage_runs(tmp_path: Path) -> None:
    import yaml

    from tests.conftest import TINY_PARAMS, tool_env

    params = json.loads(json.dumps(TINY_PARAMS))
    params["runtime"]["device"] = "cuda"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, str(ROOT / "stages/check_params.py"), "--out", "schema.json"],
                          cwd=tmp_path, env=tool_env(), capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("stage check_params: runtime.device='cuda', but torch")
    assert not (tmp_path / "schema.json").exists()


TRIPWIRE = """
import torch, torch.cuda
calls = []
def tripwire(name, real):
    def probe(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)
    return probe
for name in ("is_available", "device_count", "init", "_lazy_init", "current_device", "set_device",
             "is_bf16_supported", "get_device_name", "get_device_properties", "synchronize"):
    setattr(torch.cuda, name, tripwire(name, getattr(torch.cuda, name)))
from minichatgpt.runtime import worker_server
worker_server.load()
server = (list(calls), torch.cuda.is_initialized())
from minichatgpt.runtime.device import resolve
resolve("auto")  # the control: a child resolving runtime.device does ask
print(repr((server, calls)))
"""


def test_the_warm_worker_server_never_touches_cuda_before_it_forks() -> None:
    """What the server runs before forking (imports, warm-up) asks torch.cuda nothing; a CUDA
    context made there would be unusable in every child, which may use the GPU."""
    proc = subprocess.run([sys.executable, "-c", TRIPWIRE], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (server_calls, initialised), all_calls = eval(proc.stdout.strip().splitlines()[-1])  # noqa: S307 - our own repr
    assert server_calls == [] and not initialised
    assert "is_available" in all_calls  # the tripwire catches a real call


@pytest.mark.slow
def test_a_bfloat16_iteration_through_the_stages_records_its_placement(pipeline_repo: Path, tmp_path: Path) -> None:
    """rollout -> score -> advantages -> update of the tiny pipeline with runtime.dtype=bfloat16; the
    CPU float32 run's checkpoint records no placement (its bytes are those from before devices)."""
    import yaml

    from minichatgpt.models.policy import load_policy
    from tests.conftest import sh

    params = yaml.safe_load((pipeline_repo / "params.yaml").read_text())
    params["runtime"]["dtype"] = "bfloat16"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    p, out = ["--params", str(tmp_path / "params.yaml")], tmp_path
    sh([sys.executable, "stages/rollout.py", *p, "--iter", "1", "--policy", "checkpoints/0",
        "--out", f"{out}/rollouts.parquet"], pipeline_repo)
    sh([sys.executable, "stages/score.py", *p, "--iter", "1", "--rollouts", f"{out}/rollouts.parquet",
        "--policy", "checkpoints/0", "--out", f"{out}/scored.parquet"], pipeline_repo)
    sh([sys.executable, "stages/advantages.py", *p, "--iter", "1", "--scored", f"{out}/scored.parquet",
        "--out", f"{out}/advantages.parquet"], pipeline_repo)
    sh([sys.executable, "stages/update.py", *p, "--iter", "1", "--policy", "checkpoints/0",
        "--advantages", f"{out}/advantages.parquet", "--out", f"{out}/ckpt", "--metrics", f"{out}/m.json"],
       pipeline_repo)
    placed = {"device": "cpu", "device_name": "cpu", "dtype": "bfloat16"}
    state = json.loads((out / "ckpt" / "state.json").read_text())
    assert {k: state[k] for k in placed} == placed and state["iteration"] == 1
    metrics = json.loads((out / "m.json").read_text())
    assert metrics["runtime/dtype"] == "bfloat16" and metrics["runtime/device"] == "cpu"
    policy, _, _ = load_policy(out / "ckpt", 0)  # verified against its SHA256SUMS, float32 weights
    assert all(p.dtype == torch.float32 for p in policy.parameters())
    default_state = json.loads((pipeline_repo / "checkpoints" / "1" / "state.json").read_text())
    assert not {"device", "dtype"} & default_state.keys()
    assert not any(k.startswith("runtime/") for k in json.loads((pipeline_repo / "metrics/iters/1.json").read_text()))
