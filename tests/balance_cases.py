"""Balance cases that run inside a process group (see distributed.run_group)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def engine_errors(cases: list[dict]) -> list[dict]:
    """For each case {lengths, strategy, capacity, remap, cp, gpus_per_node, heads, kv_heads, v_dim}:
    the balance engine's out, dq, dk, dv against single-device attention of every document (largest
    error over ranks), and what ran (local/ring calls, summed over ranks). `v_dim`: the value head dim
    where it differs from the query/key one (8), as in MLA."""
    from longtrain.kernels.attention import BlockMask, attention
    from longtrain.parallel.balance.engine import BalancedAttention, StepLayout
    from longtrain.parallel.balance.planner import plan_step
    from longtrain.parallel.context.link_emulation import LinkEmulator, emulate_links

    world, rank = dist.get_world_size(), dist.get_rank()
    group = dist.new_group(list(range(world)))
    results = []
    for case in cases:
        lengths = case["lengths"]
        total = sum(lengths)
        heads, kv_heads, dim = case.get("heads", 2), case.get("kv_heads", 1), 8
        v_dim = case.get("v_dim", dim)
        gen = torch.Generator().manual_seed(7)
        q, k, v, dout = (torch.randn(1, total, h, d, generator=gen)
                         for h, d in ((heads, dim), (kv_heads, dim), (kv_heads, v_dim), (heads, v_dim)))
        # the reference: plain causal attention of each document on its own, on one device
        ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
        ref_parts, start = [], 0
        for L in lengths:
            part = [t[:, start:start + L] for t in ref_in]
            ref_parts.append(attention(*part, scale=dim ** -0.5, mask=BlockMask(causal=True), backend="reference"))
            start += L
        ref = torch.cat(ref_parts, dim=1)
        ref.backward(dout)

        cp = case.get("cp", world)
        dp = world // cp
        bins = [i % dp for i in range(len(lengths))]
        plan = plan_step(lengths, world, case["strategy"], capacity=case["capacity"], cp=cp, bins=bins,
                         gpus_per_node=case.get("gpus_per_node", 0), tau_intra=case.get("tau", 0))
        if case.get("reverse_order"):  # any global slot order must be exact: the schedule's, reversed
            plan.set_order({g: i for i, g in enumerate(sorted(plan.order, key=lambda g: -plan.order[g]))})
        layout = StepLayout.build(plan, rank, case.get("remap", True))
        places = [plan.order[s.ranks] for s in layout.slots]
        followed = torch.tensor([float(places == sorted(places) and len(places) == len(set(places)))])
        dist.all_reduce(followed, op=dist.ReduceOp.MIN)
        engine = BalancedAttention(group, list(range(world)), backend="reference", routing=case.get("routing", False))
        engine.set_step(layout)
        ids = torch.from_numpy(layout.linear_ids)
        mine = [t[:, ids].clone().requires_grad_() for t in (q, k, v)]
        emulator = None  # case["links"]: (intra, inter) bytes/s of emulated links (link_emulation.py)
        if case.get("links"):
            emulator = LinkEmulator(*case["links"], ranks_per_node=case.get("gpus_per_node") or world)
        with emulate_links(emulator):
            out = engine(*mine, dim ** -0.5)
            out.backward(dout[:, ids])
        held = torch.tensor([emulator.stats["held_s"] if emulator else 0.0,
                             emulator.stats["messages"] if emulator else 0.0])
        dist.all_reduce(held)
        errors = torch.tensor([(out - ref[:, ids]).abs().max().item() if len(ids) else 0.0]
                              + [(m.grad - r.grad[:, ids]).abs().max().item() if len(ids) else 0.0
                                 for m, r in zip(mine, ref_in)])
        dist.all_reduce(errors, op=dist.ReduceOp.MAX)
        calls = torch.tensor([engine.calls["local"], engine.calls["ring"], engine.calls["remap"], len(ids),
                              engine.calls["routed"]])
        dist.all_reduce(calls)
        results.append({"out": errors[0].item(), "dq": errors[1].item(), "dk": errors[2].item(),
                        "dv": errors[3].item(), "local": int(calls[0]), "ring": int(calls[1]),
                        "remap": int(calls[2]), "tokens": int(calls[3]), "routed": int(calls[4]),
                        "groups": sorted({len(g) for g, _ in plan.groups.values()}),
                        "followed_order": bool(followed.item()),
                        "held_s": held[0].item(), "emulated_messages": int(held[1]),
                        "rings": sorted({g for g, _ in plan.groups.values() if len(g) > 1}),
                        "empty_ranks": int((plan.tokens_per_rank() == 0).sum())})
    return results


# A tiny model on varlen bins of 384 tokens, documents of up to 160: under cp4 a rank holds 1.5 x 96
# tokens, so long documents ring and short ones stay local.
VARLEN = ["model.name=tiny", "data.seq_len=64", "data.packing=varlen", "data.token_budget=384",
          "data.max_doc_len=160", "data.num_workers=0", "train.log_every=1", "run.progress=false",
          "run.tensorboard=false", "checkpoint.save_at_end=false", "optim.warmup_steps=2", "optim.lr=3e-3",
          "train.steps=5", "cluster.preset=local", "checkpoint.resume=never"]


def _last_record(run_dir) -> dict:
    """The last training record of a run's metrics.jsonl (rank 0 wrote it; the run has ended)."""
    import json

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return next((r for r in reversed(records) if "loss" in r), {})


