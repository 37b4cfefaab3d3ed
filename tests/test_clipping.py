"""Gradient clipping clips: after clip_grad_norm the gradients' total norm is max_norm whenever it
was larger, for plain tensors and for DTensor gradients (tp/FSDP shards), and the trainer's losses
with clipping active differ from unclipped training. (Clipping was a no-op in every layout: the
gradients, not their parameters, were handed to clip_grads_with_norm_.)"""
import math

import torch
import torch.distributed as dist
from torch import nn

from distributed import run_group
from cases import global_batch, train_cases


def _params_with_grads(seed: int, scale: float) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(8, 4, generator=gen)), nn.Parameter(torch.randn(5, generator=gen))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * scale
    return params


def _total_norm(tensors) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def test_clip_scales_plain_gradients_to_max_norm():
    from longtrain.launcher.trainer import clip_grad_norm

    params = _params_with_grads(0, scale=3.0)
    before = _total_norm(p.grad for p in params)
    assert before > 2.0
    part = nn.Module()
    part.params = nn.ParameterList(params)
    reported = float(clip_grad_norm([part], 1.0, None))
    assert abs(reported - before) <= 1e-5 * before  # the pre-clip norm is what gets logged
    assert abs(_total_norm(p.grad for p in params) - 1.0) < 1e-5


def test_clip_leaves_small_gradients_alone():
    from longtrain.launcher.trainer import clip_grad_norm

    params = _params_with_grads(1, scale=0.01)
    before = [p.grad.clone() for p in params]
    part = nn.Module()
    part.params = nn.ParameterList(params)
    clip_grad_norm([part], 1.0, None)
    for p, g in zip(params, before):
        torch.testing.assert_close(p.grad, g)


def _clip_dtensor_gradients():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from longtrain.launcher.trainer import clip_grad_norm

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    full = _params_with_grads(2, scale=3.0)  # same on every rank
    before = _total_norm(p.grad for p in full)
    part = nn.Module()
    sharded = [nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])) for p in full[:1]]
    for p, f in zip(sharded, full[:1]):
        p.grad = distribute_tensor(f.grad, mesh, [Shard(0)])
    plain = [nn.Parameter(full[1].detach().clone())]
    plain[0].grad = full[1].grad.clone()
    part.sharded = nn.ParameterList(sharded)
    part.plain = nn.ParameterList(plain)
    reported = float(clip_grad_norm([part], 1.0, None))
    after = _total_norm([sharded[0].grad.full_tensor(), plain[0].grad])
    return before, reported, after


def test_clip_scales_dtensor_gradients():
    before, reported, after = run_group(2, _clip_dtensor_gradients)
    assert abs(reported - before) <= 1e-5 * before
    assert abs(after - 1.0) < 1e-5


def test_training_with_active_clipping_differs_from_unclipped():
    steps = ["train.steps=4", "optim.lr=3e-2"] + global_batch(1)
    clipped, unclipped = run_group(1, train_cases, [steps + ["train.grad_clip=0.05"],
                                                    steps + ["train.grad_clip=0"]], False)
    assert clipped["losses"][1] == unclipped["losses"][1]
    assert abs(clipped["losses"][4] - unclipped["losses"][4]) > 1e-3
