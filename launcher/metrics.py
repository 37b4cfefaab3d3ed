"""Training metrics: a console line per log step, a progress bar with ETA, `metrics.jsonl` and
TensorBoard event files in the run directory (rank 0 writes; every rank measures).

MFU is achieved model FLOP/s per device over the device's peak: the dense bf16 peak for known
GPUs, or `run.peak_tflops` when given. A CPU has no such number (a matmul rate measured at start
read 124% under load later), so there MFU is not reported (null) unless run.peak_tflops is set.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from longtrain.launcher.log import LOGGER

# Dense bf16 tensor-core peaks, TFLOP/s, by substring of the device name.
GPU_PEAK_TFLOPS = {
    "H200": 989.0, "H100": 989.0, "H800": 989.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0,
    "A800": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0, "V100": 125.0,
}


def device_peak_tflops(device: torch.device, override: float = 0.0) -> float:
    """The peak MFU is measured against: run.peak_tflops, else a known GPU's; 0.0 when there is none
    (a CPU, an unknown GPU), and then MFU is not reported."""
    if override > 0:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_TFLOPS.items():
            if key in name:
                return peak
    return 0.0


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux -> GiB
    except ImportError:  # pragma: no cover - non-Unix
        return 0.0


class MetricsLogger:
    def __init__(self, run_dir: Path, *, is_writer: bool, total_steps: int, start_step: int,
                 tensorboard: bool, progress: bool):
        self.is_writer = is_writer
        self.jsonl = None
        self.tb = None
        self.bar = None
        if not is_writer:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        _drop_records_after(run_dir / "metrics.jsonl", start_step)
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if progress and total_steps > start_step:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, leave=True)

    def log(self, record: dict) -> None:
        if not self.is_writer:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key if "/" in key else f"train/{key}", value, record["step"])
        LOGGER.info(format_line(record))

    def advance(self, step: int, loss: float | None = None) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def write(self, line: str) -> None:
        LOGGER.info(line)  # rank 0's records only (launcher/log.py)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()


def _drop_records_after(path: Path, step: int) -> None:
    """A resumed run replays the steps after its checkpoint: their earlier records go, so that
    every step appears once in metrics.jsonl."""
    if not path.is_file():
        return
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            later = int(json.loads(line).get("step", 0)) > step
        except (ValueError, AttributeError, TypeError):
            # a torn last line of a killed run
            dropped += 1
            continue
        if later:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)


def format_line(r: dict) -> str:
    if "eval_loss" in r:
        return f"step {r['step']:>6}  eval_loss {r['eval_loss']:.4f}"
    return (f"step {r['step']:>6}  loss {r['loss']:.4f}  lr {r['lr']:.2e}  grad_norm {r['grad_norm']:.3f}  "
            f"tok/s {r['tokens_per_second']:,.0f}  TFLOP/s/dev {r['tflops_per_device']:.3f}  "
            f"MFU {'-' if r['mfu'] is None else format(100 * r['mfu'], '.1f') + '%'}  "
            f"mem {r['peak_memory_gb']:.2f} GiB"
            + (f"  update {r['offload_update_s']:.3f}s (predicted {r['offload_update_s_predicted']:.3f}s"
               f", subgroups of {r['offload_subgroup_size']:,})"
               if "offload_update_s" in r else "")
            + (f"  skipped records {r['skipped_records']}" if r.get("skipped_records") else "")
            + (f"  balance: attention max/mean {r['balance/attention_max_over_mean']:.2f}, tokens "
               f"{r['balance/tokens_max_over_mean']:.2f}, rings {r['balance/rings_per_step']:.1f}/step, remapped "
               f"{r['balance/remapped_steps']}/{r['balance/steps']}" if "balance/steps" in r else ""))
