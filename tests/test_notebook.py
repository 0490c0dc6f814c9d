"""The walkthrough notebook executes headless against models built by the real stages."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import ROOT, TINY_PARAMS, tool_env, write_params


@pytest.fixture(scope="module")
def built_project(tmp_path_factory) -> Path:
    """A project dir whose checkpoints/0 and models/reward come from tiny runs of the stages."""
    root = tmp_path_factory.mktemp("nbproject")
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    write_params(root / "params.yaml", TINY_PARAMS)
    for stage in ("prepare", "pretrain", "train_reward"):
        proc = subprocess.run([sys.executable, str(ROOT / "stages" / f"{stage}.py")], cwd=root, env=tool_env(),
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    return root


def test_the_walkthrough_is_the_seed_notebook_and_is_committed_with_its_outputs() -> None:
    """The seed's cells: only batch_size and forward_batch_size are set before init_ppo_trainer."""
    nb = nbformat.read(ROOT / "notebooks" / "ppo_walkthrough.ipynb", as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    settings = [line.split("#")[0].strip() for cell in code for line in cell.source.splitlines()
                if line.startswith("config.")]
    assert settings == ["config.batch_size = 4", "config.forward_batch_size = 2"]
    assert "from minichatgpt.experiments.imdb import config, sent_kwargs" in code[0].source
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), "commit it executed in order"
    assert all(cell.outputs for cell in code[1:])
    streams = [o.get("text", "") for cell in code for o in cell.outputs if o.get("name") == "stderr"]
    assert not [s for s in streams if "warn" in s.lower()], streams


@pytest.mark.slow
def test_walkthrough_notebook_runs_headless(built_project: Path) -> None:
    """Every cell of the seed notebook, verbatim, on models built by the tiny stages."""
    nb = nbformat.read(ROOT / "notebooks" / "ppo_walkthrough.ipynb", as_version=4)
    workdir = built_project / "notebooks"
    workdir.mkdir(exist_ok=True)
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(workdir)}})
    client.execute()
    outputs = {i: cell.get("outputs", []) for i, cell in enumerate(nb.cells) if cell.cell_type == "code"}
    errors = [o for outs in outputs.values() for o in outs if o.get("output_type") == "error"]
    assert not errors
    last = nb.cells[-1]["outputs"][0]["data"]["text/plain"]
    assert "policy/clipfrac" in last and "objective/kl" in last


@pytest.mark.slow
def test_lab_builds_the_pipelines_training_prompts_from_a_local_file(built_project: Path, tmp_path: Path) -> None:
    """Lab.build_dataset runs the pipeline's own data code: same split, same cut, no held-out prompt."""
    import pyarrow as pa
    import pyarrow.csv  # noqa: F401

    from minichatgpt.experiments.imdb import PPOConfig
    from minichatgpt.notebook.lab import Lab
    from minichatgpt.params import load_yaml, section
    from minichatgpt.pipeline.data import load_dataset_reviews, split_corpus

    texts = [f"Review {i}: a quiet, patient study of grief that earns every minute of its running time. " * 3
             for i in range(40)] + ["too short"]
    csv = tmp_path / "reviews.csv"
    pa.csv.write_csv(pa.table({"text": texts, "label": [i % 2 for i in range(len(texts))]}), csv)
    ds = Lab(PPOConfig(), root=built_project).build_dataset(str(csv), input_min_text_length=2,
                                                          input_max_text_length=5)
    data = section(load_yaml(built_project / "params.yaml"), "data")
    assert len(ds) == 40 - data.eval_prompts  # the short review is no prompt; the held-out ones stay out
    data.dataset, data.input_max_text_length = str(csv), 5
    _, prompts = split_corpus(load_dataset_reviews(str(csv)), data)
    tokenizer = Lab(PPOConfig(), root=built_project).tokenizer()
    train = [(text, n) for text, n, split in zip(prompts["text"].to_pylist(), prompts["query_len"].to_pylist(),
                                                  prompts["split"].to_pylist()) if split == "train"]
    expected = [tokenizer(text, add_special_tokens=False)["input_ids"][:n] for text, n in train]
    assert [row["input_ids"].tolist() for row in ds] == expected
    assert all(2 <= len(ids) <= 5 for ids in expected)


def test_lab_says_how_to_build_missing_models(tmp_path: Path) -> None:
    from minichatgpt.experiments.imdb import PPOConfig
    from minichatgpt.models.sources import ModelError
    from minichatgpt.notebook.lab import Lab

    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    with pytest.raises(ModelError, match="dvc repro pretrain train_reward"):
        Lab(PPOConfig(), root=tmp_path).init_policies_tokenizer()
