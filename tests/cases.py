"""Training cases that run inside a process group (see distributed.run_group)."""
from __future__ import annotations

import torch
import torch.distributed as dist

# A tiny model on short sequences: seconds per case on CPU.
TINY = ["model.name=tiny", "data.seq_len=32", "train.log_every=1", "run.progress=false",
        "run.tensorboard=false", "checkpoint.save_at_end=false", "optim.warmup_steps=2", "optim.lr=3e-3"]


def global_batch(dp: int, global_sequences: int = 8) -> list[str]:
    return [f"data.batch_size={global_sequences // dp}"]


def full_weights(trainer) -> dict[str, torch.Tensor]:
    """Every parameter of the model as one full tensor, gathered from all ranks (tiny models only)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    local = {}
    for part in trainer.parts:
        sd = get_model_state_dict(part, options=StateDictOptions(full_state_dict=True))
        local.update({k: v.detach().cpu().clone() for k, v in sd.items()})
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    merged = {}
    for part in gathered:
        merged.update(part)
    return merged


def train_cases(cases: list, want_weights: bool = True) -> list[dict]:
    """Train each case in this process group; a case is a list of recipe overrides, or a dict
    {"overrides": [...], "stop_after": k}. Returns per-case losses and final full weights
    (identical on every rank)."""
    from longtrain.launcher.config import load_recipe
    from longtrain.launcher.trainer import Trainer

    out = []
    for case in cases:
        if not isinstance(case, dict):
            case = {"overrides": case}
        overrides = TINY + list(case["overrides"]) + [f"run.launch.nproc_per_node={dist.get_world_size()}"]
        trainer = Trainer(load_recipe(None, overrides))
        result = trainer.run(stop_after=case.get("stop_after"))
        out.append({"losses": result.losses, "eval_losses": result.eval_losses,
                    "weights": full_weights(trainer) if want_weights else None,
                    "last_step": result.last_step, "stopped": result.stopped_by_signal})
        dist.barrier()
    return out


def failed_save_keeps_previous(ckpt_dir: str) -> dict:
    """Train 4 steps saving every 2; make the step-4 save die midway; report what is on disk and
    what a resume finds."""
    import torch.distributed.checkpoint as dcp

    from longtrain.launcher import checkpoint as ckpt_mod
    from longtrain.launcher.config import load_recipe
    from longtrain.launcher.trainer import Trainer

    recipe = load_recipe(None, TINY + ["train.steps=4", "checkpoint.every=2", f"checkpoint.dir={ckpt_dir}",
                                       "checkpoint.save_at_end=true"])
    real_save = dcp.save

    def dying_save(state, checkpoint_id):
        if "00000004" in str(checkpoint_id):
            real_save({"model": state["model"]}, checkpoint_id=checkpoint_id)  # some shards written...
            raise OSError("disk full (simulated)")  # ...then the save dies
        return real_save(state, checkpoint_id=checkpoint_id)

    ckpt_mod.dcp.save = dying_save
    error = None
    try:
        Trainer(recipe).run()
    except ckpt_mod.CheckpointError as err:  # one line, the partial save removed
        error = str(err)
    finally:
        ckpt_mod.dcp.save = real_save
    resume_dir = ckpt_mod.find_resume_dir(ckpt_dir, "auto")
    resumed = Trainer(load_recipe(None, TINY + ["train.steps=4", f"checkpoint.dir={ckpt_dir}"]))
    resumed.maybe_resume(_Silent())
    return {"error": error, "resume_dir": str(resume_dir), "resumed_step": resumed.step}


class _Silent:
    def write(self, line):
        pass


def cp_attention_errors(cases: list[dict]) -> list[dict]:
    """For each case: one global q, k, v, dout (broadcast from rank 0), sharded as the mode lays
    tokens out; the cp strategy's out and dq, dk, dv against single-device attention. Returns the
    max abs errors per case (on rank 0, over all ranks)."""
    from longtrain.kernels.attention import BlockMask, attention
    from longtrain.parallel.context.layout import dense_index, packed_index, padded_length
    from longtrain.parallel.context.strategy import build_strategy
    from longtrain.parallel.mesh import Mesh, ParallelDims

    world = dist.get_world_size()
    mesh = Mesh(ParallelDims(pp=1, dp_replicate=1, dp_shard=1, cp=world, tp=1), "cpu")
    results = []
    for case in cases:
        b, s, h, hkv, d = case["shape"]
        dtype = case.get("dtype", torch.float32)
        gen = torch.Generator().manual_seed(case.get("seed", 0))
        q, k, v, dout = (torch.randn(b, s, n, d, generator=gen, dtype=torch.float64) for n in (h, hkv, hkv, h))
        for t in (q, k, v, dout):
            dist.broadcast(t, src=0)  # one global input, as users would have
        docs = case.get("doc_lengths")  # per row: document lengths (padding -1 fills the rest)
        doc_ids = positions = None
        if docs is not None:
            doc_ids = torch.full((b, s), -1, dtype=torch.long)
            positions = torch.zeros((b, s), dtype=torch.long)
            for row, lengths in enumerate(docs):
                start = 0
                for i, length in enumerate(lengths):
                    doc_ids[row, start:start + length] = i
                    positions[row, start:start + length] = torch.arange(length)
                    start += length
        causal = case.get("causal", True)
        # single-device reference (fp64 inputs, reference backend; cast to the case dtype first)
        ref_inputs = [t.to(dtype).double().requires_grad_() for t in (q, k, v)]
        mask = BlockMask(causal=causal) if doc_ids is None else BlockMask(
            causal=causal, q_pos=positions, k_pos=positions, q_doc=doc_ids, k_doc=doc_ids)
        ref_out = attention(*ref_inputs, scale=0.3, mask=mask, backend="reference")
        ref_grads = torch.autograd.grad(ref_out, ref_inputs, dout)

        strategy = build_strategy(mesh, case["mode"], heads=h, kv_heads=hkv,
                                  ulysses_degree=case.get("ulysses", 0), backend=case.get("backend", "auto"),
                                  causal=causal, kv_chunks=case.get("kv_chunks", 1))
        shape, rank = strategy.shape, mesh.local_rank("cp")
        if doc_ids is None:
            padded = padded_length(s, shape)
            index = dense_index(s, shape)[rank].expand(b, -1)
        else:
            full_index, padded = packed_index(doc_ids, shape)
            index = full_index[:, rank]

        def pad(t, fill=0.0):
            extra = padded - s
            if extra == 0:
                return t
            tail = torch.full((t.shape[0], extra, *t.shape[2:]), fill, dtype=t.dtype)
            return torch.cat([t, tail], dim=1)

        def take(t):
            idx = index.reshape(b, -1, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])
            return torch.gather(pad(t), 1, idx)

        local = [take(t).to(dtype).requires_grad_() for t in (q, k, v)]
        kwargs = {}
        if doc_ids is not None:
            kwargs = {"positions": take(positions), "doc_ids": torch.gather(pad(doc_ids, -1), 1, index)}
        else:
            kwargs = {"positions": index.clone(), "seq_len": s}
        import longtrain.kernels.attention as kernel

        dense_limit = kernel.DENSE_MASK_MAX_ELEMENTS
        kernel.DENSE_MASK_MAX_ELEMENTS = case.get("dense_mask_max", dense_limit)  # 0: packed blocks in pieces
        try:
            out = strategy(*local, 0.3, **kwargs)
            grads = torch.autograd.grad(out, local, take(dout).to(dtype))
        finally:
            kernel.DENSE_MASK_MAX_ELEMENTS = dense_limit
        real = (index < s)
        if doc_ids is not None:
            real &= torch.gather(pad(doc_ids, -1), 1, index) >= 0
        errors = {}
        for name, got, want in [("out", out, ref_out), ("dq", grads[0], ref_grads[0]),
                                ("dk", grads[1], ref_grads[1]), ("dv", grads[2], ref_grads[2])]:
            diff = (got.double() - take(want.detach())).abs()[real]
            err = torch.tensor(float(diff.max()) if diff.numel() else 0.0, dtype=torch.float64)
            dist.all_reduce(err, op=dist.ReduceOp.MAX)
            errors[name] = float(err)
        errors["ref_scale"] = float(ref_out.abs().max())
        if case.get("single_device_error"):  # the same dtype on one device, whole sequence
            single = [t.to(dtype).requires_grad_() for t in (q, k, v)]
            s_out = attention(*single, scale=0.3, mask=mask, backend=case.get("backend", "auto"))
            s_grads = torch.autograd.grad(s_out, single, dout.to(dtype))
            for name, got, want in [("out", s_out, ref_out), ("dq", s_grads[0], ref_grads[0]),
                                    ("dk", s_grads[1], ref_grads[1]), ("dv", s_grads[2], ref_grads[2])]:
                errors["single_" + name] = float((got.double() - want.detach()).abs().max())
        results.append(errors)
    return results


def ssm_cp_errors(cases: list[dict]) -> list[dict]:
    """For each case: a Mamba-2 mixer and one global input (broadcast), each cp rank its
    contiguous shard (padded at the end when the length does not divide), the context-parallel
    core installed; outputs, input gradients and every parameter gradient against one device."""
    import copy

    from longtrain.models.mamba import Mamba2Mixer, MambaConfig
    from longtrain.parallel.context.ssm import build_ssm_core
    from longtrain.parallel.mesh import Mesh, ParallelDims

    world = dist.get_world_size()
    mesh = Mesh(ParallelDims(pp=1, dp_replicate=1, dp_shard=1, cp=world, tp=1), "cpu")
    rank = mesh.local_rank("cp")
    results = []
    for case in cases:
        torch.manual_seed(case.get("seed", 0))
        cfg = MambaConfig(dim=case.get("dim", 16), d_state=8, d_conv=4, expand=2, headdim=case.get("headdim", 8),
                          ngroups=case.get("ngroups", 1), chunk_size=case.get("chunk", 5))
        ref = Mamba2Mixer(cfg).double()
        for p in ref.parameters():  # every parameter random, identical on all ranks
            p.data.copy_(torch.randn(p.shape, dtype=p.dtype) * 0.3)
            dist.broadcast(p.data, src=0)
        with torch.no_grad():
            ref.A_log.copy_(torch.rand(ref.A_log.shape, dtype=torch.float64).log())
            dist.broadcast(ref.A_log, src=0)
        b, length = 2, case["length"]
        hidden = torch.randn(b, length, cfg.dim, dtype=torch.float64)
        dout = torch.randn(b, length, cfg.dim, dtype=torch.float64)
        dist.broadcast(hidden, src=0)
        dist.broadcast(dout, src=0)
        doc_ids = None
        if case.get("doc_lengths"):
            doc_ids = torch.full((b, length), -1, dtype=torch.long)
            for row, lengths in enumerate(case["doc_lengths"]):
                start = 0
                for i, n in enumerate(lengths):
                    doc_ids[row, start:start + n] = i
                    start += n
        x_ref = hidden.clone().requires_grad_()
        out_ref = ref(x_ref, doc_ids=doc_ids)
        out_ref.backward(dout)

        local = copy.deepcopy(ref)
        local.zero_grad()
        local.ssm_core = build_ssm_core(case["mode"], mesh, backend="torch")
        shard = -(-length // world)
        padded = shard * world

        def pad(t, fill):
            extra = padded - length
            if not extra:
                return t
            return torch.cat([t, torch.full((b, extra, *t.shape[2:]), fill, dtype=t.dtype)], dim=1)

        mine = slice(rank * shard, (rank + 1) * shard)
        x_local = pad(hidden, 0.0)[:, mine].clone().requires_grad_()
        ids_local = pad(doc_ids, -1)[:, mine] if doc_ids is not None else None
        out_local = local(x_local, doc_ids=ids_local)
        out_local.backward(pad(dout, 0.0)[:, mine])
        real = (torch.arange(padded)[mine] < length)
        errors = {"out": float((out_local - pad(out_ref.detach(), 0.0)[:, mine])[:, real].abs().max()),
                  "dx": float((x_local.grad - pad(x_ref.grad, 0.0)[:, mine])[:, real].abs().max())}
        worst = 0.0
        for (name, p_ref), p in zip(ref.named_parameters(), local.parameters()):
            grad = p.grad.clone()
            dist.all_reduce(grad)  # the parameter gradient is the sum over cp shards
            worst = max(worst, float((grad - p_ref.grad).abs().max() / (p_ref.grad.abs().max() + 1e-12)))
        errors["params_rel"] = worst
        for key in list(errors):
            t = torch.tensor(errors[key], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            errors[key] = float(t)
        results.append(errors)
    return results


def applied_features(cases: list) -> list[dict]:
    """What a layout really applied, measured on one forward of each case's trainer: blocks wrapped
    for activation checkpointing, whether FSDP left the blocks' parameters gathered after forward
    (reshard_after_forward: false) or sharded again, and the sequence length the first block's norm
    ran on (sequence parallel: the tp shard of the sequence)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from torch.distributed.tensor import DTensor

    from longtrain.launcher.config import load_recipe
    from longtrain.launcher.trainer import Trainer

    out = []
    for overrides in cases:
        trainer = Trainer(load_recipe(None, TINY + list(overrides) + [f"run.launch.nproc_per_node={dist.get_world_size()}"]))
        model = trainer.parts[0]
        wrapped = sum(isinstance(m, CheckpointWrapper) for m in model.modules())
        first = next(iter(model.layers.values()))
        norm = next(m for name, m in first.named_modules() if name.endswith("norm") and "mixer" not in name)
        seen = []
        handle = norm.register_forward_hook(lambda _m, _i, o: seen.append(
            (o.to_local() if isinstance(o, DTensor) else o).shape[1]))
        batch = trainer._local_batch(next(trainer.loader))
        model(batch["tokens"], *trainer._meta(batch))
        handle.remove()
        sharded_after_forward = isinstance(next(first.parameters()), DTensor)
        out.append({"checkpoint_wrapped": wrapped, "blocks": len(model.layers), "norm_seq_len": seen[0],
                    "sharded_after_forward": sharded_after_forward})
        dist.barrier()
    return out