def train_balanced(cases: list) -> list[dict]:
    """Train each case (recipe overrides, or {"overrides", "stop_after", "resume_dir"}) in this group;
    per case the losses, the engine's calls summed over ranks and the last step's plan summary."""
    from longtrain.launcher.config import load_recipe
    from longtrain.launcher.trainer import Trainer

    out = []
    for case in cases:
        if not isinstance(case, dict):
            case = {"overrides": case}
        overrides = VARLEN + list(case["overrides"]) + [f"run.launch.nproc_per_node={dist.get_world_size()}"]
        trainer = Trainer(load_recipe(None, overrides))
        result = trainer.run(stop_after=case.get("stop_after"))
        engine = trainer.parallel.balance_engine
        calls = torch.tensor([engine.calls[k] for k in ("local", "ring", "remap", "routed")] if engine else [0] * 4)
        dist.all_reduce(calls)
        ssm_cores = {id(m.ssm_core): m.ssm_core for part in trainer.parallel.parts for m in part.modules()
                     if hasattr(m, "ssm_core")}
        ssm_calls = torch.tensor([sum(c.calls.get(k, 0) for c in ssm_cores.values() if hasattr(c, "calls"))
                                  for k in ("local", "ring")])
        dist.all_reduce(ssm_calls)
        plan = getattr(trainer.loader, "last_plan", None)
        out.append({"losses": result.losses, "calls": dict(zip(("local", "ring", "remap", "routed"), calls.tolist())),
                    "groups": sorted({len(g) for g, _ in plan.groups.values()}) if plan else [],
                    "levels": sorted({lvl for _, lvl in plan.groups.values()}) if plan else [],
                    "cursor": trainer.loader.state_dict()["cursor"],
                    "remapped_steps": getattr(trainer.loader, "remapped_steps", 0),
                    "ssm_calls": dict(zip(("local", "ring"), ssm_calls.tolist())),
                    "ssm_core": sorted({type(c).__name__ for c in ssm_cores.values()}),
                    "contiguous": bool(plan.contiguous) if plan else None,
                    "last_step_empty_ranks": int((plan.tokens_per_rank() == 0).sum()) if plan else 0,
                    "last_record": _last_record(trainer.run_dir)})
        dist.barrier()
    return out


def ssm_errors(cases: list[dict]) -> list[dict]:
    """For each case {lengths, strategy, capacity, remap, tau, gpus_per_node, d_conv}: a Mamba-2 mixer
    under the balance engine's layout (BalancedSSMCore, contiguous chunks) against the same mixer on
    one device over the packed row (doc ids reset the conv and the scan at each sequence): out, the
    input gradient (largest error over ranks) and the parameter gradients (summed over ranks; error
    relative to each gradient's largest entry); and
    what ran (local / ring slots, summed over ranks)."""
    from longtrain.models.mamba import Mamba2Mixer, MambaConfig
    from longtrain.parallel.balance.engine import BalancedAttention, StepLayout
    from longtrain.parallel.balance.planner import plan_step
    from longtrain.parallel.balance.ssm import BalancedSSMCore

    world, rank = dist.get_world_size(), dist.get_rank()
    group = dist.new_group(list(range(world)))
    results = []
    for case in cases:
        lengths = case["lengths"]
        total = sum(lengths)
        torch.manual_seed(3)
        mixer = Mamba2Mixer(MambaConfig(dim=16, d_state=8, d_conv=case.get("d_conv", 4), expand=2, headdim=8,
                                        ngroups=2, chunk_size=16)).double()
        gen = torch.Generator().manual_seed(7)
        hidden = torch.randn(1, total, 16, generator=gen, dtype=torch.float64)
        dout = torch.randn(1, total, 16, generator=gen, dtype=torch.float64)
        doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
        ref_in = hidden.clone().requires_grad_()
        ref = mixer(ref_in, doc_ids=doc)
        ref.backward(dout)
        ref_grads = [p.grad.clone() for p in mixer.parameters()]
        mixer.zero_grad()

        plan = plan_step(lengths, world, case["strategy"], capacity=case["capacity"], cp=world,
                         gpus_per_node=case.get("gpus_per_node", 0), tau_intra=case.get("tau", 0), contiguous=True)
        layout = StepLayout.build(plan, rank, case.get("remap", True))
        engine = BalancedAttention(group, list(range(world)), backend="reference")
        engine.set_step(layout)
        core = BalancedSSMCore(engine, backend="reference")
        mixer.ssm_core = core
        ids = torch.from_numpy(layout.linear_ids)
        mine = hidden[:, ids].clone().requires_grad_()
        out = mixer(mine, doc_ids=doc[:, ids])
        out.backward(dout[:, ids])
        grads = [p.grad.clone() for p in mixer.parameters()]
        for gr in grads:
            dist.all_reduce(gr)
        errors = torch.tensor([(out - ref[:, ids]).abs().max().item() if len(ids) else 0.0,
                               (mine.grad - ref_in.grad[:, ids]).abs().max().item() if len(ids) else 0.0,
                               max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(grads, ref_grads))],
                              dtype=torch.float64)
        dist.all_reduce(errors, op=dist.ReduceOp.MAX)
        calls = torch.tensor([core.calls["local"], core.calls["ring"]])
        dist.all_reduce(calls)
        results.append({"out": errors[0].item(), "dx": errors[1].item(), "dparams": errors[2].item(),
                        "local": int(calls[0]), "ring": int(calls[1]),
                        "groups": sorted({len(g) for g, _ in plan.groups.values()}),
                        "empty_ranks": int((plan.tokens_per_rank() == 0).sum())})
    return results


