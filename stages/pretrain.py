"""Build the iteration-0 policy: train a BPE tokenizer and a small GPT-2 on the corpus,
or record a Hugging Face model name / local directory to start from."""

from minichatgpt.runtime.stage import parser, run


def main() -> dict:
    p = parser("pretrain", __doc__)
    p.add_argument("--corpus", default="data/corpus.parquet")
    p.add_argument("--out", default="checkpoints/0", help="output checkpoint directory")
    p.add_argument("--metrics", default="metrics/pretrain.json")
    args = p.parse_args()

    from pathlib import Path

    from minichatgpt.params import load_yaml, section
    from minichatgpt.pipeline.artifacts import atomic_path, read_table, write_json
    from minichatgpt.runtime.stage import setup_torch

    raw = load_yaml(args.params)
    params, runtime = section(raw, "pretrain"), section(raw, "runtime")
    if params.model != "embedded":
        return _record_external(params.model, Path(args.out), args.metrics)
    corpus = read_table(args.corpus, "corpus")
    setup_torch(runtime.threads)

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from minichatgpt.models.policy import PolicyWithValueHead, initial_state, save_policy
    from minichatgpt.models.supervised import pretrain_lm, token_stream
    from minichatgpt.models.tokenizer import train_bpe_tokenizer
    from minichatgpt.runtime.device import resolve

    texts, splits = corpus["text"].to_pylist(), corpus["split"].to_pylist()
    train_texts = [t for t, s in zip(texts, splits) if s == "train"]
    valid_texts = [t for t, s in zip(texts, splits) if s == "eval"]
    tokenizer = train_bpe_tokenizer(train_texts, params.vocab_size)
    stream, valid = token_stream(tokenizer, train_texts), token_stream(tokenizer, valid_texts)
    torch.manual_seed(params.seed)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=params.n_positions, n_embd=params.n_embd, n_layer=params.n_layer,
        n_head=params.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
    )
    place = resolve(runtime.device, runtime.dtype)
    model = GPT2LMHeadModel(config).to(place.device)  # initial weights drawn on the CPU
    metrics = pretrain_lm(model, stream, valid, params, place)
    metrics["pretrain/train_tokens"] = int(len(stream))
    metrics |= place.metrics()
    with atomic_path(args.out) as tmp:
        save_policy(tmp, PolicyWithValueHead(model), tokenizer, state=initial_state())
        (tmp / "value_head.safetensors").unlink()  # iteration 0 has no value head yet; update seeds it
    write_json(metrics, args.metrics)
    return metrics


def _record_external(ref: str, out, metrics_path: str) -> dict:
    import json

    from minichatgpt.models.policy import initial_state, load_causal_lm, write_state
    from minichatgpt.models.sources import pretrained_kwargs
    from minichatgpt.models.tokenizer import load_tokenizer
    from minichatgpt.pipeline.artifacts import atomic_path, write_json

    model = load_causal_lm(ref)  # fail here, not three stages later
    tokenizer = load_tokenizer(ref)
    metrics = {"pretrain/parameters": sum(p.numel() for p in model.parameters())}
    if pretrained_kwargs(ref)[1]:  # GGUF: dequantize once into a safetensors checkpoint
        from minichatgpt.models.policy import PolicyWithValueHead, dequantized, save_policy

        with atomic_path(out) as tmp:
            save_policy(tmp, PolicyWithValueHead(dequantized(model)), tokenizer, state=initial_state())
            (tmp / "value_head.safetensors").unlink()
        write_json(metrics, metrics_path)
        return metrics
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "source.json").write_text(json.dumps({"model": ref}, indent=2) + "\n")
        write_state(tmp, initial_state())
    write_json(metrics, metrics_path)
    return metrics


if __name__ == "__main__":
    run("pretrain", main)
