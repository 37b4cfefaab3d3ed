"""What one training step of a layout costs each rank: memory (parameters, gradients, optimizer
state, activations by layer kind, attention/SSM workspaces, logits) and time (compute by kind,
collectives, pipeline bubble). Pure arithmetic on the model config and the layout: no process,
no tensor. `longtrain plan` (launcher/plan.py) ranks layouts with it; benchmarks/plan_validation.py
checks it against measured tensor memory.

Activations are counted as the tensors autograd saves, op by op, in the model code as written
(models/transformer.py, models/mamba.py, kernels/ssd.py), in three precision regimes:

- `fp32`:      everything fp32 (CPU);
- `autocast`:  fp32 parameters, bf16 autocast (one GPU without FSDP): every nn.Linear casts its
               input to bf16 again (q, k and v projections: three copies of the normed input),
               weights cast once per step and cached; norms and the residual stream stay fp32;
- `bf16`:      FSDP2 mixed precision: bf16 parameters in compute, the residual stream bf16, norms
               compute in fp32, fp32 master shards, gradients reduced in fp32.

Per sublayer (a `norm -> mixer` residual branch; a transformer block is attention + MLP, a
hybrid stack one per symbol), T tokens on this rank, d model dim, elements x bytes:
  norm:       input x (T_sp d r') + the fp32 normalized y (T_sp d 4); T_sp = T/tp under sequence
              parallel; r' = 4 (the fp32 view of the input; a fresh copy when the stream is bf16)
  linear in:  the (gathered) norm output, T d, once per consuming linear under autocast, else once
  attention:  q, k, v after RoPE, out (c), lse (T h 4), RoPE cos/sin (2 T hd 4)
  MLP:        gate, silu(gate), up, product: 4 T F/tp (c)
  Mamba-2:    see `_mamba_saved`
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from longtrain.models.parallel_plan import even_layer_split

GiB = 2 ** 30


@dataclass
class Layout:
    """Degrees and the switches that change memory or time."""
    tp: int = 1
    cp: int = 1
    pp: int = 1
    dp_shard: int = 1
    dp_replicate: int = 1
    sequence_parallel: bool = True
    activation_checkpoint: str = "none"  # none | full | every_k
    activation_checkpoint_every: int = 2
    pp_schedule: str = "1f1b"
    pp_microbatches: int = 0  # 0: pp x pp_stages_per_rank
    pp_stages_per_rank: int = 1
    cp_mode: str = "ulysses"  # resolved mode: ring | zigzag | ulysses | hybrid | allgather
    cp_ulysses_degree: int = 1  # hybrid: ranks per Ulysses group
    cp_kv_chunks: int = 1
    reshard_after_forward: bool = True

    @property
    def world(self) -> int:
        return self.tp * self.cp * self.pp * self.dp_shard * self.dp_replicate

    @property
    def fsdp(self) -> int:
        return self.dp_shard * self.cp

    @property
    def microbatches(self) -> int:
        return self.pp_microbatches or self.pp * self.pp_stages_per_rank

    def describe(self) -> str:
        parts = [f"{k}{getattr(self, k)}" for k in ("pp", "dp_replicate", "dp_shard", "cp", "tp") if getattr(self, k) > 1]
        text = " x ".join(parts) or "single"
        if self.activation_checkpoint != "none":
            text += f", ac {self.activation_checkpoint}" + (f"/{self.activation_checkpoint_every}"
                                                            if self.activation_checkpoint == "every_k" else "")
        if self.cp > 1:
            text += f", cp {self.cp_mode}"
        return text


@dataclass
class Workload:
    seq_len: int
    batch_size: int = 1  # sequences per data-parallel rank per step
    grad_accum: int = 1
    precision: str = "fp32"  # fp32 | autocast | bf16 (see the module docstring)
    fused_optimizer: bool = False  # fused AdamW: no full-size temporaries in the step
    # train.loss_chunk_tokens where the trainer applies it (pp 1), else 0: the full logits
    loss_chunk_tokens: int = 0


@dataclass
class Hardware:
    """What the time model needs of one accelerator and its links."""
    name: str
    peak_tflops: float  # dense bf16 (or the fp32 peak for CPU presets)
    memory_gib: float
    hbm_gbps: float  # memory bandwidth, GB/s
    intra_node_gbps: float  # per-GPU one-way bandwidth inside a node (NVLink), GB/s
    inter_node_gbps: float  # per-GPU one-way bandwidth across nodes (IB/RoCE), GB/s
    gpus_per_node: int = 8
    matmul_efficiency: float = 0.6  # achieved / peak for large bf16 matmuls
    attention_efficiency: float = 0.34  # achieved / peak for fused causal attention fwd+bwd
    collective_latency_s: float = 20e-6


@dataclass
class MemoryEstimate:
    """Bytes on the busiest rank; `parts` by category, `by_rank` the peak of every pipeline rank."""
    parts: dict = field(default_factory=dict)
    peak_bytes: float = 0.0
    pp_rank: int = 0
    by_rank: list = field(default_factory=list)
    phase: str = ""

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GiB


# ----------------------------------------------------------------------------------------------
# Model shape helpers (work on TransformerConfig and HybridConfig)
# ----------------------------------------------------------------------------------------------
def layer_kinds(cfg) -> list[str]:
    """One entry per layer: 'T' (attention + MLP block) or a hybrid symbol 'M', '*', '-'."""
    return list(cfg.layer_kinds)


def _sublayers(kind: str) -> list[str]:
    return ["*", "-"] if kind == "T" else [kind]


def _param_count(cfg, kind: str) -> int:
    """Parameters of one layer of a kind (norm weights included)."""
    d = cfg.dim
    if kind in ("*", "-", "T"):
        hd = d // cfg.n_heads
        attn = d * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + d
        mlp = 3 * d * cfg.ffn_dim + d
        return {"*": attn, "-": mlp, "T": attn + mlp}[kind]
    E, h, gn, k = cfg.d_inner, cfg.mamba_heads, cfg.ngroups * cfg.d_state, cfg.d_conv
    conv_ch = E + 2 * gn
    bias = conv_ch if cfg.conv_bias else 0
    return d + d * (2 * E + 2 * gn + h) + conv_ch * k + bias + 3 * h + E + E * d


def _tp_sharded_fraction(cfg, kind: str) -> float:
    """Share of a layer's parameters that tensor parallel splits (norm weights are replicated)."""
    total = _param_count(cfg, kind)
    replicated = cfg.dim * len(_sublayers(kind))
    return (total - replicated) / total