def optimizer_settings(cases: list) -> list[dict]:
    """The AdamW implementation each case's trainer built (fused or foreach)."""
    from longtrain.launcher.config import load_recipe
    from longtrain.launcher.trainer import Trainer

    out = []
    for overrides in cases:
        trainer = Trainer(load_recipe(None, TINY + list(overrides)))
        defaults = trainer.optimizers[0].defaults
        out.append({"fused": bool(defaults.get("fused")), "foreach": bool(defaults.get("foreach"))})
    return out


def compiled_blocks(overrides: list) -> int:
    """How many of the trainer's blocks torch.compile wrapped."""
    from longtrain.launcher.config import load_recipe
    from longtrain.launcher.trainer import Trainer

    trainer = Trainer(load_recipe(None, TINY + list(overrides)))
    return sum(type(block).__name__ == "OptimizedModule" for block in trainer.parts[0].layers.values())


def stage_sublayers(overrides: list) -> list:
    """Per rank, {layer key: the sublayers its pipeline stage runs} as the trainer built it."""
    from longtrain.launcher.config import load_recipe
    from longtrain.launcher.trainer import Trainer

    trainer = Trainer(load_recipe(None, TINY + list(overrides) + [f"run.launch.nproc_per_node={dist.get_world_size()}"]))
    mine = {key: sorted(name for name in block.SUBLAYERS if getattr(block, name) is not None)
            for part in trainer.parts for key, block in part.layers.items()}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone
