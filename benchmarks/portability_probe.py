"""Cross-CPU portability probe for bit-identical CPU results.

Standalone (stdlib + torch + transformers + numpy + tokenizers; no network,
no minichatgpt imports).  Runs a small deterministic workload in one process
and prints ONE JSON line: sha256[:16] of every result, the CPU capability
torch dispatched to, the cpuid-derived feature flags numpy saw, and the
values of the environment knobs that influence kernel selection.

Knobs are read from the environment only, e.g.

    ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=COMPATIBLE ONEDNN_MAX_CPU_ISA=AVX2 \
        python benchmarks/portability_probe.py

Compare the JSON lines from different machines / emulated CPUs: equal hashes
mean bit-identical results.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

KNOBS = (
    "ATEN_CPU_CAPABILITY",
    "MKL_CBWR",
    "MKL_ENABLE_INSTRUCTIONS",
    "MKL_DEBUG_CPU_TYPE",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "NPY_DISABLE_CPU_FEATURES",
    "NPY_ENABLE_CPU_FEATURES",
    "RAYON_NUM_THREADS",
    "TOKENIZERS_PARALLELISM",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
)

# Set PROBE_SKIP=bpe,gpt2,... to drop sections (e.g. under slow emulation).
SKIP = {s.strip() for s in os.environ.get("PROBE_SKIP", "").split(",") if s.strip()}


def h(obj) -> str:
    """sha256[:16] of a tensor / ndarray / bytes / str."""
    if isinstance(obj, str):
        data = obj.encode()
    elif isinstance(obj, (bytes, bytearray)):
        data = bytes(obj)
    elif hasattr(obj, "detach"):  # torch tensor
        data = obj.detach().contiguous().cpu().numpy().tobytes()
    else:  # numpy array / scalar
        import numpy as np

        data = np.ascontiguousarray(obj).tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def main() -> None:
    out: dict = {"env": {k: os.environ.get(k) for k in KNOBS}}
    hashes: dict = {}
    timing: dict = {}
    out["hash"] = hashes
    out["time_s"] = timing
    t0 = time.perf_counter()

    # ---- numpy (imported first so a NPY_* error is reported, not fatal) ----
    np = None
    try:
        import numpy as np  # noqa: F811

        out["numpy"] = np.__version__
        try:
            from numpy._core._multiarray_umath import __cpu_features__ as feats
        except ImportError:  # numpy 1.x
            from numpy.core._multiarray_umath import __cpu_features__ as feats
        out["cpuid"] = {k: bool(feats.get(k)) for k in ("AVX2", "FMA3", "AVX512F", "AVX512_SKX", "AVX512_ICL")}
        try:
            from numpy._core._multiarray_umath import __cpu_dispatch__

            out["numpy_dispatch"] = list(__cpu_dispatch__)
        except ImportError:
            pass
    except Exception as e:  # e.g. bad NPY_DISABLE_CPU_FEATURES
        out["numpy_error"] = f"{type(e).__name__}: {e}"[:300]
    timing["import_numpy"] = round(time.perf_counter() - t0, 2)

    t = time.perf_counter()
    import torch

    timing["import_torch"] = round(time.perf_counter() - t, 2)
    torch.set_num_threads(1)
    out["torch"] = torch.__version__
    out["aten_cap"] = torch.backends.cpu.get_cpu_capability()
    out["mkl"] = torch.backends.mkl.is_available()

    # (a) fp32 matmul -> MKL sgemm
    t = time.perf_counter()
    torch.manual_seed(0)
    a = torch.randn(256, 128)
    b = torch.randn(128, 4096)
    hashes["matmul"] = h(a @ b)
    timing["matmul"] = round(time.perf_counter() - t, 3)

    # (b) softmax / log_softmax / sum (ATen vectorised kernels)
    t = time.perf_counter()
    torch.manual_seed(0)
    x = torch.randn(64, 4096) * 3.0
    hashes["softmax"] = h(torch.softmax(x, dim=-1))
    hashes["log_softmax"] = h(torch.log_softmax(x, dim=-1))
    hashes["sum"] = h(torch.stack([x.sum(), x.sum(dim=0).sum(), x.exp().sum(dim=1).sum()]))
    # element-wise ops that torch routes to MKL VML (depends on MKL_CBWR)
    v = torch.rand(1 << 14) * 1e-5
    hashes["vml_sqrt"] = h(torch.sqrt(v))
    hashes["vml_exp"] = h(torch.exp(x))
    timing["softmax"] = round(time.perf_counter() - t, 3)

    # (c) tiny GPT-2: forward, CE loss, backward, one Adam step; (d) sampling
    if "gpt2" not in SKIP:
        t = time.perf_counter()
        import transformers
        from transformers import GPT2Config, GPT2LMHeadModel

        timing["import_transformers"] = round(time.perf_counter() - t, 2)
        out["transformers"] = transformers.__version__
        t = time.perf_counter()
        torch.manual_seed(0)
        cfg = GPT2Config(n_layer=2, n_head=4, n_embd=128, vocab_size=4096, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(cfg)
        out["attn_impl"] = getattr(model.config, "_attn_implementation", None)
        hashes["gpt2_init"] = h(torch.cat([p.detach().flatten() for p in model.parameters()]))
        ids = (torch.arange(8 * 32).reshape(8, 32) * 7919 + 13) % cfg.vocab_size
        model.train()  # dropout on, seeded
        torch.manual_seed(1)
        res = model(input_ids=ids, labels=ids)
        hashes["gpt2_logits"] = h(res.logits)
        hashes["gpt2_loss"] = h(res.loss)
        out["gpt2_loss"] = float(res.loss.detach())
        res.loss.backward()
        hashes["gpt2_grads"] = h(torch.cat([p.grad.flatten() for p in model.parameters()]))
        # fused=True uses ATen's own vectorised kernel; the default (for-loop /
        # foreach) path calls torch.sqrt, which goes to MKL VML on x86.
        twins = []
        for p in model.parameters():
            q = torch.nn.Parameter(p.detach().clone())
            q.grad = p.grad.detach().clone()
            twins.append(q)
        torch.optim.Adam(twins, lr=1e-3, fused=True).step()
        hashes["gpt2_params_after_fused_adam"] = h(torch.cat([q.detach().flatten() for q in twins]))
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        opt.step()
        hashes["gpt2_params_after_adam"] = h(torch.cat([p.detach().flatten() for p in model.parameters()]))
        # (d) multinomial sampling of 8 tokens with a seeded generator
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, -1, :]
        hashes["eval_logits"] = h(logits)
        g = torch.Generator().manual_seed(1234)
        probs = torch.softmax(logits / 0.9, dim=-1)
        samples = torch.multinomial(probs, 8, replacement=True, generator=g)
        hashes["multinomial"] = h(samples)
        out["multinomial_row0"] = samples[0].tolist()
        timing["gpt2"] = round(time.perf_counter() - t, 3)

    # (e) numpy transcendental + reductions
    if np is not None:
        t = time.perf_counter()
        rng = np.random.default_rng(0)
        base = rng.standard_normal(1 << 16)
        for name, arr in (("f32", base.astype(np.float32)), ("f64", base.astype(np.float64))):
            hashes[f"np_exp_{name}"] = h(np.exp(arr))
            hashes[f"np_log_{name}"] = h(np.log(np.abs(arr) + 1e-3))
            hashes[f"np_tanh_{name}"] = h(np.tanh(arr))
            hashes[f"np_meanstd_{name}"] = h(np.array([np.mean(arr), np.std(arr)], dtype=arr.dtype))
        timing["numpy"] = round(time.perf_counter() - t, 3)

    # (f) byte-level BPE training
    if "bpe" not in SKIP:
        t = time.perf_counter()
        import tokenizers
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        out["tokenizers"] = tokenizers.__version__
        words = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi "
                 "omicron pi rho sigma tau upsilon phi chi psi omega the a of and to in is "
                 "reward policy value model token sample").split()
        sents = []
        state = 12345
        for i in range(2000):
            n = 5 + i % 11
            ws = []
            for _ in range(n):
                state = (state * 1103515245 + 12345) % (1 << 31)
                ws.append(words[state % len(words)])
            sents.append(" ".join(ws) + f" {i}.")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=600, min_frequency=2, show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(sents, trainer=trainer)
        vocab = json.dumps(sorted(tok.get_vocab().items(), key=lambda kv: kv[1]))
        hashes["bpe_vocab"] = h(vocab)
        hashes["bpe_json"] = h(tok.to_str())
        timing["bpe"] = round(time.perf_counter() - t, 3)

    timing["total"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(out, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
    sys.exit(0)