def emulated_exchanges(links: tuple, ranks_per_node: int, nbytes: int) -> dict:
    """Ring exchanges and one remap exchange over emulated links (link_emulation.py), on every rank:
    what arrived (exact?), how long each took and what the emulator says it held. One exchange of
    `nbytes` round the whole ring; then two started back to back (they queue on the sender's link);
    a routed ring (refused under emulation); an all_to_all of the remap (TokenExchange)."""
    import time

    from longtrain.parallel.balance.remap import Route, TokenExchange
    from longtrain.parallel.balance.routing import Router
    from longtrain.parallel.context.comm import RingExchange, SubRing
    from longtrain.parallel.context.link_emulation import LinkEmulator, emulate_links

    world, rank = dist.get_world_size(), dist.get_rank()
    group = dist.new_group(list(range(world)))
    emulator = LinkEmulator(*links, ranks_per_node=ranks_per_node)
    block = torch.full((nbytes // 4,), float(rank))
    out = {"rank": rank, "prev": (rank - 1) % world}
    with emulate_links(emulator):
        ring = RingExchange(group)
        dist.barrier()
        start = time.monotonic()
        (got,) = RingExchange.finish(ring.start([block]))
        out["one_s"] = time.monotonic() - start
        out["exact"] = bool(torch.equal(got, torch.full_like(block, float((rank - 1) % world))))
        dist.barrier()
        start = time.monotonic()
        first, second = ring.start([block]), ring.start([block * 2])
        (a,), (b,) = RingExchange.finish(first), RingExchange.finish(second)
        out["two_s"] = time.monotonic() - start
        out["exact"] &= bool(torch.equal(b, 2 * a))
        nodes = tuple(r // ranks_per_node for r in range(world))
        try:
            RingExchange(SubRing(group, tuple(range(world)), Router(group, tuple(range(world)), nodes))).start([block])
            out["routed_error"] = None
        except ValueError as err:
            out["routed_error"] = str(err)
        # the remap's all_to_all: every rank sends its whole block to the next rank
        to_next = [0] * world
        to_next[(rank + 1) % world] = nbytes // 4
        from_prev = [0] * world
        from_prev[(rank - 1) % world] = nbytes // 4
        route = Route(torch.arange(nbytes // 4), to_next, from_prev, torch.arange(nbytes // 4))
        back = Route(torch.arange(nbytes // 4), from_prev, to_next, torch.arange(nbytes // 4))
        dist.barrier()
        held_before = emulator.stats["held_s"]
        start = time.monotonic()
        moved = TokenExchange.apply(block[None, :, None], route, back, group)
        out["a2a_s"] = time.monotonic() - start
        out["a2a_held_s"] = emulator.stats["held_s"] - held_before
        out["exact"] &= bool(torch.equal(moved.flatten(), torch.full_like(block, float((rank - 1) % world))))
        # every other rank sends its block to rank 0, which sends nothing: it is held for all it receives
        to_zero = [nbytes // 4 if (p == 0 and rank != 0) else 0 for p in range(world)]
        into_zero = [nbytes // 4 if (rank == 0 and p != 0) else 0 for p in range(world)]
        n_in = sum(into_zero)
        route = Route(torch.arange(sum(to_zero)), to_zero, into_zero, torch.arange(n_in))
        back = Route(torch.arange(n_in), into_zero, to_zero, torch.arange(sum(to_zero)))
        dist.barrier()
        held_before = emulator.stats["held_s"]
        gathered = TokenExchange.apply(block[None, :sum(to_zero), None], route, back, group)
        out["gather_held_s"] = emulator.stats["held_s"] - held_before
        if rank == 0:
            out["exact"] &= bool(torch.equal(gathered.flatten(), torch.cat(
                [torch.full((nbytes // 4,), float(p)) for p in range(1, world)])))
    out["stats"] = dict(emulator.stats)
    every = [None] * world
    dist.all_gather_object(every, out)
    return every
