"""PPO epochs over minibatches of one iteration's batch; writes the next checkpoint with
optimizer and KL-controller state, and this iteration's metrics (update@i)."""

from minichatgpt.pipeline.inputs import parser, stage_params
from minichatgpt.runtime.stage import run


def main() -> dict:
    p = parser("update", __doc__)
    p.add_argument("--iter", type=int, required=True)
    p.add_argument("--policy", required=True, help="checkpoint directory of the previous iteration")
    p.add_argument("--advantages", required=True)
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--metrics", required=True, help="output metrics JSON of this iteration")
    args = p.parse_args()

    import logging
    import time

    from minichatgpt.params import section
    from minichatgpt.pipeline.artifacts import atomic_path, read_table, write_json
    from minichatgpt.ppo.steps import stage_seed
    from minichatgpt.runtime.stage import setup_torch

    raw = stage_params(args)
    ppo, runtime, lora = section(raw, "ppo"), section(raw, "runtime"), section(raw, "lora")
    table = read_table(args.advantages, "advantages")
    if table.num_rows != ppo.batch_size:
        raise ValueError(f"{args.advantages}: {table.num_rows} rows but ppo.batch_size={ppo.batch_size}")
    setup_torch(runtime.threads)

    from pathlib import Path

    import torch

    from minichatgpt.models.policy import add_lora, load_optimizer_state, load_policy, save_policy
    from minichatgpt.models.sources import ModelError
    from minichatgpt.ppo.steps import batch_from_table, batch_stats, current_kl_coef, next_kl_coef, processed_scores
    from minichatgpt.ppo.update import adam, ppo_update
    from minichatgpt.runtime.device import resolve
    from minichatgpt.runtime.parallel import current_world

    place = resolve(runtime.device, runtime.dtype)
    world = current_world(place.device)

    policy, tokenizer, state = load_policy(args.policy, ppo.seed, trainable=True)
    adapters = getattr(policy.pretrained_model, "peft_config", None)
    if adapters is None and lora.r:
        add_lora(policy, lora.r, lora.alpha, lora.dropout, lora.modules(), stage_seed(ppo.seed, "lora", args.iter))
    elif adapters is not None and adapters["default"].r != lora.r:
        raise ModelError(f"{args.policy}: holds LoRA adapters of rank {adapters['default'].r} but lora.r={lora.r}; "
                         "start a new chain from checkpoints/0 to change it")
    policy.to(place.device)  # after the adapters: their initial weights are drawn on the CPU
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = adam(trainable, ppo.learning_rate)
    load_optimizer_state(optimizer, Path(args.policy))
    generator = torch.Generator().manual_seed(stage_seed(ppo.seed, "update", args.iter))  # minibatch order
    optimize_start = time.perf_counter()
    with place.autocast():
        stats = ppo_update(policy, optimizer, batch_from_table(table), ppo, generator, tokenizer.pad_token_id,
                           world=world)
    if not world.is_main:  # every process took the same step; process 0 writes the checkpoint
        return {"iter": args.iter, "rank": world.rank}
    optimize_s = time.perf_counter() - optimize_start
    env = batch_stats(table)
    kl_coef = next_kl_coef(current_kl_coef(state, ppo), env["objective/kl"], table.num_rows, ppo)
    step = int(state.get("step", 0)) + int(stats["ppo/minibatches"])
    raw_scores = table["score"].to_numpy()
    _, moments = processed_scores(table, raw_scores, state, ppo, tokenizer.eos_token_id)
    new_state = {"iteration": args.iter, "kl_coef": kl_coef, "step": step, "score_moments": moments.__dict__}
    new_state |= place.record()  # where this step ran (nothing for the CPU float32 default)
    with atomic_path(args.out) as tmp:
        save_policy(tmp, policy, tokenizer, optimizer, new_state)
    # seconds go to the log, not the metrics: an output holds only what code, params and inputs decide
    logging.getLogger("minichatgpt").info("optimize step %.2fs", optimize_s)
    stats["ppo/trainable_parameters"] = float(sum(p.numel() for p in trainable))
    metrics = {"iter": args.iter} | env | stats | {"objective/kl_coef_next": kl_coef}
    metrics |= place.metrics()
    write_json(metrics, args.metrics)
    return {k: metrics[k] for k in ("iter", "env/reward_mean", "objective/kl", "objective/kl_coef", "policy/clipfrac")}


if __name__ == "__main__":
    run("update", main)