def stage_layers(cfg, n_stages: int) -> list[list[int]]:
    """Layer ids per pipeline stage, as the model splits them (models: `pipeline_stages`); a layout
    whose stage count a hybrid's '|' marks do not match is modelled with the even split."""
    try:
        stages = cfg.pipeline_stages(n_stages)
    except ValueError:
        stages = even_layer_split(cfg.n_layers, n_stages)
    return [list(r) for r in stages]


# ----------------------------------------------------------------------------------------------
# Activations: what autograd saves per sublayer
# ----------------------------------------------------------------------------------------------
def _elem(precision: str) -> tuple[int, int]:
    """(compute element bytes, residual-stream element bytes)."""
    return {"fp32": (4, 4), "autocast": (2, 4), "bf16": (2, 2)}[precision]


def _norm_and_input(cfg, tokens: float, lay: Layout, precision: str, consumers: int) -> float:
    """A pre-norm: its saved input and normalized output, plus the mixer input the linears save."""
    c, r = _elem(precision)
    d = cfg.dim
    t_sp = tokens / lay.tp if (lay.tp > 1 and lay.sequence_parallel) else tokens
    norm = t_sp * d * 4 + t_sp * d * 4 + t_sp * 4  # fp32 view/copy of x, y = x * rsqrt, rsqrt
    copies = consumers if precision == "autocast" else 1
    return norm + copies * tokens * d * c


