"""Ladder Residual quality: a standard and a ladder model of the same size trained from the same seed
on the same data, eval loss side by side (the paper at 1.2B parameters: WikiText perplexity 18.54
standard vs 18.42 ladder, about equal).

    python benchmarks/ladder_quality.py [--steps 2000] [--eval-every 100] [--size debug] [--seq-len 64]
                                        [--batch-size 8] [--lr 2e-3] [--ladder-layers all] [--out DIR]

Each model trains in one process, the two side by side (Trainer, fp32, the built-in corpus with the byte tokenizer, the
same seed: the same initial weights, since a ladder model has the standard one's parameters, and
the same batches); the eval loss is the mean over data.eval_batches held-out batches every
--eval-every steps. Writes ladder_quality.json, ladder_quality.md and ladder_quality.png (train
loss, smoothed, and eval loss of both) to --out (default benchmarks/results/).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = ("standard", "ladder")


def train_variant(cfg: dict, variant: str) -> dict:
    """Runs inside a one-process group: train one variant, return its losses."""
    from longtrain.launcher.config import load_recipe
    from longtrain.launcher.trainer import Trainer

    residual = ["model.residual=standard"] if variant == "standard" else \
        ["model.residual=ladder"] + ([] if cfg["ladder_layers"] is None else [f"model.ladder_layers={cfg['ladder_layers']}"])
    with tempfile.TemporaryDirectory() as run_dir:
        recipe = load_recipe(None, [
            f"model.name={cfg['size']}", "parallel.dp_shard=1", "parallel.tp=1", f"data.seq_len={cfg['seq_len']}",
            f"data.batch_size={cfg['batch_size']}", f"data.eval_batches={cfg['eval_batches']}", "data.num_workers=0",
            f"optim.lr={cfg['lr']}", f"optim.warmup_steps={cfg['warmup']}", f"train.steps={cfg['steps']}",
            f"train.eval_every={cfg['eval_every']}", f"train.log_every={cfg['log_every']}", f"train.seed={cfg['seed']}",
            "run.progress=false", "run.tensorboard=false", "checkpoint.save_at_end=false", "checkpoint.resume=never",
            f"checkpoint.every={cfg['steps'] * 10}", f"run.dir={run_dir}", "run.launch.nproc_per_node=1",
        ] + residual)
        trainer = Trainer(recipe)
        began = time.perf_counter()
        result = trainer.run()
        seconds = time.perf_counter() - began
    return {"variant": variant, "losses": {int(k): v for k, v in result.losses.items()},
            "eval_losses": {int(k): v for k, v in result.eval_losses.items()}, "seconds": seconds,
            "parameters": sum(p.numel() for p in trainer.parts[0].parameters())}


def summarize(results: dict, cfg: dict) -> dict:
    std, lad = results["standard"]["eval_losses"], results["ladder"]["eval_losses"]
    steps = sorted(set(std) & set(lad))
    last = steps[-1] if steps else None
    tail = steps[-max(1, len(steps) // 5):]  # the last fifth of the evals
    mean = lambda d: sum(d[s] for s in tail) / len(tail)  # noqa: E731
    return {"eval_steps": steps, "final_step": last,
            "final_eval_standard": std.get(last), "final_eval_ladder": lad.get(last),
            "final_eval_gap": None if last is None else lad[last] - std[last],
            "tail_mean_eval_standard": mean(std) if tail else None, "tail_mean_eval_ladder": mean(lad) if tail else None}


def markdown(report: dict) -> str:
    cfg, s, res = report["config"], report["summary"], report["results"]
    lines = [f"# Ladder Residual quality: standard vs ladder ({report['device']})", "",
             f"Model `{cfg['size']}` ({res['standard']['parameters'] / 1e6:.2f}M parameters), ladder layers "
             f"{cfg['ladder_layers'] or 'all'}; {cfg['steps']} steps of {cfg['batch_size']} x {cfg['seq_len']} tokens "
             f"(built-in corpus, byte tokenizer), lr {cfg['lr']} cosine, seed {cfg['seed']}, fp32, one process each. "
             f"Machine: {report['machine'].get('cpu')} x {report['machine'].get('cpu_count')}.", "",
             "| step | standard eval loss | ladder eval loss | ladder - standard |", "|---|---|---|---|"]
    for step in s["eval_steps"]:
        a, b = res["standard"]["eval_losses"][step], res["ladder"]["eval_losses"][step]
        lines.append(f"| {step} | {a:.4f} | {b:.4f} | {b - a:+.4f} |")
    if s["final_step"] is not None:
        lines += ["", f"Final eval loss (step {s['final_step']}): standard {s['final_eval_standard']:.4f}, ladder "
                  f"{s['final_eval_ladder']:.4f} ({s['final_eval_gap']:+.4f}); mean of the last fifth of the evals: "
                  f"standard {s['tail_mean_eval_standard']:.4f}, ladder {s['tail_mean_eval_ladder']:.4f}. "
                  f"Training took {res['standard']['seconds']:.0f} s (standard) and {res['ladder']['seconds']:.0f} s "
                  "(ladder) on a shared machine. The eval batches are the same at every eval; the eval loss moves with "
                  "what the training stream is reading at the time (the built-in corpus streams the standard "
                  "library file by file, unshuffled), for both models alike. The paper at 1.2B parameters "
                  "and 100B tokens: about equal (WikiText perplexity 18.54 standard, 18.42 ladder)."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, color in zip(VARIANTS, ("tab:blue", "tab:orange")):
        r = report["results"][name]
        steps = sorted(r["losses"])
        window = max(1, len(steps) // 50)
        smooth = [sum(r["losses"][s] for s in steps[max(0, i - window + 1):i + 1]) / len(steps[max(0, i - window + 1):i + 1])
                  for i in range(len(steps))]
        ax.plot(steps, smooth, color=color, alpha=0.45, label=f"{name} train (smoothed)")
        ev = sorted(r["eval_losses"])
        ax.plot(ev, [r["eval_losses"][s] for s in ev], "o-", color=color, markersize=3, label=f"{name} eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(f"Ladder vs standard, {report['config']['size']} size, same seed and data")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="debug")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--log-every", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ladder-layers", default="all", help="all, or the last K layers")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    cfg = {"size": args.size, "steps": args.steps, "eval_every": args.eval_every, "eval_batches": args.eval_batches,
           "log_every": args.log_every, "seq_len": args.seq_len, "batch_size": args.batch_size, "lr": args.lr,
           "warmup": args.warmup, "seed": args.seed,
           "ladder_layers": None if args.ladder_layers == "all" else int(args.ladder_layers)}
    sys.path.insert(0, str(HERE))
    from measure import machine_info, write_results

    from longtrain.tests.distributed import run_group

    # The two variants train side by side (one process each; no deadline: a long run is the point).
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(VARIANTS)) as pool:
        futures = {name: pool.submit(run_group, 1, train_variant, cfg, name, deadline_s=10 ** 7) for name in VARIANTS}
        results = {name: future.result() for name, future in futures.items()}
    report = {"config": cfg, "device": "cpu", "machine": machine_info(), "results": results,
              "summary": summarize(results, cfg)}
    write_results(args.out, "ladder_quality", report, markdown(report), None if args.no_plot else plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
