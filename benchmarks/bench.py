"""``make bench``: one PPO iteration timed three ways on the same models, prompts and PPO settings.

1. TRL 0.11.4 legacy ``PPOTrainer`` (batched generation) in its own virtualenv;
2. minichatgpt's in-process ``PPOTrainer`` (notebook API), with the CPU's own kernels (native) and
   again under the stages' portable kernel pins (``minichatgpt.hermetic.PINNED``): their ratio is
   what bit-identical results across x86-64 CPUs cost;
3. ``dvc repro`` of one more iteration (rollout, score, advantages, update: four processes, portable).

Per batch size the three run back to back (so machine load hits all alike); each reports
the median seconds per iteration after ``--warmup`` iterations. Also prints a FLOP lower
bound and writes ``benchmarks/results.json`` and the table in ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    ROOT,
    WORK,
    Worker,
    dir_bytes,
    ensure_default_models,
    iteration_inputs,
    log,
    same_model_check,
    scratch_repo,
    stop_warm_workers,
    timed_dvc_repro,
    trl_python,
    workload,
)

from minichatgpt.pipeline.iterations import stage_address  # noqa: E402

README = ROOT / "benchmarks" / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def matmul_gflops(threads: int, d: int, vocab: int, rows: int = 2048) -> float:
    """Best sustained fp32 GFLOP/s of the policy's dominant matmuls (hidden x vocab, hidden x 4 hidden)."""
    import torch

    torch.set_num_threads(threads)
    best = 0.0
    for k, n in ((d, vocab), (d, 4 * d), (4 * d, d)):
        a, b = torch.randn(rows, k), torch.randn(k, n)
        torch.mm(a, b)
        reps, t = 0, time.perf_counter()
        while time.perf_counter() - t < 0.5:
            torch.mm(a, b)
            reps += 1
        best = max(best, 2 * rows * k * n * reps / (time.perf_counter() - t) / 1e9)
    return best


def flops_per_iteration(raw: dict, batch_size: int, query_len: float, response_len: float) -> dict:
    """Matmul FLOPs one iteration cannot avoid: generation (each token once, KV cache), one
    reference forward, the reward model forward, and ppo_epochs x (forward + backward = 3 forwards).
    The vocabulary projection is only needed at the response positions."""
    from transformers import AutoConfig

    from minichatgpt.params import section

    pol = AutoConfig.from_pretrained(ROOT / "checkpoints/0")
    rew = AutoConfig.from_pretrained(ROOT / "models/reward")
    d, layers, vocab = pol.n_embd, pol.n_layer, pol.vocab_size
    tokens = query_len + response_len
    # per token: qkv + proj + mlp = 12 d^2 per layer, attention scores and values 2*T*d per layer
    body = 2 * layers * 12 * d * d + 2 * 2 * layers * tokens * d
    head = 2 * d * vocab
    policy_fwd = body * tokens + head * response_len
    dr, lr, inter = rew.hidden_size, rew.num_hidden_layers, rew.intermediate_size
    reward_tokens = tokens + 2  # [CLS] ... [SEP]-ish overhead
    reward_fwd = (2 * lr * (4 * dr * dr + 2 * dr * inter) + 2 * 2 * lr * reward_tokens * dr) * reward_tokens
    epochs = section(raw, "ppo").ppo_epochs
    per_sample = {"generate": policy_fwd, "reference_forward": policy_fwd, "reward_forward": reward_fwd,
                  "train": 3 * epochs * policy_fwd}
    return {k: v * batch_size for k, v in per_sample.items()}


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


STAGES = ("rollout", "score", "advantages", "update")
WARM_ENV = {"MINICHATGPT_WORKER_IDLE": "300", "MINICHATGPT_BENCH_RUN": str(os.getpid())}
"""Environment of the warm `dvc` contender. The contenders take turns, so two of its iterations
can be 60-90 s apart at batch 256 (the cold contender alone takes 20-30 s). With 60 s of
idle time, as before stop 12, the worker sometimes exited in between and one iteration paid
a cold start; back-to-back `dvc repro` runs get the default 300 s. The marker gives the
harness a worker of its own, stopped when the harness ends."""


def dvc_columns(prefix: str, measured: list[dict]) -> dict:
    """Median seconds per iteration and per stage, and peak stage RSS, of one dvc contender."""
    inside = {k: median([x["stage_inside_s"].get(k, 0.0) for x in measured]) for k in STAGES}
    return {
        f"{prefix}_s_per_iter": median([x["s"] for x in measured]),
        # from DVC's first "Running stage" line to its exit: the four stages as DVC runs them
        # (process start, the stage, hashing, caching, dvc.lock writes), less DVC's own start
        # and its status checks of the upstream stages
        f"{prefix}_stages_s_per_iter": median([sum(x["stages_s"].values()) for x in measured]),
        f"{prefix}_stage_s": {k: median([x["stages_s"].get(k, 0.0) for x in measured]) for k in STAGES},
        f"{prefix}_stage_peak_rss_mb": {k: max(x["stage_peak_rss_mb"].get(k, 0.0) for x in measured)
                                        for k in STAGES},
        # the stage code itself (run() to outputs fsynced); the overhead is everything else:
        # process start, DVC's own start, status checks, hashing, caching and dvc.lock writes
        f"{prefix}_stage_inside_s": inside,
        f"{prefix}_overhead_s": median([x["s"] for x in measured]) - sum(inside.values()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", default="64,128,256")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=5, help="measured iterations per batch size and contender")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for every contender (1: robust to other load on a shared machine)")
    ap.add_argument("--skip", default="", help="comma list of contenders to skip: trl,ours,portable,dvc,dvc_cold")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results.json"))
    ap.add_argument("--readme-from", help="only rewrite the README table from this results file")
    args = ap.parse_args()
    if args.readme_from:
        res = json.loads(Path(args.readme_from).read_text())
        write_readme_table(markdown_table(res["table"], res["matmul_gflops"], res.get("iterations"),
                                          res["settings"]["warmup"]))
        return
    skip = set(filter(None, args.skip.split(",")))
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    total = args.warmup + args.iters
    t_start = time.perf_counter()

    import yaml

    from minichatgpt.params import section

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    ensure_default_models()
    trl_py = trl_python() if "trl" not in skip else None
    WORK.mkdir(parents=True, exist_ok=True)
    threads = args.threads
    pol_cfg = json.loads((ROOT / "checkpoints/0/config.json").read_text())
    gflops = matmul_gflops(threads, pol_cfg["n_embd"], pol_cfg["vocab_size"])
    log(f"matmul throughput: {gflops:.1f} GFLOP/s on {threads} threads")

    rows, detail = [], {}
    for bs in sizes:
        iters = [iteration_inputs(raw, bs, i) for i in range(1, total + 1)]
        work = workload(raw, [{"batch_size": bs, "iterations": iters}], threads)
        row: dict = {"batch_size": bs}
        det: dict = {"trl": [], "ours": [], "portable": [], "dvc": []}
        workers = {}
        if "trl" not in skip:
            log(f"batch {bs}: starting TRL 0.11.4 worker")
            workers["trl"] = Worker(trl_py, "trl_iter.py", work, f"trl-{bs}")
        if "ours" not in skip:
            log(f"batch {bs}: starting minichatgpt in-process PPOTrainer worker")
            workers["ours"] = Worker(sys.executable, "ours_iter.py", work, f"ours-{bs}",
                                     ["--profile", str(WORK / f"profile-ours-{bs}.txt")])
        if "portable" not in skip:
            from minichatgpt.runtime.hermetic import PINNED

            log(f"batch {bs}: starting the same under the stages' portable kernel pins")
            pins = {k: v for k, v in PINNED.items() if k != "OMP_NUM_THREADS"}  # threads as the others
            workers["portable"] = Worker(sys.executable, "ours_iter.py", work, f"portable-{bs}", env_extra=pins)
        repo = None
        if "dvc" not in skip:
            def edit(p: dict, bs: int = bs) -> None:
                p["ppo"]["batch_size"] = bs
                p["runtime"]["threads"] = threads
                p["ppo"]["iterations"] = total

            repo = scratch_repo(f"dvc-{bs}", edit)
        contenders = [c for c in ("trl", "ours", "portable", "dvc") if c not in skip]
        if "dvc" not in skip and "dvc_cold" not in skip and bs == sizes[-1]:
            # the same without the warm worker: every stage a cold process (MINICHATGPT_WORKER=0)
            repo_cold = scratch_repo(f"dvc-cold-{bs}", edit)
            contenders.append("dvc_cold")
            det["dvc_cold"] = []
        for i in range(total):
            # lockstep, rotating the order: load from other processes hits every contender alike
            for c in contenders[i % len(contenders):] + contenders[: i % len(contenders)]:
                if c in ("dvc", "dvc_cold"):
                    where = repo if c == "dvc" else repo_cold
                    env = WARM_ENV if c == "dvc" else {"MINICHATGPT_WORKER": "0"}
                    before = dir_bytes(where / ".dvc/cache")
                    r = timed_dvc_repro(where, stage_address("update", i + 1), threads, env)
                    r["cache_bytes_added"] = dir_bytes(where / ".dvc/cache") - before
                else:
                    r = workers[c].request(cmd="step", index=i, profile=(c == "ours" and i == total - 1))
                det[c].append(r)
            log(f"batch {bs} iteration {i + 1}: " + " ".join(f"{c} {det[c][-1]['s']:.2f}s" for c in contenders))
        if "trl" in workers and "ours" in workers:
            row["same_model_max_abs_diff"] = same_model_check(workers["trl"].ready["probe"],
                                                              workers["ours"].ready["probe"])
            log(f"batch {bs}: same weights on both sides, max |difference|: {row['same_model_max_abs_diff']}")
        for c, w in workers.items():
            det[c + "_worker"] = w.close()
        measured = {c: det[c][args.warmup:] for c in contenders}
        if "trl" in measured:
            row["trl_s_per_iter"] = median([x["s"] for x in measured["trl"]])
            row["trl_peak_rss_mb"] = det["trl_worker"]["peak_rss_mb"]
        if "ours" in measured:
            row["inprocess_s_per_iter"] = median([x["s"] for x in measured["ours"]])
            row["inprocess_peak_rss_mb"] = det["ours_worker"]["peak_rss_mb"]
        if "portable" in measured:
            row["portable_s_per_iter"] = median([x["s"] for x in measured["portable"]])
            if "ours" in measured:  # what the portable kernels cost, iteration by iteration
                row["portable_vs_native_paired"] = median(
                    [a["s"] / b["s"] for a, b in zip(measured["portable"], measured["ours"])])
        if "dvc" in measured:
            m = measured["dvc"]
            row |= dvc_columns("dvc", m)
            row["dvc_cache_bytes_per_iter"] = int(median([x["cache_bytes_added"] for x in m]))
        if "dvc_cold" in measured:
            row |= dvc_columns("dvc_cold", measured["dvc_cold"])
        for c in ("ours", "dvc", "dvc_cold"):
            if "trl" in measured and c in measured:
                # per-iteration ratios (contenders ran back to back) are steadier than ratios of medians
                row[f"{'inprocess' if c == 'ours' else c}_vs_trl_paired"] = median(
                    [a["s"] / b["s"] for a, b in zip(measured[c], measured["trl"])])
        q_len = statistics.mean(len(q) for it in iters for q in it["queries"])
        if det["ours"]:
            r_len = statistics.mean(x["response_tokens"] for x in det["ours"]) / bs
        else:
            r_len = statistics.mean(x for it in iters for x in it["lengths"])
        flops = flops_per_iteration(raw, bs, q_len, r_len)
        row["flop_bound_s_per_iter"] = sum(flops.values()) / (gflops * 1e9)
        row["gflop_per_iter"] = sum(flops.values()) / 1e9
        row["gflop_by_phase"] = {k: v / 1e9 for k, v in flops.items()}
        if "trl_s_per_iter" in row:
            for key in ("inprocess_s_per_iter", "dvc_s_per_iter", "dvc_stages_s_per_iter", "dvc_cold_s_per_iter"):
                if key in row:
                    row[key.replace("_s_per_iter", "_vs_trl")] = row[key] / row["trl_s_per_iter"]
        rows.append(row)
        detail[str(bs)] = det
        log(f"batch {bs}: " + json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()
                                          if not isinstance(v, dict)}))

    largest = rows[-1]
    results = {
        **{k: largest.get(k) for k in ("batch_size", "trl_s_per_iter", "inprocess_s_per_iter", "portable_s_per_iter",
                                       "portable_vs_native_paired", "dvc_s_per_iter",
                                       "dvc_stages_s_per_iter", "dvc_cold_s_per_iter", "flop_bound_s_per_iter",
                                       "inprocess_vs_trl", "dvc_vs_trl", "dvc_stages_vs_trl", "dvc_cold_vs_trl")},
        "table": rows,
        "matmul_gflops": gflops,
        "settings": {"warmup": args.warmup, "measured_iters": args.iters, "threads": threads,
                     "ppo": {k: section(raw, "ppo").__dict__[k] for k in ("mini_batch_size", "ppo_epochs")},
                     "forward_batch_size": section(raw, "generation").forward_batch_size,
                     "machine": f"{platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()}",
                     "trl": "trl==0.11.4 transformers==4.45.2 accelerate==0.34.2 torch==2.13.0"},
        "iterations": detail,
        "bench_wall_s": time.perf_counter() - t_start,
    }
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    table = markdown_table(rows, gflops, detail, args.warmup)
    print(table)
    if Path(args.out).resolve() == (ROOT / "benchmarks/results.json").resolve():
        write_readme_table(table)
    log(f"wrote {args.out} in {results['bench_wall_s']:.0f}s")


def write_readme_table(table: str) -> None:
    text = README.read_text() if README.is_file() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        README.write_text(head + BEGIN + "\n" + table + "\n" + END + rest.split(END, 1)[1])


def markdown_table(rows: list[dict], gflops: float, detail: dict | None = None, warmup: int = 1) -> str:
    def f(x, fmt="{:.2f}"):
        return fmt.format(x) if isinstance(x, (int, float)) else "–"

    lines = ["| batch | TRL s/iter | in-process s/iter | in-process portable s/iter (÷ native) "
             "| dvc: the four stages s/iter | dvc: whole command s/iter "
             "| FLOP bound s/iter | in-process ÷ TRL | dvc ÷ TRL: four stages / whole command "
             "| dvc stages rollout/score/adv/update s | stage peak RSS MB | DVC cache MB/iter |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        st = r.get("dvc_stage_s", {})
        rss = r.get("dvc_stage_peak_rss_mb", {})
        lines.append(
            f"| {r['batch_size']} | {f(r.get('trl_s_per_iter'))} | {f(r.get('inprocess_s_per_iter'))} "
            f"| {f(r.get('portable_s_per_iter'))} ({f(r.get('portable_vs_native_paired'))}) "
            f"| {f(r.get('dvc_stages_s_per_iter'))} | {f(r.get('dvc_s_per_iter'))} "
            f"| {f(r.get('flop_bound_s_per_iter'))} | {f(r.get('inprocess_vs_trl'))} "
            f"| {f(r.get('dvc_stages_vs_trl'))} / {f(r.get('dvc_vs_trl'))} "
            f"| {'/'.join(f(st.get(k)) for k in STAGES) if st else '–'} "
            f"| {'/'.join(f(rss.get(k), '{:.0f}') for k in STAGES) if rss else '–'} "
            f"| {f(r.get('dvc_cache_bytes_per_iter', None) and r['dvc_cache_bytes_per_iter'] / 2**20)} |")
    lines.append("\n*In-process portable*: the same in-process run with the kernel pins every stage runs under "
                 "(ATen AVX2, MKL's vendor-neutral SSE2 branch, ...), so that results are bit-identical on any "
                 "x86-64 CPU with AVX2; in brackets its per-iteration ratio to the native run. The dvc contenders "
                 "always run portable; TRL runs native.")
    lines.append("\n*The four stages*: from DVC's first `Running stage` line to its exit (stage processes, "
                 "output hashing and caching, `dvc.lock` rewrites). *Whole command*: from starting "
                 "`dvc repro …:update@i` to its exit, so DVC's own start-up and its status checks of every "
                 "upstream stage are included too.")
    per_iter = _per_iteration_ratios(rows[-1]["batch_size"], detail, warmup) if detail else None
    if per_iter:
        lines.append(f"\nPer measured iteration at batch {rows[-1]['batch_size']}, dvc ÷ TRL (four stages / whole "
                     "command): " + ", ".join(f"{i}: {a:.2f} / {b:.2f}" for i, a, b in per_iter)
                     + ". DVC's bookkeeping grows with the iterations already in the stage's `dvc.lock` (up to 10).")
    for r in rows:
        if r.get("dvc_cold_s_per_iter"):
            st = r["dvc_cold_stage_s"]
            lines.append(f"\nWithout the warm worker (`MINICHATGPT_WORKER=0`, every stage a cold process), batch "
                         f"{r['batch_size']}: **{r['dvc_cold_s_per_iter']:.2f} s/iter, {f(r.get('dvc_cold_vs_trl'))} x "
                         f"TRL** (stages {'/'.join(f(st.get(k)) for k in STAGES)} s).")
    over = [f"{r['batch_size']}: {r['dvc_overhead_s']:.1f} s" for r in rows if "dvc_overhead_s" in r]
    if over:
        lines.append("\nDVC and process overhead per iteration (whole command minus the stages' own time): "
                     + ", ".join(over) + ".")
    lines.append(f"\nmatmul throughput used for the FLOP bound: {gflops:.1f} GFLOP/s (fp32).")
    return "\n".join(lines)


def _per_iteration_ratios(batch_size: int, detail: dict, warmup: int) -> list[tuple[int, float, float]] | None:
    """(iteration, four stages ÷ TRL, whole command ÷ TRL) for each measured iteration."""
    det = detail.get(str(batch_size), {})
    trl, dvc = det.get("trl"), det.get("dvc")
    if not trl or not dvc or len(trl) != len(dvc):
        return None
    return [(i + 1, sum(d["stages_s"].values()) / t["s"], d["s"] / t["s"])
            for i, (t, d) in enumerate(zip(trl, dvc)) if i >= warmup]


if __name__ == "__main__":
    try:
        main()
    finally:
        stop_warm_workers("MINICHATGPT_BENCH_RUN", WARM_ENV["MINICHATGPT_BENCH_RUN"])
