"""Optimizer offloading: host Adam kernels, and none / cpu / interleaved side by side.

    python benchmarks/offload.py [--out DIR] [--params 8388608] [--subgroup 1048576] [--repeats 5]
    python benchmarks/offload.py --gpu [--gpu-model auto] [--seq-len 16384]      (one CUDA device)

CPU part (what this machine can show; the "device" is the CPU, see parallel/offload.py):
1. `host_adam`: parameters/s of DeepSpeed's CPU Adam (deepspeed.ops.adam, built on first use),
   torch's fused CPU AdamW (both are what `optim.offload_host_adam` chooses between) and
   torch.optim.AdamW(foreach) for context, on 1M, 4M and 16M fp32 parameters.
2. `update`: the optimizer step of `--params` parameters in `--subgroup` subgroups (gradients
   already on the host, as the backward hooks leave them) for none (torch.optim.AdamW, fused),
   cpu, interleaved stride 2 and interleaved stride auto, round-robin over the modes:
   measured median seconds next to the performance model's prediction (parallel/offload_model.py),
   and the bytes of optimizer state resident on the device and on the host (counted from the
   tensors the optimizer holds).
3. `train`: Trainer steps of a small model (`debug`, fp32) with each mode: step time, update
   time, the losses (equal across modes) and the device/host optimizer bytes.

GPU part (--gpu, one call of at most ~10 minutes on one H100/H200): iteration time of a model whose
optimizer state does not fit next to its weights, gradients and activations on the device, at a
long sequence: offload cpu, interleaved (stride auto) and DeepSpeed ZeRO-3 with CPU optimizer
offload on the same model and batch. The model is the largest preset whose fp32 master, m, v and
gradient (16 bytes/parameter) fit in 60% of host memory; the device is capped (memory fraction) so
that its Adam state (fp32 m, v: 8 bytes/parameter) does not fit beside weights and gradients.

Writes offload.json, offload.md and offload.png (offload_gpu.* for --gpu) to --out (default
benchmarks/results/).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _timed(fn, repeats: int) -> list[float]:
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# 1. Host Adam kernels
# ----------------------------------------------------------------------------------------------
def host_adam(sizes: list[int], repeats: int) -> dict:
    import torch

    from longtrain.parallel.offload import host_adams

    impls = host_adams("auto")
    out = {"sizes": sizes, "params_per_s": {}, "deepspeed_built": "deepspeed" in impls}
    for n in sizes:
        p, g, m, v = (torch.rand(n) for _ in range(4))
        row = {}
        for name, impl in impls.items():
            times = _timed(lambda: impl.update(p, g, m, v, step=3, lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8,
                                               weight_decay=0.1), repeats)
            row[name] = n / statistics.median(times)
        param = torch.nn.Parameter(p.clone())
        param.grad = g
        ref = torch.optim.AdamW([param], lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
        row["torch_foreach_adamw"] = n / statistics.median(_timed(ref.step, repeats))
        out["params_per_s"][str(n)] = row
    return out


# ----------------------------------------------------------------------------------------------
# 2. One update, per mode
# ----------------------------------------------------------------------------------------------
def _optimizer_bytes(opt, device) -> dict:
    """Bytes of optimizer state (and offload buffers) on the device and on the host."""
    import torch

    from longtrain.parallel.offload import OffloadAdamW, local

    if isinstance(opt, OffloadAdamW):
        host = sum(t.numel() * t.element_size() for t in (opt.master, opt.exp_avg, opt.exp_avg_sq, opt.grad))
        dev = sum(t.numel() * t.element_size() for t in opt.dev_bufs) if opt.dev_bufs else 0
        return {"device": dev, "host": host}
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                total += local(v).numel() * v.element_size()
    return {"device": total, "host": 0} if device.type == "cuda" else {"device": total, "host": 0}


MODES = {
    "none": None,
    "cpu": ("cpu", "auto"),
    "interleaved_k2": ("interleaved", 2),
    "interleaved_auto": ("interleaved", "auto"),
}


def update(numel: int, subgroup: int, repeats: int) -> dict:
    """Every mode's optimizer is built first; then the repeats go round the modes in turn, so that
    load from other processes on a shared machine falls on all of them alike."""
    import torch

    from longtrain.parallel.offload import OffloadAdamW, OffloadSettings

    device = torch.device("cpu")
    chunk = 1 << 20
    out = {"params": numel, "subgroup_size": subgroup, "modes": {}}
    steps, opts = {}, {}
    for mode, spec in MODES.items():
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(chunk)) for _ in range(numel // chunk)]
        grads = [torch.randn_like(p) for p in params]
        groups = [{"params": params, "weight_decay": 0.1}]
        if spec is None:
            opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
        else:
            opt = OffloadAdamW(groups, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, device=device,
                               settings=OffloadSettings(spec[0], subgroup, spec[1], "auto", 0.0))

        def ready(opt=opt, params=params, grads=grads, offloaded=spec is not None):
            """The gradients as backward leaves them; offloaded: copied to the host, which the
            hooks do during backward (not timed here: it overlaps backward in training)."""
            for p, g in zip(params, grads):
                p.grad = g
            if offloaded:
                opt.prepare_gradients()
        ready()
        opt.step()  # warm-up (and AdamW's state)
        steps[mode], opts[mode] = ready, opt
    times = {mode: [] for mode in MODES}
    for _ in range(repeats):
        for mode, ready in steps.items():
            ready()
            t0 = time.perf_counter()
            opts[mode].step()
            times[mode].append(time.perf_counter() - t0)
    for mode, spec in MODES.items():
        opt = opts[mode]
        row = {"measured_s": statistics.median(times[mode]), "repeats_s": times[mode], **_optimizer_bytes(opt, device)}
        if spec is not None:
            row.update(predicted_s=opt.prediction.update_s, stride=min(opt.stride, len(opt.subgroups) + 1),
                       subgroups=len(opt.subgroups), device_subgroups=opt.placement_summary()["device"],
                       host_adam=opt.host_adam.name,
                       prediction_error=(opt.prediction.update_s - row["measured_s"]) / row["measured_s"])
            opt.close()
        out["modes"][mode] = row
    return out


# ----------------------------------------------------------------------------------------------
# 3. Trainer steps, per mode
# ----------------------------------------------------------------------------------------------
TRAIN_COMMON = ["data.seq_len=128", "data.batch_size=2", "train.log_every=1000", "run.progress=false",
                "run.tensorboard=false", "checkpoint.save_at_end=false", "optim.warmup_steps=2", "train.grad_clip=1.0"]
TRAIN_MODES = {"none": ["optim.fused='on'"], "cpu": ["optim.offload=cpu"],
               "interleaved_k2": ["optim.offload=interleaved", "optim.offload_stride=2"],
               "interleaved_auto": ["optim.offload=interleaved", "optim.offload_stride=auto"]}


def train(model: str, steps: int, subgroup: int, extra: list[str], device_name: str = "cpu",
          modes: dict | None = None, deadline: float | None = None, catch_errors: bool = False) -> dict:
    out = {"model": model, "steps": steps, "modes": {}}
    for mode, overrides in (modes or TRAIN_MODES).items():
        if deadline is not None and time.time() > deadline:
            out["modes"][mode] = {"error": "skipped: --time-budget-s spent"}
            continue
        if catch_errors:  # the GPU run: one mode's failure (e.g. out of memory) is reported, the rest run
            try:
                out["modes"][mode] = _train_one(model, steps, subgroup, extra, device_name, overrides)
            except Exception as err:
                out["modes"][mode] = {"error": f"{type(err).__name__}: {str(err).strip()[:300]}"}
                _release_memory()
            continue
        out["modes"][mode] = _train_one(model, steps, subgroup, extra, device_name, overrides)
    if "none" not in out["modes"] or "error" in out["modes"]["none"]:
        return out
    base = out["modes"]["none"]["losses"]
    out["losses_equal_within_1e-6"] = all(
        all(abs(a - b) <= 1e-6 * abs(b) for a, b in zip(r["losses"], base)) for r in out["modes"].values()
        if "losses" in r)
    return out


def _train_one(model: str, steps: int, subgroup: int, extra: list[str], device_name: str, overrides: list[str]) -> dict:
    import torch

    from longtrain.launcher.config import load_recipe
    from longtrain.launcher.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(None, TRAIN_COMMON + extra + overrides + [
            f"model.name={model}", f"train.steps={steps}", f"run.dir={tmp}", f"train.device={device_name}",
            f"optim.offload_subgroup_size={subgroup}"])
        trainer = Trainer(recipe)
        update_s = []
        for opt in trainer.optimizers:
            real = opt.step

            def timed_step(*a, _real=real, **k):
                _sync()
                t0 = time.perf_counter()
                r = _real(*a, **k)
                _sync()
                update_s.append(time.perf_counter() - t0)
                return r
            opt.step = timed_step
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        step_s, losses = [], []
        for _ in range(steps):
            batch = next(trainer.loader)
            _sync()
            t0 = time.perf_counter()
            loss, _ = trainer.train_step_and_read(batch)
            _sync()
            step_s.append(time.perf_counter() - t0)
            losses.append(loss)
        bytes_ = [_optimizer_bytes(o, trainer.device) for o in trainer.optimizers]
        row = {"step_s": statistics.median(step_s[1:] or step_s), "update_s": statistics.median(update_s[1:] or update_s),
               "losses": losses, "device_bytes": sum(b["device"] for b in bytes_),
               "host_bytes": sum(b["host"] for b in bytes_),
               "params": trainer.model_cfg.num_params()}
        if trainer.device.type == "cuda":
            row["peak_device_memory_bytes"] = torch.cuda.max_memory_allocated()
        offloaded = [o for o in trainer.optimizers if hasattr(o, "placement_summary")]
        if offloaded:
            s = offloaded[0].placement_summary()
            row.update(predicted_update_s=s["predicted_update_s"], stride=min(s["stride"], s["subgroups"] + 1),
                       subgroups=s["subgroups"], host_adam=s["host_adam"])
            for o in offloaded:
                o.close()
        if hasattr(trainer.loader, "close"):
            trainer.loader.close()
        del trainer, offloaded
        _release_memory()
        return row


# ----------------------------------------------------------------------------------------------
# GPU: a model whose optimizer state does not fit, cpu / interleaved / DeepSpeed ZeRO-3 offload
# ----------------------------------------------------------------------------------------------
def _release_memory() -> None:
    """Free the device cache and the pinned host cache (tens of GB for a large model's offloaded
    state) before the next mode allocates its own."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        empty_host = getattr(torch._C, "_accelerator_emptyHostCache", None) or getattr(torch._C, "_host_emptyCache", None)
        if empty_host is not None:
            empty_host()


