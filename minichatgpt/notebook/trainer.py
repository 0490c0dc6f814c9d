"""``PPOTrainer``: TRL legacy's notebook-facing API over the same functions the stages use.

``step`` runs exactly the pipeline's score -> advantages -> update path
(:mod:`minichatgpt.ppo.steps`, :mod:`minichatgpt.ppo.update`), so one PPO step in a
notebook and one iteration of ``dvc repro`` give the same weights for the same
batch, seed and params. Models run where ``config.device`` says (``auto``: a GPU if there is
one, as TRL's ``Accelerator`` does) with ``config.dtype`` autocast around forward passes. ``generate``
returns token ids on the CPU, beside the dataset's queries; per-token tensors of the forward passes
live on the device.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from minichatgpt.core import RunningMoments, gae, kl_controller, kl_penalty, per_token_rewards, whiten
from minichatgpt.models.policy import PolicyWithValueHead
from minichatgpt.ppo import steps
from minichatgpt.ppo.generation import forward_responses, generate, pack
from minichatgpt.ppo.update import adam, ppo_loss, ppo_update
from minichatgpt.runtime.device import resolve

log = logging.getLogger(__name__)


def collator(rows: list[dict]) -> dict[str, list]:
    """Keep a batch as lists (queries have different lengths), as TRL's notebook does."""
    return {key: [row[key] for row in rows] for key in rows[0]}


def _ids(x: torch.Tensor | list[int]) -> list[int]:
    return x.reshape(-1).tolist() if isinstance(x, torch.Tensor) else list(x)


