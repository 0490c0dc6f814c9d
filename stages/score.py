"""Score rollouts with the reward model and add reference logprobs, per-token KL and
per-token rewards with this iteration's KL coefficient (score@i)."""

from minichatgpt.pipeline.inputs import parser, stage_params
from minichatgpt.runtime.stage import run


def main() -> dict:
    p = parser("score", __doc__)
    p.add_argument("--iter", type=int, required=True)
    p.add_argument("--rollouts", required=True)
    p.add_argument("--reference", default="checkpoints/0", help="reference policy checkpoint")
    p.add_argument("--policy", required=True,
                   help="checkpoint that generated the rollouts (KL coefficient, score moments, 'full' KL)")
    p.add_argument("--reward", default="models/reward")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    import json
    from pathlib import Path

    import numpy as np

    from minichatgpt.params import section
    from minichatgpt.pipeline.artifacts import read_table, write_table
    from minichatgpt.runtime.stage import setup_torch

    raw = stage_params(args)
    ppo, gen, runtime = section(raw, "ppo"), section(raw, "generation"), section(raw, "runtime")
    reward_model = section(raw, "reward").model
    rollouts = read_table(args.rollouts, "rollouts")
    state_file = Path(args.policy) / "state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"{state_file}: missing; {args.policy} is not a finished checkpoint")
    state = json.loads(state_file.read_text())
    setup_torch(runtime.threads)

    from minichatgpt.models.policy import load_causal_lm, source_of
    from minichatgpt.models.reward import RewardModel, is_function_ref
    from minichatgpt.models.tokenizer import load_tokenizer
    from minichatgpt.ppo.steps import (
        batch_stats,
        current_kl_coef,
        full_kl,
        processed_scores,
        reference_logprobs,
        score,
    )
    from minichatgpt.runtime.device import resolve

    place = resolve(runtime.device, runtime.dtype)
    # a module:function reward runs because params.yaml names it; --reward is only ever weights
    reward = RewardModel(reward_model if is_function_ref(reward_model) else args.reward,
                         batch_size=gen.forward_batch_size, device=place.device)
    texts = [q + r for q, r in zip(rollouts["query"].to_pylist(), rollouts["response"].to_pylist())]
    reference = load_causal_lm(args.reference).to(place.device)
    tokenizer = load_tokenizer(source_of(Path(args.reference)))
    queries, responses = rollouts["query_ids"].to_pylist(), rollouts["response_ids"].to_pylist()
    kl_rows = None
    with place.autocast():
        scores = np.asarray(reward.score(texts), dtype=np.float32)
        ref = reference_logprobs(reference, queries, responses, tokenizer.pad_token_id, gen.forward_batch_size)
        if ppo.kl_penalty == "full":
            policy = load_causal_lm(args.policy).to(place.device)
            kl_rows = full_kl(policy, reference, queries, responses, tokenizer.pad_token_id, gen.forward_batch_size)
    processed, _ = processed_scores(rollouts, scores, state, ppo, tokenizer.eos_token_id)
    table = score(rollouts, scores, ref, current_kl_coef(state, ppo), ppo.kl_penalty, processed, kl_rows)
    write_table(table, args.out, "scored")
    return {"iter": args.iter} | batch_stats(table)


if __name__ == "__main__":
    run("score", main)
