"""Split the review corpus and build the prompt set (train / held-out eval)."""

from minichatgpt.runtime.stage import parser, run


def main() -> dict:
    p = parser("prepare", __doc__)
    p.add_argument("--source", default=None, help="CSV with text,label columns (overrides data.dataset)")
    p.add_argument("--corpus", default="data/corpus.parquet", help="output: texts for pretraining and reward")
    p.add_argument("--prompts", default="data/prompts.parquet", help="output: prompt table")
    args = p.parse_args()

    from minichatgpt.params import load_yaml, section
    from minichatgpt.pipeline.artifacts import write_table
    from minichatgpt.pipeline.data import load_dataset_reviews, load_reviews, split_corpus

    params = section(load_yaml(args.params), "data")
    if args.source or params.dataset == "packaged":
        reviews = load_reviews(args.source)
    else:
        reviews = load_dataset_reviews(params.dataset)
    corpus, prompts = split_corpus(reviews, params)
    write_table(corpus, args.corpus, "corpus")
    write_table(prompts, args.prompts, "prompts")
    return {"texts": corpus.num_rows, "prompts": prompts.num_rows}


if __name__ == "__main__":
    run("prepare", main)