def _attention_saved(cfg, tokens: float, lay: Layout, precision: str) -> tuple[float, float]:
    """(saved bytes, transient workspace bytes) of one attention sublayer on `tokens` local tokens."""
    c, _ = _elem(precision)
    hd = cfg.dim // cfg.n_heads
    h, hkv = cfg.n_heads / lay.tp, cfg.n_kv_heads / lay.tp
    if lay.cp > 1 and lay.cp_mode in ("ulysses", "hybrid"):
        u = lay.cp if lay.cp_mode == "ulysses" else lay.cp_ulysses_degree
        hkv_rep = hkv if hkv % u == 0 else hkv * (u / math.gcd(u, int(hkv)))
        hkv_eff = hkv_rep  # K/V heads replicated up to the Ulysses degree when fewer
    else:
        hkv_eff = hkv
    saved = _norm_and_input(cfg, tokens, lay, precision, consumers=1)  # one fused Q/K/V projection
    saved += 2 * tokens * hd * 4  # RoPE cos, sin (fp32)
    saved += tokens * hd * (2 * h + 2 * hkv_eff) * c  # q, k, v after RoPE, out
    saved += tokens * h * 4  # logsumexp
    work = 0.0
    if lay.cp > 1:
        kv = tokens * hkv * hd * c * 2
        if lay.cp_mode in ("ring", "zigzag", "hybrid"):
            work = 2 * kv / lay.cp_kv_chunks  # the K/V block in flight and the one being used
        elif lay.cp_mode == "allgather":
            work = kv * lay.cp  # every rank's K/V gathered
        if lay.cp_mode in ("ulysses", "hybrid"):
            work += tokens * hd * (2 * h + 2 * hkv_eff) * c  # all-to-all send/receive buffers
    return saved, work


def _mlp_saved(cfg, tokens: float, lay: Layout, precision: str) -> float:
    c, _ = _elem(precision)
    return _norm_and_input(cfg, tokens, lay, precision, consumers=2) + 4 * tokens * cfg.ffn_dim / lay.tp * c


def _mamba_saved(cfg, tokens: float, lay: Layout, precision: str) -> float:
    """Mamba-2 (models/mamba.py, chunked SSD in kernels/ssd.py), heads split by tp. Counted from the
    code: projections dt (2 T h), conv input padded and output, its silu (C channels), SSD chunk
    matrices (3 T h Q, T g Q, 4 T g n), the chunk states ((2c+1) h p n), x/y in chunks and the gated
    norm and output projection (9 T E), plus small per-head terms. The scan runs in fp32."""
    tp = lay.tp
    E, h, g = cfg.d_inner / tp, cfg.mamba_heads / tp, cfg.ngroups / tp
    n, p, Q, k = cfg.d_state, cfg.mamba_headdim, cfg.chunk_size, cfg.d_conv
    C = E + 2 * g * n
    T = tokens
    chunks = math.ceil(T / Q)
    elems = (4 * T * h + C * (T + k - 1) + 2 * T * C + 3 * T * h * Q + 4 * T * g * n + T * g * Q + 9 * T * E
             + (2 * chunks + 1) * h * p * n + T * g)
    return _norm_and_input(cfg, tokens, lay, precision, consumers=1) + elems * 4


def sublayer_activation(cfg, kind: str, tokens: float, lay: Layout, precision: str) -> tuple[float, float]:
    """(saved bytes, workspace bytes) of one sublayer of kind '*', '-' or 'M'."""
    if kind == "*":
        return _attention_saved(cfg, tokens, lay, precision)
    if kind == "-":
        return _mlp_saved(cfg, tokens, lay, precision), 0.0
    return _mamba_saved(cfg, tokens, lay, precision), 0.0


def layer_activation(cfg, kind: str, tokens: float, lay: Layout, precision: str) -> tuple[float, float]:
    saved, work = 0.0, 0.0
    for sub in _sublayers(kind):
        s, w = sublayer_activation(cfg, sub, tokens, lay, precision)
        saved, work = saved + s, max(work, w)
    return saved, work


def _checkpointed(lay: Layout, layer_id: int) -> bool:
    a = lay.activation_checkpoint
    return a == "full" or (a == "every_k" and layer_id % lay.activation_checkpoint_every == 0)


def _layer_backward_transient(cfg, kind: str, tokens: float, lay: Layout, precision: str) -> float:
    """Gradients alive inside one layer's backward beyond what it saved and its parameter
    gradients (measured op by op on CPU, tests/test_plan.py): the MLP's widest gradient (T x F)
    and two of the residual stream; attention the gradient of the fused Q/K/V output, one of the
    attention output's width and one of the stream; Mamba-2 two of width d_inner (fp32 scan) and
    one of the stream."""
    c, r = _elem(precision)
    stream = tokens * cfg.dim * r
    mlp = tokens * cfg.ffn_dim / lay.tp * c + 2 * stream
    hd = cfg.dim // cfg.n_heads
    attn = tokens * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) / lay.tp * c + stream
    if kind == "M":
        return 2 * tokens * cfg.d_inner / lay.tp * 4 + stream
    return {"-": mlp, "*": attn, "T": max(mlp, attn)}[kind]