def _gpu_model(host_bytes: float) -> tuple[str, int]:
    """llama3-8b's shape with as many layers as host memory holds the offloaded state of (fp32
    master, m, v and gradient: 16 bytes/parameter in 60% of host memory), at most its 32."""
    from longtrain.models.sizes import SIZES

    cfg = SIZES["llama3-8b"]
    per_layer = (cfg.num_params() - SIZES["llama3-8b"].vocab_size * cfg.dim * 2) / cfg.n_layers
    fixed = cfg.num_params() - per_layer * cfg.n_layers
    layers = int((0.6 * host_bytes / 16 - fixed) // per_layer)
    return "llama3-8b", max(1, min(cfg.n_layers, layers))


def deepspeed_zero3_offload(model_name: str, n_layers: int, seq_len: int, steps: int) -> dict:
    """The same model and batch under DeepSpeed ZeRO-3 with the optimizer (and its fp32 master
    weights) on the CPU (DeepSpeedCPUAdam), bf16, one process."""
    import deepspeed
    import torch
    import torch.nn.functional as F

    from longtrain.models.registry import build_model
    from longtrain.models.sizes import SIZES
    from longtrain.parallel.activation_checkpoint import apply_activation_checkpoint

    cfg = dataclasses.replace(SIZES[model_name], n_layers=n_layers, max_seq_len=max(seq_len, 128))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed()
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_clipping": 1.0, "bf16": {"enabled": True},
              "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                                    "sub_group_size": 100_000_000},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.95], "weight_decay": 0.1}},
              "activation_checkpointing": {}}
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = build_model(cfg)
    apply_activation_checkpoint(model, "full")  # as the longtrain runs beside it
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    tokens = torch.randint(0, cfg.vocab_size, (1, seq_len + 1), device=engine.device)
    positions = torch.arange(seq_len, device=engine.device)[None]
    times, losses = [], []
    for _ in range(steps):
        _sync()
        t0 = time.perf_counter()
        logits = engine(tokens[:, :-1], positions)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        engine.backward(loss)
        engine.step()
        _sync()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    return {"step_s": statistics.median(times[1:] or times), "repeats_s": times, "losses": losses,
            "peak_device_memory_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None}


def gpu(args) -> dict:
    import torch

    from measure import machine_info

    if not torch.cuda.is_available() and not args.gpu_smoke:
        raise SystemExit("--gpu needs a CUDA device (use --gpu-smoke to run the same code on CPU)")
    from longtrain.models.sizes import SIZES

    deadline = time.time() + args.time_budget_s  # later modes are skipped (and said so) past it
    host_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if args.gpu_model == "auto":
        model, n_layers = _gpu_model(host_bytes)
    else:
        model, n_layers = args.gpu_model, SIZES[args.gpu_model].n_layers
    n = dataclasses.replace(SIZES[model], n_layers=n_layers).num_params()
    out = {"machine": machine_info(), "model": f"{model} with {n_layers} layers", "params": n, "seq_len": args.seq_len,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "modes": {}}
    extra = [f"data.seq_len={args.seq_len}", "data.batch_size=1", "parallel.activation_checkpoint=full",
             f"model.max_seq_len={max(args.seq_len, 128)}", f"model.n_layers={n_layers}"]
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        # An 80 GB device (H100): fp32 weights and gradients (8 B/param) fit beside the
        # activations, AdamW's m and v (8 B/param more) do not once 16 B/param exceed it.
        cap = min(total, args.device_cap_gb * 2**30)
        torch.cuda.set_per_process_memory_fraction(cap / total)
        out["device_memory_cap_bytes"] = cap
        out["adam_state_fits_on_device"] = 16 * n < cap
        extra += ["parallel.mixed_precision=bf16"]
    device_name = "cuda" if torch.cuda.is_available() else "cpu"
    # Exactness of the CUDA code paths (side streams, pinned buffers, async hooks): a small fp32
    # model, every mode against torch.optim.AdamW(fused) on the device.
    exact = train("debug" if torch.cuda.is_available() else "tiny", 5, 200_000 if torch.cuda.is_available() else 20_000,
                  ["data.seq_len=256" if torch.cuda.is_available() else "data.seq_len=32", "parallel.mixed_precision=fp32"],
                  device_name)
    out["exactness_fp32"] = {"losses": {m: r["losses"] for m, r in exact["modes"].items()},
                             "max_relative_loss_difference": max(
                                 abs(a - b) / abs(b) for r in exact["modes"].values()
                                 for a, b in zip(r["losses"], exact["modes"]["none"]["losses"])),
                             "equal_within_1e-6": exact["losses_equal_within_1e-6"]}
    modes = {k: TRAIN_MODES[k] for k in ("cpu", "interleaved_auto")}
    out["modes"].update(train(model, args.gpu_steps, args.subgroup, extra, device_name, modes, deadline,
                              catch_errors=True)["modes"])
    if not args.skip_deepspeed and time.time() > deadline:
        out["modes"]["deepspeed_zero3_offload"] = {"error": "skipped: --time-budget-s spent"}
    elif not args.skip_deepspeed:
        try:
            _release_memory()
            out["modes"]["deepspeed_zero3_offload"] = deepspeed_zero3_offload(model, n_layers, args.seq_len,
                                                                              args.gpu_steps)
        except Exception as err:  # reported, the rest of the run stands
            out["modes"]["deepspeed_zero3_offload"] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
    cpu_s = out["modes"].get("cpu", {}).get("step_s")
    inter_s = out["modes"].get("interleaved_auto", {}).get("step_s")
    ds_s = out["modes"].get("deepspeed_zero3_offload", {}).get("step_s")
    out["speedup_interleaved_over_cpu"] = cpu_s / inter_s if cpu_s and inter_s else None
    out["speedup_interleaved_over_deepspeed"] = ds_s / inter_s if ds_s and inter_s else None
    out["goals"] = {"interleaved_2x_over_cpu": (out["speedup_interleaved_over_cpu"] or 0) >= 2,
                    "interleaved_faster_than_deepspeed": (out["speedup_interleaved_over_deepspeed"] or 0) > 1}
    return out


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def _gb(n) -> str:
    return "-" if n is None else f"{n / 2**30:.3f}"


def markdown(report: dict) -> str:
    lines = ["# Optimizer offloading", ""]
    m = report.get("machine", {})
    share = report.get("other_processes_cpu_share")
    lines += [f"Machine: {m.get('cpu_count')} x {m.get('cpu')}, torch {m.get('torch_version')}, "
              f"{report.get('threads')} thread(s). Command: `{report.get('command')}`. Other processes used "
              f"{'?' if share is None else f'{100 * share:.0f}%'} of the CPUs meanwhile.", ""]
    if "gpu" in report and "exactness_fp32" in report["gpu"]:
        e = report["gpu"]["exactness_fp32"]
        lines += [f"Exactness on {report['gpu']['device']} (fp32, 5 steps, every mode vs torch.optim.AdamW fused): "
                  f"max relative loss difference {e['max_relative_loss_difference']:.2e}, within 1e-6: "
                  f"{e['equal_within_1e-6']}", ""]
    if "host_adam" in report:
        h = report["host_adam"]
        names = list(next(iter(h["params_per_s"].values())))
        lines += ["## Host Adam throughput (Mparams/s)", "", "| params | " + " | ".join(names) + " |",
                  "|---|" + "---|" * len(names)]
        for n, row in h["params_per_s"].items():
            lines.append(f"| {int(n) / 2**20:.0f}M | " + " | ".join(f"{row[k] / 1e6:,.0f}" for k in names) + " |")
        lines.append("")
    if "update" in report:
        u = report["update"]
        lines += [f"## One update: {u['params'] / 2**20:.0f}M parameters, subgroups of {u['subgroup_size'] / 2**20:.0f}M",
                  "", "| mode | stride | device subgroups | measured s | predicted s | error | device state GB | host state GB |",
                  "|---|---|---|---|---|---|---|---|"]
        for mode, r in u["modes"].items():
            pred = r.get("predicted_s")
            err = "-" if pred is None else f"{100 * r['prediction_error']:+.0f}%"
            lines.append(f"| {mode} | {r.get('stride', '-')} | {len(r.get('device_subgroups', [])) if 'stride' in r else '-'} "
                         f"| {r['measured_s']:.4f} | {'-' if pred is None else f'{pred:.4f}'} | "
                         f"{err} | {_gb(r['device'])} | {_gb(r['host'])} |")
        lines.append("")
    for key, title in (("train", "Trainer steps"), ("gpu", "GPU")):
        if key not in report:
            continue
        t = report[key]
        lines += [f"## {title}: model {t.get('model')}" + (f", seq {t['seq_len']}" if "seq_len" in t else ""), "",
                  "| mode | step s | update s | predicted update s | stride | device optimizer GB | host optimizer GB | peak device GB |",
                  "|---|---|---|---|---|---|---|---|"]
        for mode, r in t["modes"].items():
            if "error" in r:
                lines.append(f"| {mode} | {r['error']} |  |  |  |  |  |  |")
                continue
            if "update_s" not in r:  # DeepSpeed: the step only
                lines.append(f"| {mode} | {r['step_s']:.4f} | - | - | - | - | - | {_gb(r.get('peak_device_memory_bytes'))} |")
                continue
            pred = r.get("predicted_update_s")
            lines.append(f"| {mode} | {r['step_s']:.4f} | {r.get('update_s', float('nan')):.4f} | "
                         f"{'-' if pred is None else f'{pred:.4f}'} | {r.get('stride', '-')} | {_gb(r.get('device_bytes'))} "
                         f"| {_gb(r.get('host_bytes'))} | {_gb(r.get('peak_device_memory_bytes'))} |")
        if "losses_equal_within_1e-6" in t:
            lines += ["", f"Losses of every mode equal to `none` within 1e-6: {t['losses_equal_within_1e-6']}"]
        if "speedup_interleaved_over_cpu" in t:
            lines += ["", f"Interleaved over cpu: {t['speedup_interleaved_over_cpu']}; over DeepSpeed ZeRO-3 offload: "
                      f"{t['speedup_interleaved_over_deepspeed']}; goals: {t['goals']}"]
        lines.append("")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from measure import save_figure

    names: list = []
    panels = [k for k in ("host_adam", "update", "train", "gpu") if k in report]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, key in zip(axes[0], panels):
        if key == "host_adam":
            rows = report[key]["params_per_s"]
            impls = list(next(iter(rows.values())))
            for impl in impls:
                ax.plot([int(n) for n in rows], [rows[n][impl] / 1e6 for n in rows], marker="o", label=impl)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("parameters")
            ax.set_ylabel("Mparams/s")
            ax.set_title("host Adam")
        else:
            modes = report[key]["modes"]
            ok = {k: v for k, v in modes.items() if "error" not in v}
            xs = range(len(ok))
            if key == "update":
                series = {"update measured": [v["measured_s"] for v in ok.values()],
                          "update predicted": [v.get("predicted_s") or 0 for v in ok.values()]}
            else:
                series = {"step": [v["step_s"] for v in ok.values()],
                          "update measured": [v.get("update_s") or 0 for v in ok.values()],
                          "update predicted": [v.get("predicted_update_s") or 0 for v in ok.values()]}
            width = 0.8 / len(series)
            for i, (label, values) in enumerate(series.items()):
                ax.bar([x - 0.4 + width * (i + 0.5) for x in xs], values, width=width, label=label)
            ax.set_xticks(list(xs))
            ax.set_xticklabels(list(ok), rotation=20)
            ax.set_ylabel("seconds")
            ax.set_title({"update": "one update", "train": "trainer step", "gpu": "GPU iteration"}[key])
        ax.legend()
        ax.grid(True, alpha=0.3)
    save_figure(fig, path, names, dpi=90)
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--params", type=int, default=8 << 20)
    ap.add_argument("--subgroup", type=int, default=1 << 20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--adam-sizes", default="1048576,4194304,16777216")
    ap.add_argument("--train-model", default="debug")
    ap.add_argument("--train-steps", type=int, default=4)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--gpu-smoke", action="store_true", help="the --gpu code path on CPU with --gpu-model")
    ap.add_argument("--gpu-model", default="auto")
    ap.add_argument("--gpu-steps", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=16384)
    ap.add_argument("--skip-deepspeed", action="store_true")
    ap.add_argument("--time-budget-s", type=float, default=420.0, help="--gpu: start no mode after this")
    ap.add_argument("--device-cap-gb", type=float, default=80.0, help="--gpu: device memory the run may use")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import torch

    from measure import machine_info

    # A probe measured in this run (unless LONGTRAIN_CACHE names a cache): the prediction then
    # rests on the same machine state as the measurements next to it.
    os.environ.setdefault("LONGTRAIN_CACHE", tempfile.mkdtemp(prefix="offload_probe_"))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    from measure import MachineLoad

    load = MachineLoad()
    report = {"machine": machine_info(), "threads": torch.get_num_threads(), "command": " ".join(sys.argv)}
    if args.gpu or args.gpu_smoke:
        report["gpu"] = gpu(args)
        stem = "offload_gpu"
    else:
        report["host_adam"] = host_adam([int(s) for s in args.adam_sizes.split(",")], args.repeats)
        report["update"] = update(args.params, args.subgroup, args.repeats)
        report["train"] = train(args.train_model, args.train_steps, args.subgroup // 4, [])
        stem = "offload"
    report["other_processes_cpu_share"] = load.other_share()
    report["figures"] = plot(report, out_dir / f"{stem}.png")
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2))
    md = markdown(report)
    (out_dir / f"{stem}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
