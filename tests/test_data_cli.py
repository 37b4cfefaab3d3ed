"""`longtrain data export`, `longtrain tokenizer train`, `longtrain data inspect`, and the shipped
sentencepiece recipe end to end (export -> tokenizer -> preflight -> packed batches)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from longtrain.launcher.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The debug_spm_cpu recipe's files, made as its header says, in a scratch working directory."""
    work = tmp_path_factory.mktemp("spm_recipe")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        assert main(["data", "export", "--out", "runs/data/stdlib_jsonl"]) == 0
        assert main(["tokenizer", "train", "--source", "runs/data/stdlib_jsonl", "--vocab-size", "4096",
                     "--out", "runs/data/stdlib_4k.model", "--max-docs", "200"]) == 0
    finally:
        os.chdir(cwd)
    return work


def test_spm_recipe_preflight_and_batches(workdir, monkeypatch):
    from longtrain.data.loader import build_loader
    from longtrain.launcher.config import load_recipe
    from longtrain.launcher.launch import preflight

    monkeypatch.chdir(workdir)
    recipe = load_recipe(ROOT / "configs" / "debug_spm_cpu.yaml", ["data.num_workers=0"])
    assert preflight(recipe, "debug_spm_cpu.yaml") == 4
    loader = build_loader(recipe.data, dp_rank=1, dp_degree=2, seed=0)
    batch = next(loader)
    assert batch["tokens"].shape == (8, 256) and int(batch["tokens"].max()) < 4096
    assert loader.efficiency == 1.0
    text = loader.tokenizer.decode(batch["tokens"][0][batch["doc_ids"][0] == 0])
    assert len(text) > 100  # real source text came back out


def test_data_inspect_writes_stats_and_histogram(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    out = workdir / "inspect"
    code = main(["data", "inspect", str(ROOT / "configs" / "debug_spm_cpu.yaml"), "data.packing=whole",
                 "data.seq_len=1024", "--docs", "150", "--steps", "4", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "documents: 150" in printed and "packing: whole" in printed and "efficiency" in printed
    stats = json.loads((out / "data_inspect.json").read_text())
    assert stats["document_lengths"]["documents"] == 150
    assert stats["document_lengths"]["tokens"] > 150 * 10
    assert 0.5 < stats["packing"]["efficiency"] <= 1.0
    png = (out / "doc_lengths.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_bad_source_is_one_line_and_exit_2(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "longtrain.launcher.cli", "tokenizer", "train", "--source",
                           str(tmp_path / "nothing.jsonl"), "--vocab-size", "512", "--out", str(tmp_path / "t.model")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.startswith("longtrain: error:")]
    assert len(lines) == 1 and "nothing.jsonl does not exist" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    # the train command checks data before any worker starts
    proc = subprocess.run([sys.executable, "-m", "longtrain.launcher.cli", "train",
                           str(ROOT / "configs" / "debug_spm_cpu.yaml"), f"data.tokenizer={tmp_path / 'no.model'}"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "data.tokenizer:" in proc.stderr and "no.model does not exist" in proc.stderr


def test_data_throughput_benchmark_smoke(tmp_path):
    script = ROOT / "benchmarks" / "data_throughput.py"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script), "--seconds", "0.3", "--seq-len", "256", "--batch-size", "2",
                           "--skip-trainer", "--group-steps", "2", "--group-repeats", "1", "--out", str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "data_throughput.json").read_text())
    assert set(report["loader"]) == {"jsonl + sentencepiece", "builtin + bytes"}
    for rows in report["loader"].values():
        assert len(rows) == 3 and all(m["tokens_per_second"] > 0 for m in rows.values())
    node = report["node_1b_32k"]
    assert 1e5 < node["node_tokens_per_second"] < 1e6 and node["per_rank_dp8"] * 8 == pytest.approx(
        node["node_tokens_per_second"])
    assert report["workers_needed_sentencepiece"]["per_rank_dp8"] >= 1
    assert "| consumer | tokens/s |" in (tmp_path / "data_throughput.md").read_text()
    runs = report["balanced"]["runs"]
    assert set(runs) == {"inline, cold index", "inline, warm index", "worker=1, warm index"}
    assert all(m["steps"] >= 3 and m["stall_mean_s"] >= 0 for m in runs.values())
    # the warm index: only held documents are tokenized, fewer than with the cold one
    assert runs["inline, warm index"]["docs_tokenized"] < runs["inline, cold index"]["docs_tokenized"]
    assert "| producer | first step s | stall ms/step" in (tmp_path / "data_throughput.md").read_text()
    # the cold first pass in a tp2 x cp2 group: the world learns each length once (before: once per tp slice)
    group = report["balanced_group"]
    assert group["groups"] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    before, after = (group["runs"][label] for label in ("before: per balancing group, share's tokens dropped",
                                                        "after: world, share's tokens kept"))
    assert [r["exchange_size"] for r in before["ranks"]] == [2] * 4 and [r["exchange_size"] for r in after["ranks"]] == [4] * 4
    assert before["lengths_tokenized_sum"] == 2 * after["lengths_tokenized_sum"] > 0 and before["lengths_reused_sum"] == 0
    assert after["docs_tokenized_sum"] < before["docs_tokenized_sum"]
    assert group["ratio_before_after"]["file"]["lengths_tokenized_sum"] == 2.0 and all(
        run["same_counts_every_repeat"] for run in group["runs"].values())
    # streamed: before, no length learned with the group (every rank tokenized every document the step
    # packs: the same count on each); after, each length once over the world (a block of 256 here, more
    # than these tiny steps pack: the counts are the benchmark's at its real step size)
    before, after = (group["runs"][label] for label in ("streamed, before: every rank tokenizes what it packs",
                                                        "streamed, after: world, share's tokens kept"))
    assert before["lengths_tokenized_sum"] == 0 and after["lengths_tokenized_sum"] > 0
    assert len({r["docs_tokenized"] for r in before["ranks"]}) == 1
    assert after["lengths_tokenized_sum"] == group["runs"]["after: world, share's tokens kept"]["lengths_tokenized_sum"]
    assert "| file: before / after |" in (tmp_path / "data_throughput.md").read_text()
    assert "| streamed: before / after |" in (tmp_path / "data_throughput.md").read_text()