def _head(cfg, tokens: float, lay: Layout, precision: str, chunk_tokens: int = 0) -> tuple[float, float, float]:
    """(saved by final norm + output head, peak of the loss forward, peak of the loss backward).
    Full logits: the output head is column-parallel with replicated logits: every tp rank holds the
    full T x V. Chunked (chunk_tokens > 0; kernels/chunked_loss.py, under tp
    parallel/vocab_parallel_loss.py): one chunk's fp32 logits of V/tp columns at a time (its
    softmax and gradient formed in place), the gradients of h (T d, the stream's dtype) and of the
    rank's head rows (fp32) formed in the forward and held until the backward, which scales copies."""
    c, r = _elem(precision)
    V = cfg.vocab_size
    if chunk_tokens:
        d = cfg.dim
        norm_only = _norm_and_input(cfg, tokens, lay, precision, consumers=1) - tokens * d * c
        rows, local_v = min(chunk_tokens, tokens), V / lay.tp
        held = tokens * d * r + local_v * d * 4
        gathered_h = tokens * d * r if (lay.tp > 1 and lay.sequence_parallel) else 0.0
        fwd = held + gathered_h + rows * local_v * 4 + (rows * local_v * c if c != 4 else 0.0)
        bwd = held + tokens * d * 4 + (tokens * d * r if r != 4 else 0.0)
        return norm_only, fwd, bwd
    saved = _norm_and_input(cfg, tokens, lay, precision, consumers=1)
    fp32_logits = tokens * V * 4
    local = tokens * V / lay.tp * c if lay.tp > 1 else 0.0
    logits_c = tokens * V * c
    # forward: logits (compute dtype) + their fp32 copy (none when already fp32) + log_softmax out
    fwd = local + logits_c + (fp32_logits if c != 4 else 0.0) + fp32_logits
    # backward: saved log_softmax out + d(log_softmax) + d(logits fp32) (+ its cast back)
    bwd = 3 * fp32_logits + (logits_c if c != 4 else 0.0)
    return saved, fwd, bwd


# ----------------------------------------------------------------------------------------------
# Memory per rank
# ----------------------------------------------------------------------------------------------
def _microbatches_in_flight(lay: Layout, pp_rank: int) -> int:
    m = lay.microbatches
    if lay.pp == 1:
        return 1
    if lay.pp_schedule == "gpipe":
        return m
    if lay.pp_schedule == "1f1b":
        return min(m, lay.pp - pp_rank)
    # interleaved: warm-up of (pp - rank - 1) * 2 + (v - 1) * pp chunks, each 1/v of the rank's layers
    v = lay.pp_stages_per_rank
    warm = min(m * v, (lay.pp - pp_rank - 1) * 2 + (v - 1) * lay.pp + 1)
    return max(1, math.ceil(warm / v))