class PPOTrainer:
    """PPO on a policy with value head against a frozen reference (TRL legacy names)."""

    def __init__(
        self, config: Any, model: PolicyWithValueHead, ref_model: torch.nn.Module, tokenizer: Any,
        dataset: Any = None, optimizer: torch.optim.Optimizer | None = None, data_collator: Any = None,
    ):
        from accelerate import Accelerator

        self.config = config
        self.params = config.ppo_params()
        self.placement = resolve(getattr(config, "device", "auto"), getattr(config, "dtype", "float32"))
        # the device of this process (LOCAL_RANK's GPU under accelerate launch); autocast is the placement's,
        # shared with the stages, so the Accelerator keeps its default precision
        self.accelerator = Accelerator(cpu=self.placement.device.type == "cpu")
        device = self.placement.device
        self.model, self.ref_model, self.tokenizer = model.to(device), ref_model.to(device).eval(), tokenizer
        self.optimizer = optimizer or adam(list(model.parameters()), self.params.learning_rate)
        self.kl_ctl = kl_controller(self.params.adap_kl_ctrl, self.params.init_kl_coef, self.params.target,
                                    self.params.horizon)
        self.current_step = 0
        self.score_moments = RunningMoments()
        self.generator = self.placement.generator(self.params.seed)
        self.dataset = dataset
        # logprobs and values recorded while generating, keyed by (query, response), valid while
        # the weights are unchanged: step() then needs no second policy forward pass (as rollout@i)
        self._generated: dict[tuple[tuple[int, ...], tuple[int, ...]], tuple[list[float], list[float]]] = {}
        self._generated_at: tuple[int, ...] | None = None
        self.dataloader = None
        if dataset is not None:
            self.dataloader = torch.utils.data.DataLoader(
                dataset, batch_size=self.params.batch_size, shuffle=True, drop_last=True,
                collate_fn=data_collator or collator, generator=torch.Generator().manual_seed(self.params.seed),
            )

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def generate(
        self, query_tensor: torch.Tensor | list[torch.Tensor], length_sampler: Any = None,
        return_prompt: bool = True, **generation_kwargs: Any,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Sample a response (batched for a list of queries) with the trainer's seeded generator.

        ``max_new_tokens`` (or ``length_sampler()``) sets the length; ``top_k``/``top_p``
        filter the sampling distribution. Other HF ``generate`` kwargs (``do_sample``,
        ``min_length=-1``, ``pad_token_id``) are accepted for compatibility; sampling is
        always on.
        """
        single = isinstance(query_tensor, torch.Tensor) and query_tensor.dim() == 1
        queries = [_ids(query_tensor)] if single else [_ids(q) for q in query_tensor]
        lengths = [length_sampler() if length_sampler else generation_kwargs.get("max_new_tokens", 16)
                   for _ in queries]
        with self.placement.autocast():
            out = generate(
                self.model, queries, lengths, self.tokenizer.eos_token_id, self.pad_id, self.generator,
                top_k=int(generation_kwargs.get("top_k", 0) or 0), top_p=float(generation_kwargs.get("top_p", 1.0)),
            )
        version = self._weights_version()
        if version != self._generated_at:
            self._generated, self._generated_at = {}, version
        for q, r, lp, v in zip(queries, out.response_ids, out.logprobs, out.values):
            self._generated[(tuple(q), tuple(r))] = (lp, v)
        # on the CPU, beside the dataset's queries (a notebook concatenates them), wherever the model is
        rows = [torch.tensor((q if return_prompt else []) + r, device="cpu") for q, r in zip(queries, out.response_ids)]
        return rows[0].unsqueeze(0) if single else rows

    def _weights_version(self) -> tuple[int, ...]:
        """Changes whenever any parameter is modified in place (optimizer steps included)."""
        return tuple(p._version for p in self.model.parameters())

    def _step_safety_checker(
        self, batch_size: int, queries: list[torch.Tensor], responses: list[torch.Tensor], scores: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Refuse batches of the wrong size or type before any compute, naming the culprit."""
        for name, value in (("queries", queries), ("responses", responses), ("scores", scores)):
            if not isinstance(value, list):
                raise ValueError(f"{name} must be a list of tensors, got {type(value).__name__}")
            if len(value) != batch_size:
                raise ValueError(f"batch size ({batch_size}) does not match number of {name} ({len(value)})")
            for i, item in enumerate(value):
                if not isinstance(item, torch.Tensor):
                    raise ValueError(f"{name}[{i}] must be a torch.Tensor, got {type(item).__name__}")
                if name == "scores" and item.numel() != 1:
                    raise ValueError(f"scores[{i}] must be a scalar tensor, got shape {tuple(item.shape)}")
                if name != "scores" and (item.dim() != 1 or item.numel() == 0):
                    raise ValueError(f"{name}[{i}] must be a non-empty 1-D tensor, got shape {tuple(item.shape)}")
        return queries, responses, scores

    @torch.no_grad()
    def batched_forward_pass(
        self, queries: list[torch.Tensor], responses: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Per sample: response-token logprobs (policy), reference logprobs and values."""
        q, r = [_ids(x) for x in queries], [_ids(x) for x in responses]
        logprobs, ref_logprobs, values = [], [], []
        step = self.config.forward_batch_size
        for start in range(0, len(q), step):
            batch = pack(q[start : start + step], r[start : start + step], self.pad_id)
            with self.placement.autocast():
                pol = forward_responses(self.model, batch)
                ref = forward_responses(self.ref_model, batch, with_values=False)
            for i, n in enumerate(batch["response_mask"].sum(-1).long().tolist()):
                logprobs.append(pol["logprobs"][i, :n])
                values.append(pol["values"][i, :n])
                ref_logprobs.append(ref["logprobs"][i, :n])
        return logprobs, ref_logprobs, values

    def compute_rewards(
        self, scores: list[torch.Tensor], logprobs: list[torch.Tensor], ref_logprobs: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per sample ``-beta * kl`` per token plus the score at the last token."""
        if self.params.kl_penalty == "full":
            raise ValueError("kl_penalty='full' needs logits; use step(), which computes it from both models")
        rewards, non_score = [], []
        for score, lp, ref in zip(scores, logprobs, ref_logprobs):
            kl = kl_penalty(lp, ref, self.params.kl_penalty)
            r, ns = per_token_rewards(score.reshape(1).to(kl.device), kl.unsqueeze(0), self.kl_ctl.value,
                                      torch.ones_like(kl)[None])
            rewards.append(r[0])
            non_score.append(ns[0])
        return rewards, non_score

    def loss(
        self, old_logprobs: torch.Tensor, values: torch.Tensor, rewards: torch.Tensor,
        query: torch.Tensor, response: torch.Tensor, model_input: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """TRL 0.1's ``loss``: GAE on ``rewards``, whitened advantages, clipped losses.

        Tensors are ``(R,)`` for one sample or ``(B, R)`` for equal-length responses;
        ``model_input`` is ``query + response``. Returns ``(pg_loss, vf_coef * vf_loss, stats)``.
        """
        device = self.placement.device
        old_logprobs, values, rewards = (x.reshape(-1, x.shape[-1]).to(device) for x in (old_logprobs, values, rewards))
        query, response, model_input = (x.reshape(-1, x.shape[-1]) for x in (query, response, model_input))
        advantages, returns = gae(rewards, values, self.params.gamma, self.params.lam)
        advantages = whiten(advantages).detach()
        batch = pack(query.tolist(), response.tolist(), self.pad_id)
        if not torch.equal(batch["input_ids"], model_input.cpu()):
            raise ValueError("model_input must be query and response concatenated")
        with self.placement.autocast():
            out = forward_responses(self.model, batch, with_entropy=True)
        return ppo_loss(old_logprobs, values, None, out["values"], out["logprobs"], out["mask"],
                        advantages, returns.detach(), self.params, entropy=out["entropy"])

    def rollout_table(
        self, queries: list[torch.Tensor], responses: list[torch.Tensor]
    ) -> tuple[pa.Table, list[list[float]]]:
        """The rollouts artifact for a batch (policy logprobs/values) and its reference logprobs.

        Responses sampled by :meth:`generate` with the current weights reuse the logprobs and
        values recorded while generating (as the rollout stage does); others get a forward pass.
        """
        q, r = [_ids(x) for x in queries], [_ids(x) for x in responses]
        recorded = [self._generated.get((tuple(a), tuple(b))) for a, b in zip(q, r)]
        if self._generated_at == self._weights_version() and all(x is not None for x in recorded):
            logprobs = [x[0] for x in recorded]
            values = [x[1] for x in recorded]
            with self.placement.autocast():
                ref = steps.reference_logprobs(self.ref_model, q, r, self.pad_id, self.config.forward_batch_size)
            return self._table(q, r, logprobs, values), ref
        logprobs, ref_logprobs, values = self.batched_forward_pass(queries, responses)
        return (self._table(q, r, [x.tolist() for x in logprobs], [x.tolist() for x in values]),
                [x.tolist() for x in ref_logprobs])

    def _table(self, q: list[list[int]], r: list[list[int]], logprobs: list, values: list) -> pa.Table:
        floats, ints = pa.list_(pa.float32()), pa.list_(pa.int32())
        return pa.table({
            "prompt_id": pa.array(range(len(q)), pa.int64()),
            "query_ids": pa.array(q, ints), "response_ids": pa.array(r, ints),
            "query": self.tokenizer.batch_decode(q, skip_special_tokens=True),
            "response": self.tokenizer.batch_decode(r, skip_special_tokens=True),
            "logprobs": pa.array(logprobs, floats),
            "values": pa.array(values, floats),
        })

    def step(self, queries: list[torch.Tensor], responses: list[torch.Tensor], scores: list[torch.Tensor]) -> dict:
        """One PPO iteration on a batch, exactly as score@i -> advantages@i -> update@i."""
        from minichatgpt.ppo.steps import stage_seed

        self._step_safety_checker(self.params.batch_size, queries, responses, scores)
        self.model.eval()
        table, ref = self.rollout_table(queries, responses)
        raw = np.asarray([float(s) for s in scores], dtype=np.float32)
        state = {"score_moments": self.score_moments.__dict__}
        processed, moments = steps.processed_scores(table, raw, state, self.params, self.tokenizer.eos_token_id)
        kl_rows = None
        if self.params.kl_penalty == "full":
            with self.placement.autocast():
                kl_rows = steps.full_kl(self.model, self.ref_model, table["query_ids"].to_pylist(),
                                        table["response_ids"].to_pylist(), self.pad_id, self.config.forward_batch_size)
        scored = steps.score(table, raw, ref, self.kl_ctl.value, self.params.kl_penalty, processed, kl_rows)
        advantaged = steps.advantages(scored, self.params.gamma, self.params.lam, self.params.whiten_rewards)
        generator = torch.Generator().manual_seed(stage_seed(self.params.seed, "update", self.current_step + 1))
        with self.placement.autocast():
            stats = ppo_update(self.model, self.optimizer, steps.batch_from_table(advantaged), self.params,
                               generator, self.pad_id, progress=False)
        env = steps.batch_stats(advantaged)
        self.kl_ctl.value = steps.next_kl_coef(self.kl_ctl.value, env["objective/kl"], len(queries), self.params)
        self.score_moments = moments
        self.current_step += 1
        return env | stats
