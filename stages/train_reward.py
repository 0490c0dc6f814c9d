"""Build the reward model: train a small BERT sentiment classifier on the corpus labels,
or record a Hugging Face text-classification model / local directory / module:function."""

from minichatgpt.runtime.stage import parser, run


def main() -> dict:
    p = parser("train_reward", __doc__)
    p.add_argument("--corpus", default="data/corpus.parquet")
    p.add_argument("--out", default="models/reward", help="output model directory")
    p.add_argument("--metrics", default="metrics/reward.json")
    args = p.parse_args()

    import json

    from minichatgpt.models.reward import FUNCTION_FILE, SOURCE_FILE, RewardModel, is_function_ref
    from minichatgpt.params import load_yaml, section
    from minichatgpt.pipeline.artifacts import atomic_path, read_table, write_json
    from minichatgpt.runtime.stage import setup_torch

    raw = load_yaml(args.params)
    params, runtime = section(raw, "reward"), section(raw, "runtime")
    setup_torch(runtime.threads)
    if params.model != "embedded":
        RewardModel(params.model)  # fail now if it cannot be loaded
        with atomic_path(args.out) as tmp:
            tmp.mkdir()
            key = "function" if is_function_ref(params.model) else "model"
            (tmp / (FUNCTION_FILE if key == "function" else SOURCE_FILE)).write_text(
                json.dumps({key: params.model}, indent=2) + "\n"
            )
        write_json({"reward/external": 1}, args.metrics)
        return {"reward": params.model}

    import torch

    from minichatgpt.models.supervised import classifier_accuracy, classifier_examples, train_classifier
    from minichatgpt.runtime.device import resolve

    corpus = read_table(args.corpus, "corpus")
    texts, labels, splits = (corpus[c].to_pylist() for c in ("text", "label", "split"))
    train = [(t, y) for t, y, s in zip(texts, labels, splits) if s == "train"]
    valid = [(t, y) for t, y, s in zip(texts, labels, splits) if s == "eval"]
    torch.manual_seed(params.seed)
    if params.init == "scratch":
        model, tokenizer = _small_bert([t for t, _ in train], params)
    else:
        model, tokenizer = _pretrained_encoder(params.init)
    examples, ys = classifier_examples(
        tokenizer, [t for t, _ in train], [y for _, y in train], params.max_length, params.seed
    )
    place = resolve(runtime.device, runtime.dtype)
    model.to(place.device)  # initial weights drawn on the CPU
    train_classifier(model, examples, ys, tokenizer.pad_token_id, params, place)
    v_texts, v_labels = [t for t, _ in valid], [y for _, y in valid]
    full, _ = classifier_examples(tokenizer, v_texts, v_labels, params.max_length, params.seed, prefix_share=0.0)
    short, _ = classifier_examples(tokenizer, v_texts, v_labels, 24, params.seed + 1, prefix_share=1.0)
    metrics = {
        "reward/valid_accuracy": classifier_accuracy(model, full, v_labels, tokenizer.pad_token_id),
        "reward/valid_accuracy_prefix": classifier_accuracy(model, short, v_labels, tokenizer.pad_token_id),
    } | place.metrics()
    from minichatgpt.models.tokenizer import save_tokenizer

    with atomic_path(args.out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tokenizer, tmp)
    write_json(metrics, args.metrics)
    return metrics


def _small_bert(texts: list[str], params):
    """A BPE tokenizer and a BERT classifier of the configured size, both trained from scratch."""
    from tokenizers import processors
    from transformers import BertConfig, BertForSequenceClassification

    from minichatgpt.models.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(texts, params.vocab_size)
    tokenizer.add_special_tokens({"cls_token": "<cls>"})
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<cls> $A", special_tokens=[("<cls>", tokenizer.cls_token_id)]
    )
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=params.n_embd, num_hidden_layers=params.n_layer,
        num_attention_heads=params.n_head, intermediate_size=4 * params.n_embd,
        max_position_embeddings=max(128, params.max_length), num_labels=2, pad_token_id=tokenizer.pad_token_id,
        id2label=LABELS, label2id={v: k for k, v in LABELS.items()},
    )
    return BertForSequenceClassification(config), tokenizer


def _pretrained_encoder(ref: str):
    """A pretrained encoder (e.g. MiniLM) with a fresh 2-class head, and its own tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from minichatgpt.models.sources import ModelError, resolve_ref

    name = resolve_ref(ref)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
        model = AutoModelForSequenceClassification.from_pretrained(
            name, num_labels=2, id2label=LABELS, label2id={v: k for k, v in LABELS.items()}, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ModelError(f"reward.init={ref!r}: cannot be loaded: {err}") from None
    return model, tokenizer


LABELS = {0: "NEGATIVE", 1: "POSITIVE"}


if __name__ == "__main__":
    run("train_reward", main)