def estimate_memory(cfg, lay: Layout, work: Workload) -> MemoryEstimate:
    """Peak bytes per pipeline rank, and the busiest rank's breakdown."""
    kinds = layer_kinds(cfg)
    n_stages = lay.pp * lay.pp_stages_per_rank
    stages = stage_layers(cfg, n_stages)
    c, r = _elem(work.precision)
    micro_rows = work.batch_size / (lay.microbatches if lay.pp > 1 else work.grad_accum)
    tokens = micro_rows * work.seq_len / lay.cp  # tokens of one micro-batch on this rank
    fsdp = lay.fsdp * lay.dp_replicate > 1
    shard = lay.fsdp if fsdp else 1
    by_rank = []
    best = None
    for pp_rank in range(lay.pp):
        stage_ids = [pp_rank + k * lay.pp for k in range(lay.pp_stages_per_rank)]
        my_layers = [i for s in stage_ids for i in stages[s]]
        first, last = 0 in stage_ids, (n_stages - 1) in stage_ids
        # parameters (elements on this rank before FSDP)
        layer_params = [_param_count(cfg, kinds[i]) * (1 - _tp_sharded_fraction(cfg, kinds[i]) * (1 - 1 / lay.tp))
                        for i in my_layers]
        emb = cfg.vocab_size * cfg.dim / lay.tp
        tied = cfg.tie_embeddings
        top = (emb if first else 0) + (0 if tied else emb if last else 0) + (cfg.dim if last else 0)
        params = sum(layer_params) + top
        parts = {}
        parts["parameters"] = params / shard * 4
        parts["gradients"] = params / shard * 4
        parts["optimizer_state"] = 2 * params / shard * 4
        if fsdp:
            # gathered blocks: the current one and the prefetched next, in compute dtype; the root
            # (embedding, head) stays gathered between forward and backward
            biggest = max(layer_params) if layer_params else 0.0
            parts["gathered_parameters"] = (2 * biggest + top) * c
            unsharded_grad = 2 * biggest * c + (biggest * 4 if c != 4 else 0)
        else:
            parts["gathered_parameters"] = params * c if work.precision == "autocast" else 0.0  # autocast cache
            unsharded_grad = 0.0
        in_flight = _microbatches_in_flight(lay, pp_rank)
        held_by_layer, full_by_layer, work_bytes = [], [], 0.0
        for i in my_layers:
            saved, w = layer_activation(cfg, kinds[i], tokens, lay, work.precision)
            work_bytes = max(work_bytes, w)
            full_by_layer.append(saved)
            held_by_layer.append(tokens * cfg.dim * r if _checkpointed(lay, i) else saved)  # checkpointed: the input
        one_micro = sum(held_by_layer) + (tokens * 8 * 3 if first else 0.0)  # + tokens, labels, positions
        held = one_micro * in_flight
        head_saved, loss_fwd, loss_bwd = _head(cfg, tokens, lay, work.precision, work.loss_chunk_tokens) if last else (0.0, 0.0, 0.0)
        parts["activations"] = held + head_saved
        static = parts["parameters"] + parts["optimizer_state"] + parts["gathered_parameters"]
        grads = parts["gradients"]
        head_grad = (0 if not last else cfg.vocab_size * cfg.dim / lay.tp * 4 / shard)
        # Backward walks the layers in reverse: at layer k, the earlier layers still hold what they
        # saved (checkpointed ones only their input), layer k holds all its activations (recomputed
        # if checkpointed) plus its gradient transients, and the later layers' gradients exist.
        earlier_micro = one_micro * (in_flight - 1)
        layer_peak, grads_so_far = 0.0, head_grad
        for k in range(len(my_layers) - 1, -1, -1):
            i = my_layers[k]
            grads_so_far += layer_params[k] / shard * 4
            now = (sum(held_by_layer[:k]) + full_by_layer[k]
                   + _layer_backward_transient(cfg, kinds[i], tokens, lay, work.precision) + work_bytes + grads_so_far)
            layer_peak = max(layer_peak, now)
        phases = {
            "loss forward": static + held + head_saved + loss_fwd,
            "loss backward": static + held + head_saved + loss_bwd + head_grad,
            "layer backward": static + earlier_micro + layer_peak + unsharded_grad,
            "backward end": static + grads + unsharded_grad,
            "optimizer step": static + grads + (0 if work.fused_optimizer else params / shard * 4),
        }
        phase = max(phases, key=phases.get)
        parts["logits_and_loss"] = max(loss_fwd, loss_bwd)
        parts["workspace"] = work_bytes + max((_layer_backward_transient(cfg, kinds[i], tokens, lay, work.precision)
                                               for i in my_layers), default=0.0)
        rank = {"pp_rank": pp_rank, "peak_bytes": phases[phase], "phase": phase, "phases": phases, "parts": parts}
        by_rank.append(rank)
        if best is None or rank["peak_bytes"] > best["peak_bytes"]:
            best = rank
    return MemoryEstimate(parts=best["parts"], peak_bytes=best["peak_bytes"], pp_rank=best["pp_rank"],
                          by_rank=[{k: v for k, v in b.items() if k != "parts"} for b in by_rank], phase=best["phase"])
