"""`longtrain data inspect`, `longtrain data export` and the text iterator behind
`longtrain tokenizer train`.

inspect: reads the first N documents of a recipe's training stream (blended, tokenized as the
recipe says) for document-length statistics and the token count, packs rows with the recipe's
packing for the packing efficiency (non-padding fraction), and writes a document-length
histogram (PNG) and the numbers (JSON).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from .pipeline import DataSettings, DocumentStream, SplitView
from .sources import BadRecord, BadRecords, SourceSpec, open_source


def iter_texts(paths: list[str], *, text_field: str = "text", max_docs: int = 0, seed: int = 0,
               skip_bad_records: bool = False, counts: dict | None = None) -> Iterator[str]:
    """The text of the training-split documents of each source in turn (epoch 0 only), up to
    max_docs in all (0: every document)."""
    specs = [SourceSpec(path=p, text_field=text_field, key="--source" if len(paths) == 1 else f"--source[{i}]")
             for i, p in enumerate(paths)]
    sources = [open_source(spec, "train", seed) for spec in specs]  # every path checked up front
    bad = BadRecords(skip=skip_bad_records)
    n = 0
    for i, src in enumerate(sources):
        view = SplitView(src, "train", seed, i)
        j = 0
        while not max_docs or n < max_docs:
            try:
                record, epoch, payload, _ = view.get(j, None, True)
            except ValueError:
                if j == 0:
                    raise
                break
            if epoch > 0:
                break
            j += 1
            if isinstance(payload, BadRecord):
                bad.handle(payload, (i, record))
                continue
            if not isinstance(payload, str):
                raise ValueError(f"{src.key}: {src.spec.path} holds token ids, not text: a tokenizer "
                                 "is trained from text")
            if payload:
                n += 1
                yield payload
    if counts is not None:
        counts.update(documents=n, skipped_records=bad.count)


def export_builtin(out_dir: str, *, split: str = "train", shards: int = 4, seed: int = 0) -> list[str]:
    """Write the built-in corpus as jsonl shards {"text", "path"} (for recipes and tests that
    want local jsonl files)."""
    from .builtin import BuiltinCorpus

    corpus = BuiltinCorpus(split, seed)
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"{split}-{i:05d}-of-{shards:05d}.jsonl") for i in range(shards)]
    handles = [open(p + ".tmp", "w", encoding="utf-8") for p in paths]
    try:
        for i, (path, rel) in enumerate(zip(corpus.documents, corpus.relative_paths)):
            with open(path, "rb") as f:
                text = f.read().decode("utf-8")
            handles[i % shards].write(json.dumps({"text": text, "path": rel}, ensure_ascii=False) + "\n")
    finally:
        for h in handles:
            h.close()
    for p in paths:
        os.replace(p + ".tmp", p)
    return paths


def document_stats(lengths: np.ndarray) -> dict:
    lengths = np.asarray(lengths, dtype=np.int64)
    if not len(lengths):
        return {"documents": 0, "tokens": 0}
    q = np.percentile(lengths, [50, 90, 99])
    return {"documents": int(len(lengths)), "tokens": int(lengths.sum()), "min": int(lengths.min()),
            "mean": float(lengths.mean()), "median": float(q[0]), "p90": float(q[1]), "p99": float(q[2]),
            "max": int(lengths.max())}


def inspect_recipe(recipe, *, docs: int = 2000, steps: int = 20, out: str | None = None) -> dict:
    """Statistics of a recipe's training data; writes <out>/data_inspect.json and
    <out>/doc_lengths.png (out defaults to the recipe's run.dir)."""
    d = recipe.data
    settings = DataSettings.from_config(d, recipe.train.seed, "train")
    settings.num_workers = 0
    stream = DocumentStream(settings)
    lengths = np.array([stream.fetch(i).length for i in range(docs)], dtype=np.int64)
    per_source = np.bincount([stream.blend.locate(i)[0] for i in range(docs)], minlength=len(settings.sources))
    stats = {"recipe_tokenizer": d.tokenizer, "vocab_size": stream.tokenizer.vocab_size,
             "sources": [{"key": spec.key, "path": spec.path, "weight": spec.weight,
                          "read_as": src.description, "documents": int(c)}
                         for spec, src, c in zip(settings.sources, stream.sources, per_source)],
             "document_lengths": document_stats(lengths),
             "skipped_records": stream.bad.count}

    if d.packing == "none":
        stats["packing"] = {"mode": "none", "efficiency": 1.0,
                            "note": "fixed windows of the stream: no padding, attention spans documents"}
    else:
        from .loader import PackedLoader

        loader = PackedLoader(settings, dp_rank=0, dp_degree=1)
        docs_seen = set()
        for _ in range(steps):
            next(loader)
            docs_seen.update(p[0] for row in loader.last_pieces for p in row)
        stats["packing"] = {"mode": d.packing, "rows": loader.stats["rows"], "tokens": loader.stats["tokens"],
                            "padding": loader.stats["padding"], "efficiency": loader.efficiency,
                            "documents_in_rows": len(docs_seen), "seq_len": d.seq_len}
    out_dir = Path(out or recipe.run.dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats["histogram"] = str(out_dir / "doc_lengths.png")
    _histogram(lengths, out_dir / "doc_lengths.png", title=f"{len(lengths)} documents, tokenizer {d.tokenizer}")
    (out_dir / "data_inspect.json").write_text(json.dumps(stats, indent=2))
    stats["json"] = str(out_dir / "data_inspect.json")
    return stats


def _histogram(lengths: np.ndarray, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = lengths[lengths > 0]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if len(lengths):
        hi = max(2, int(lengths.max()))
        bins = np.unique(np.logspace(0, np.log10(hi), 40).astype(np.int64))
        ax.hist(lengths, bins=bins, color="#4472c4", edgecolor="white")
        ax.set_xscale("log")
        for q, style in ((50, "--"), (99, ":")):
            v = float(np.percentile(lengths, q))
            ax.axvline(v, color="black", linestyle=style, linewidth=1, label=f"p{q} = {v:,.0f}")
        ax.legend()
    ax.set_xlabel("document length (tokens, log scale)")
    ax.set_ylabel("documents")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def format_stats(stats: dict) -> str:
    dl = stats["document_lengths"]
    lines = [f"documents: {dl.get('documents', 0):,}  tokens: {dl.get('tokens', 0):,}  "
             f"(tokenizer {stats['recipe_tokenizer']}, vocab {stats['vocab_size']:,})"]
    if dl.get("documents"):
        lines.append(f"document length: min {dl['min']:,}  mean {dl['mean']:,.1f}  median {dl['median']:,.0f}  "
                     f"p90 {dl['p90']:,.0f}  p99 {dl['p99']:,.0f}  max {dl['max']:,}")
    for s in stats["sources"]:
        lines.append(f"  {s['key']}: {s['read_as']}, weight {s['weight']:g}, {s['documents']:,} of the documents")
    p = stats["packing"]
    if p["mode"] == "none":
        lines.append("packing: none (fixed windows; efficiency 1.0, attention spans documents)")
    else:
        lines.append(f"packing: {p['mode']}, {p['rows']} rows, efficiency {p['efficiency']:.4f} "
                     f"(non-padding fraction; {p['padding']:,} padding tokens)")
    if stats.get("skipped_records"):
        lines.append(f"skipped records: {stats['skipped_records']}")
    lines.append(f"histogram: {stats['histogram']}")
    lines.append(f"numbers: {stats['json']}")
    return "\n".join(lines)
