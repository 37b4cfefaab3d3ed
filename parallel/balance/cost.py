"""Cost model for balancing variable-length sequences (Zeppelin, arXiv 2509.21841, section 1.3 of
shared/research/techniques.md). The paper's constants are not public; these are derived here and
written down.

Per sequence of length L, per layer (h_q query heads, h_kv kv heads, head dim d, b bytes/element):
- attention FLOPs, causal, forward: `A(L) = 4 * c * L^2 * h_q * d` with c = 1/2 (causal) or 1 (full);
  training (forward + backward) = 3.5 x A(L) (backward = 2.5 x forward, the FA2 convention).
- linear FLOPs, forward: `Lin(L) = 2 * L * P_layer` (P_layer: projections + MLP parameters) per
  layer, plus `2 * L * P_head` once (the output head, vocab x dim); training = 3 x that. The
  achieved rate (`linear_tflops`) is a dense matmul's on the GPU presets; `longtrain probe --model`
  measures it as the model runs (every non-attention op of a layer and the head and loss, over the
  FLOPs counted here), which on small models is far below a matmul's (norms, RoPE, SiLU, the loss).
- ring over g ranks (zigzag chunks: every step has equal work): per step one K/V block of
  `V = 2 * (L/g) * h_kv * d * b` bytes against `A(L)/g^2` FLOPs of compute.
- hiding length per level: communication is hidden when `A(L)/(g^2 F) >= V/BW`, i.e. when the
  per-rank chunk `L/g >= tau = (h_kv/h_q) * b * F / (2 * c * BW)` (F: attention FLOP/s, BW: the
  per-rank bandwidth of the level: intra-node link, or the rank's share of its node's NICs).
- regime of a sequence (the crossing points): `inter` when even spread over two nodes its chunks
  hide inter-node traffic (`L >= 2 * G * tau_inter`), else `intra` when split in two it hides
  intra-node traffic (`L >= 2 * tau_intra`), else `local`.
- crossing of attention and linear compute: `A(L) = Lin(L)` at `L* = P_layer / (2 * c * h_q * d)`.

Cluster presets (`cluster.preset`): the paper's clusters A (A800, 8 GPUs and 4 x 200 Gb/s NICs per
node), B (H800, 8 x 400 Gb/s), C (H200, 8 x 400 Gb/s), a generic 8 x H100 node with 8 NICs, and
`local` (this machine, written by `longtrain probe`; a preset file path works too). Achieved
attention FLOP/s for the GPUs comes from this repo's H100 measurement (benchmarks/attention_kernel:
flash-attn 334-342 TFLOP/s causal bf16); the A800 gets it scaled by peak (312/989) times 1.6 (FA2 reaches
~55% of peak on Ampere against ~34% on Hopper); the H800 has the H100's compute; linear FLOP/s is 60% of
the bf16 dense peak; the intra-node link is the unidirectional NVLink bandwidth (A800/H800 are
export-limited to 400 GB/s bidirectional, i.e. 200 GB/s one way; H100/H200 450 GB/s one way). The
fixed cost of one all_to_all (the remap's exchange; NCCL, small messages) is taken as 30 us on the GPU
presets (an assumption: not measured here); `longtrain probe` measures it among the local ranks.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, replace
from pathlib import Path

from longtrain.parallel.balance.planner import causal_pairs

REGIMES = ("local", "intra", "inter")
LEVEL_ORDER = {"inter": 0, "intra": 1, "local": 2}  # the attention engine's queue order


@dataclass(frozen=True)
class ClusterSpec:
    """What the cost model needs to know about the machines."""
    name: str
    gpus_per_node: int
    nics_per_node: int
    nic_gbps: float  # one NIC, Gbit/s, one direction
    intra_gbs: float  # one rank's intra-node link, GB/s, one direction
    attention_tflops: tuple = ((1 << 20, 300.0),)  # (length, achieved attention TFLOP/s) by length, ascending
    linear_tflops: float = 500.0  # achieved dense matmul TFLOP/s
    latency_us: float = 10.0  # per message, either level
    bytes_per_element: int = 2
    shared_cores: int = 0  # the ranks share this many processors (a CPU-only machine); 0: one device each
    attention_call_us: float = 0.0  # fixed cost of one attention piece (one document's block), fwd + bwd
    collective_us: float = 30.0  # fixed cost of one all_to_all over the balancing group (the remap's exchange)
    # (length, achieved TFLOP/s) of full (unmasked) blocks: a ring member's queries against another
    # chunk's earlier keys; empty: the causal table's (the GPU presets: flash-attn's causal and full
    # rates per useful FLOP are within a few percent at these lengths)
    attention_full_tflops: tuple = ()
    # a ring member's work outside the attention kernels beyond what its tokens cost alone and its
    # kernel calls (attention_call_us), forward + backward, per ring step: a fixed part and a part per
    # token it holds (the merges of partial outputs, the travelling dK/dV accumulators, the copies of
    # received blocks; measured by `longtrain probe` on CPU; 0 on the GPU presets: not measured)
    ring_step_us: float = 0.0
    ring_token_us: float = 0.0
    # what `longtrain probe` measured at (a kernel's speed depends on its shapes): the attention kernels'
    # heads and head dim, and where the linear rate came from ("model NAME": that model's own
    # non-attention work; "matmul DIM": a bare matmul); 0 / "": not recorded (the GPU presets, older files)
    probed_heads: int = 0
    probed_head_dim: int = 0
    probed_linear: str = ""

    @property
    def inter_gbs(self) -> float:
        """One rank's share of its node's NICs, GB/s one way."""
        return self.nics_per_node * self.nic_gbps / 8.0 / self.gpus_per_node

    @property
    def nics_per_gpu(self) -> float:
        return self.nics_per_node / self.gpus_per_node

    def attention_flops_per_s(self, length: int, full: bool = False) -> float:
        """Achieved attention FLOP/s at this sequence length (a causal block; `full`: an unmasked one,
        where measured): the measured table, interpolated linearly in log(length), clamped at both ends."""
        table = self.attention_full_tflops if full and self.attention_full_tflops else self.attention_tflops
        lengths = [row[0] for row in table]
        i = bisect.bisect_left(lengths, length)
        if i == 0:
            return table[0][1] * 1e12
        if i == len(table):
            return table[-1][1] * 1e12
        (l0, f0), (l1, f1) = table[i - 1], table[i]
        t = (math.log(length) - math.log(l0)) / (math.log(l1) - math.log(l0))
        return (f0 + t * (f1 - f0)) * 1e12

    def bandwidth(self, level: str) -> float:
        """Bytes/s of one rank at a level ('intra' or 'inter')."""
        return (self.intra_gbs if level == "intra" else self.inter_gbs) * 1e9

    def with_gpus_per_node(self, gpus_per_node: int) -> "ClusterSpec":
        return replace(self, gpus_per_node=gpus_per_node)


# The paper's clusters and a generic node (see the module docstring for where the numbers come from).
_H100_ATTN = ((1024, 180.0), (4096, 300.0), (16384, 335.0), (131072, 340.0))


def _scaled(table, factor):
    return tuple((length, tflops * factor) for length, tflops in table)


# The A800's attention rate from the H100's: by peak (312 / 989) times 1.6 (FA2 on Ampere reaches a
# larger share of its peak); its linear rate by peak alone.
_A800_ATTENTION_FACTOR = 312 / 989 * 1.6
_A800_LINEAR_FACTOR = 312 / 989
PRESETS: dict[str, ClusterSpec] = {
    "A": ClusterSpec("A (A800-80G, 8 GPUs, 4 x 200 Gb/s RoCE)", 8, 4, 200.0, 200.0,
                     _scaled(_H100_ATTN, _A800_ATTENTION_FACTOR), 0.6 * 312, 10.0),
    "B": ClusterSpec("B (H800, 8 GPUs, 8 x 400 Gb/s RoCE)", 8, 8, 400.0, 200.0, _H100_ATTN, 0.6 * 989, 10.0),
    "C": ClusterSpec("C (H200, 8 GPUs, 8 x 400 Gb/s CX7)", 8, 8, 400.0, 450.0, _H100_ATTN, 0.6 * 989, 8.0),
    "h100x8": ClusterSpec("8 x H100, 8 x 400 Gb/s NICs", 8, 8, 400.0, 450.0, _H100_ATTN, 0.6 * 989, 8.0),
}
# How a Hopper probe's kernel rates carry over to each GPU preset (with_probed_kernels): (attention,
# linear) factors; B, C and h100x8 take them as measured, A's A800 as its constants are derived above.
_PROBED_KERNEL_SCALE = {"A": (_A800_ATTENTION_FACTOR, _A800_LINEAR_FACTOR)}


def with_probed_kernels(preset: str, spec: ClusterSpec, probed: ClusterSpec) -> ClusterSpec:
    """`spec` (the preset named `preset`) with the kernel rates of `probed` (a preset written by
    `longtrain probe --device cuda` on one Hopper GPU): attention tables (causal and full), the linear
    rate and the per-call attention cost; links and node shape stay the preset's."""
    attention_factor, linear_factor = _PROBED_KERNEL_SCALE.get(preset, (1.0, 1.0))
    return replace(spec, name=f"{spec.name}, kernels probed ({probed.name})",
                   attention_tflops=_scaled(probed.attention_tflops, attention_factor),
                   attention_full_tflops=_scaled(probed.attention_full_tflops, attention_factor),
                   linear_tflops=probed.linear_tflops * linear_factor, attention_call_us=probed.attention_call_us)


def emulated_bandwidths(local: ClusterSpec, target: ClusterSpec, ranks: int, length: int = 4096) -> tuple:
    """(intra, inter) GB/s per rank that give this machine (`local`, a probe; `ranks` ranks share its
    cores) the compute-to-link ratio of `target` (a GPU preset): each of the target's per-rank
    bandwidths times this machine's attention FLOP/s per rank over the target GPU's (causal blocks of
    `length` tokens), times the ratio of bytes per element (the same elements per FLOP travel).
    What parallel/context/link_emulation.py emulates (benchmarks/balance.py's emulated section)."""
    cores = local.shared_cores if 0 < local.shared_cores < ranks else ranks
    per_rank = local.attention_flops_per_s(length) * cores / ranks
    factor = per_rank / target.attention_flops_per_s(length) * local.bytes_per_element / target.bytes_per_element
    return target.intra_gbs * factor, target.inter_gbs * factor


def with_links(spec: ClusterSpec, intra_gbs: float, inter_gbs: float, name: str = "") -> ClusterSpec:
    """`spec` with one rank's intra-node link and NIC share replaced (one NIC per rank of inter_gbs)."""
    return replace(spec, name=name or spec.name, intra_gbs=intra_gbs, nics_per_node=spec.gpus_per_node,
                   nic_gbps=inter_gbs * 8.0)


def attention_table_note(cluster: ClusterSpec, longest: int, holds: str = "this step holds") -> str:
    """One line when sequences of up to `longest` tokens run past the cluster's attention table (the
    cost model prices every longer one at the table's last length's rate): that rate, and the
    `longtrain probe --lengths` that measures them; "" when the table covers them. `holds`: what holds
    them (`longtrain plan balance`: this step; the trainer: this run's steps)."""
    from longtrain.parallel.balance.probe import lengths_up_to

    table_end = cluster.attention_tflops[-1][0]
    if longest <= table_end:
        return ""
    return (f"the preset's attention rates stop at {table_end} tokens and {holds} sequences of up to {longest}, "
            f"priced at the {table_end}-token rate; `longtrain probe --lengths "
            f"{','.join(map(str, lengths_up_to(longest)))}` measures them")


def probe_shape_note(cluster: ClusterSpec, model_cfg, model_name: str) -> str:
    """One line when the preset's probe measured other shapes than this model runs (its attention
    heads and head dim; its linear rate on a bare matmul or another model): the rates it prices this
    model with may be far off (here the balance benchmark's model ran its linear work at half a bare
    matmul's rate), and the probe command that measures this model's own; "" when they match or the
    preset does not say (the GPU presets)."""
    if not cluster.probed_heads:
        return ""
    from longtrain.models.sizes import SIZES

    heads, head_dim = model_cfg.n_heads, model_cfg.head_dim
    differs = []
    if (cluster.probed_heads, cluster.probed_head_dim) != (heads, head_dim):
        differs.append(f"attention at {cluster.probed_heads} heads of {cluster.probed_head_dim} (this model: "
                       f"{heads} of {head_dim})")
    if cluster.probed_linear != f"model {model_name}":
        differs.append(f"the linear rate on a {cluster.probed_linear}" if cluster.probed_linear.startswith("matmul")
                       else f"the linear rate on {cluster.probed_linear or 'another model'}")
    if not differs:
        return ""
    same_kind = model_name in SIZES and isinstance(model_cfg, type(SIZES[model_name]))
    command = (f"longtrain probe --model {model_name}" if same_kind else
               f"longtrain probe --heads {heads} --head-dim {head_dim} --dim {model_cfg.dim}")
    return f"cluster preset {cluster.name!r} measured {' and '.join(differs)}; `{command}` measures this model's own"


LOCAL_PRESET = Path(__file__).resolve().parents[2] / "configs" / "clusters" / "local.yaml"
PRESET_NAMES = tuple(PRESETS) + ("local",)


class ClusterError(ValueError):
    """A cluster setting that cannot work; str() is one line naming the key."""


def load_preset_file(path: str | Path) -> ClusterSpec:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ClusterError(f"cluster.preset: no preset file {path} (run `longtrain probe` to write one)")
    raw = yaml.safe_load(path.read_text()) or {}
    try:
        table = tuple((int(row[0]), float(row[1])) for row in raw["attention_tflops"])
        return ClusterSpec(name=str(raw.get("name", path.stem)), gpus_per_node=int(raw["gpus_per_node"]),
                           nics_per_node=int(raw["nics_per_node"]), nic_gbps=float(raw["nic_gbps"]),
                           intra_gbs=float(raw["intra_gbs"]), attention_tflops=table,
                           linear_tflops=float(raw["linear_tflops"]), latency_us=float(raw.get("latency_us", 10.0)),
                           bytes_per_element=int(raw.get("bytes_per_element", 2)),
                           shared_cores=int(raw.get("shared_cores", 0)),
                           attention_call_us=float(raw.get("attention_call_us", 0.0)),
                           collective_us=float(raw.get("collective_us", 30.0)),
                           attention_full_tflops=tuple((int(row[0]), float(row[1]))
                                                       for row in raw.get("attention_full_tflops") or ()),
                           ring_step_us=float(raw.get("ring_step_us", 0.0)),
                           ring_token_us=float(raw.get("ring_token_us", 0.0)),
                           probed_heads=int(raw.get("probed_heads", 0)),
                           probed_head_dim=int(raw.get("probed_head_dim", 0)),
                           probed_linear=str(raw.get("probed_linear", "")))
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise ClusterError(f"cluster.preset: {path} is not a preset file ({type(err).__name__}: {err})") from None


def mean_preset(specs: list[ClusterSpec], name: str) -> ClusterSpec:
    """The mean of probes of one machine taken at different times (the same node shape and lengths):
    every rate, bandwidth and fixed cost averaged, attention tables entry by entry. A shared machine's
    speed drifts over minutes (here up to ~30%); a run simulated with the probes before and after it is
    priced at its middle, not at one moment's."""
    first = specs[0]

    def mean(values):
        return sum(values) / len(values)

    def table(key):
        rows = [getattr(s, key) for s in specs]
        if not all(len(r) == len(rows[0]) and [x[0] for x in r] == [x[0] for x in rows[0]] for r in rows):
            raise ClusterError(f"cluster.preset: probes with different {key} lengths cannot be averaged")
        return tuple((rows[0][i][0], mean([r[i][1] for r in rows])) for i in range(len(rows[0])))

    return replace(first, name=name, nic_gbps=mean([s.nic_gbps for s in specs]),
                   intra_gbs=mean([s.intra_gbs for s in specs]), attention_tflops=table("attention_tflops"),
                   linear_tflops=mean([s.linear_tflops for s in specs]), latency_us=mean([s.latency_us for s in specs]),
                   attention_call_us=mean([s.attention_call_us for s in specs]),
                   collective_us=mean([s.collective_us for s in specs]),
                   attention_full_tflops=table("attention_full_tflops"),
                   ring_step_us=mean([s.ring_step_us for s in specs]), ring_token_us=mean([s.ring_token_us for s in specs]))


def write_preset_file(spec: ClusterSpec, path: str | Path) -> Path:
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"name": spec.name, "gpus_per_node": spec.gpus_per_node, "nics_per_node": spec.nics_per_node,
            "nic_gbps": spec.nic_gbps, "intra_gbs": spec.intra_gbs,
            "attention_tflops": [[int(a), float(b)] for a, b in spec.attention_tflops],
            "linear_tflops": spec.linear_tflops, "latency_us": spec.latency_us,
            "bytes_per_element": spec.bytes_per_element, "shared_cores": spec.shared_cores,
            "attention_call_us": spec.attention_call_us, "collective_us": spec.collective_us,
            "attention_full_tflops": [[int(a), float(b)] for a, b in spec.attention_full_tflops],
            "ring_step_us": spec.ring_step_us, "ring_token_us": spec.ring_token_us,
            "probed_heads": spec.probed_heads, "probed_head_dim": spec.probed_head_dim,
            "probed_linear": spec.probed_linear}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def resolve_cluster(preset: str, gpus_per_node: int = 0, world: int | None = None) -> ClusterSpec:
    """A preset by name (A, B, C, h100x8, local) or preset file path; `gpus_per_node` > 0 overrides
    the preset's (a simulated node on CPU). Fails with one line when the node size does not divide
    the balancing group."""
    if preset in PRESETS:
        spec = PRESETS[preset]
    elif preset == "local":
        spec = load_preset_file(LOCAL_PRESET)
    elif preset.endswith((".yaml", ".yml")):
        spec = load_preset_file(preset)
    else:
        raise ClusterError(f"cluster.preset: unknown preset {preset!r}; known: {', '.join(PRESET_NAMES)} "
                           "or a preset .yaml file")
    if gpus_per_node < 0:
        raise ClusterError(f"cluster.gpus_per_node: {gpus_per_node} must be >= 0 (0: the preset's)")
    if gpus_per_node:
        spec = spec.with_gpus_per_node(gpus_per_node)
    if world is not None and world > spec.gpus_per_node and world % spec.gpus_per_node:
        raise ClusterError(f"cluster.gpus_per_node: {spec.gpus_per_node} GPUs per node do not divide the "
                           f"{world} ranks of the balancing group")
    return spec


def routing_enabled(setting, preset: str, gpus_per_node: int, world: int) -> bool:
    """cluster.routing: true, false, or None = auto (on for a preset with several NICs per node when
    the balancing group spans nodes; off for `local`, whose "NICs" are one machine's memory)."""
    if setting is not None:
        return bool(setting)
    if preset == "local":
        return False
    spec = resolve_cluster(preset, gpus_per_node, world)
    return spec.nics_per_node > 1 and world > spec.gpus_per_node


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs to know about the model (per tensor-parallel rank)."""
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    linear_params_per_layer: int
    causal: bool = True
    head_params: int = 0  # the output head (vocab x dim), run once per token after the last layer

    @classmethod
    def of(cls, cfg, tp: int = 1) -> "ModelShape":
        """From a TransformerConfig-like object (dim, n_heads, n_kv_heads, head_dim, ffn_dim, n_layers,
        vocab_size)."""
        hd = cfg.head_dim
        params = cfg.dim * cfg.n_heads * hd * 2 + cfg.dim * cfg.n_kv_heads * hd * 2 + 3 * cfg.dim * cfg.ffn_dim
        return cls(cfg.n_layers, cfg.n_heads // tp, max(1, cfg.n_kv_heads // tp), hd, params // tp,
                   head_params=getattr(cfg, "vocab_size", 0) * cfg.dim // tp)

    @classmethod
    def llama(cls, size: str) -> "ModelShape":
        """LLaMA shapes the paper trains: 3B (26 x 3200, 32 heads), 7B (32 x 4096), 13B (40 x 5120),
        a 32,000-token vocabulary."""
        dims = {"3B": (26, 3200, 32, 32, 8640), "7B": (32, 4096, 32, 32, 11008), "13B": (40, 5120, 40, 40, 13824)}
        layers, dim, heads, kv, ffn = dims[size]
        hd = dim // heads
        return cls(layers, heads, kv, hd, dim * heads * hd * 2 + dim * kv * hd * 2 + 3 * dim * ffn,
                   head_params=32000 * dim)

    @property
    def mask_factor(self) -> float:
        return 0.5 if self.causal else 1.0


# ----------------------------------------------------------------------------------------------
# Formulas (per layer)
# ----------------------------------------------------------------------------------------------
def attention_flops(length: float, m: ModelShape) -> float:
    """Forward attention FLOPs of one sequence: 4 c L^2 h_q d."""
    return 4.0 * m.mask_factor * length * length * m.n_heads * m.head_dim


def linear_flops(length: float, m: ModelShape) -> float:
    """Forward linear FLOPs of one sequence in one layer: 2 L P_layer."""
    return 2.0 * length * m.linear_params_per_layer


def model_linear_flops(length: float, m: ModelShape) -> float:
    """Forward linear FLOPs of one sequence through the whole model: every layer's and the head's."""
    return linear_flops(length, m) * m.n_layers + 2.0 * length * m.head_params


def ring_step_bytes(length: float, group: int, m: ModelShape, bytes_per_element: int = 2) -> float:
    """Bytes one rank sends per ring step (its K and V chunk): 2 (L/g) h_kv d b."""
    return 2.0 * (length / group) * m.n_kv_heads * m.head_dim * bytes_per_element


def hiding_length(level: str, m: ModelShape, c: ClusterSpec, length_hint: int = 16384) -> float:
    """tau_level: the shortest per-rank chunk whose ring step computes at least as long as it sends.

    Per step a member computes 4 c x^2 h_q d FLOPs on chunks of x = L/g tokens and sends
    2 x h_kv d b bytes plus one message latency alpha:  4 c h_q d x^2 / F >= 2 h_kv d b x / BW + alpha.
    With alpha = 0 this is x >= (h_kv/h_q) b F / (2 c BW) (techniques.md 1.3); with latency the
    positive root of the quadratic."""
    flops = c.attention_flops_per_s(length_hint)
    a = 4.0 * m.mask_factor * m.n_heads * m.head_dim / flops
    b = 2.0 * m.n_kv_heads * m.head_dim * c.bytes_per_element / c.bandwidth(level)
    alpha = c.latency_us * 1e-6
    return (b + math.sqrt(b * b + 4.0 * a * alpha)) / (2.0 * a)


def attention_linear_crossing(m: ModelShape) -> float:
    """The length above which a sequence's attention FLOPs exceed its linear FLOPs."""
    return m.linear_params_per_layer / (2.0 * m.mask_factor * m.n_heads * m.head_dim)


def regime(length: int, m: ModelShape, c: ClusterSpec) -> str:
    """local, intra or inter by the crossing points (module docstring)."""
    if length >= 2 * c.gpus_per_node * hiding_length("inter", m, c, length):
        return "inter"
    if length >= 2 * hiding_length("intra", m, c, length):
        return "intra"
    return "local"


@dataclass(frozen=True)
class CostModel:
    """Seconds of one training step's work (forward + backward, all layers) for pieces of sequences."""
    model: ModelShape
    cluster: ClusterSpec

    def attention_seconds(self, length: int, share: float = 1.0) -> float:
        """Training attention time of `share` of a sequence's causal work."""
        f = self.cluster.attention_flops_per_s(length)
        return 3.5 * attention_flops(length, self.model) * share / f * self.model.n_layers

    def piece_forward_seconds(self, piece, length: int) -> float:
        """Forward attention seconds of one layer for a planner Piece (its queries against the
        earlier keys of its sequence of `length` tokens), at the kernel speed of its ring's blocks
        (length / ring size tokens): the piece against itself is a causal block, against the keys
        before it a full one (n (n + 1) / 2 and n x start of its causal_pairs); what the simulator and
        the remap estimate charge a piece."""
        n = piece.stop - piece.start
        diagonal = n * (n + 1) / 2.0
        earlier = causal_pairs(piece) - diagonal
        block = max(1, length // len(piece.group))
        per_pair = 4.0 * self.model.mask_factor * 2 * self.model.n_heads * self.model.head_dim
        return per_pair * (diagonal / self.cluster.attention_flops_per_s(block)
                           + earlier / self.cluster.attention_flops_per_s(block, full=True))

    def linear_seconds(self, tokens: float) -> float:
        """Training (forward + backward) seconds of everything but core attention for `tokens` tokens."""
        return 3.0 * model_linear_flops(tokens, self.model) / (self.cluster.linear_tflops * 1e12)

    def ring_transfer_seconds(self, length: int, group: int, level: str) -> float:
        """One ring step's K/V transfer (forward), latency included."""
        return (ring_step_bytes(length, group, self.model, self.cluster.bytes_per_element)
                / self.cluster.bandwidth(level) + self.cluster.latency_us * 1e-6)

    def call_seconds(self, calls: float) -> float:
        """Training seconds of `calls` attention kernel calls per layer beyond their FLOPs (all layers):
        every document's block pays the cluster's attention_call_us, forward + backward."""
        return calls * self.cluster.attention_call_us * 1e-6 * self.model.n_layers

    def cost(self, length: int) -> float:
        """The planner's balancing weight: attention time of the whole sequence (seconds), its one
        kernel call per layer included."""
        return self.attention_seconds(length) + self.call_seconds(1)

    def ring_member_seconds(self, length: int, group: int, level: str) -> float:
        """What one member of a ring of `group` ranks spends on a sequence (seconds, training, all
        layers): its 1/group of the causal work at the kernel's speed on blocks of length/group
        tokens (slower than whole-sequence blocks: the planner must not assume a ring divides the
        cost), plus the transfers compute does not hide: of each of the group - 1 ring steps, forward
        (K/V) and backward (K/V and their gradients, 2x the bytes, 2.5x the compute), the part of the
        transfer longer than the step's compute (as the simulator runs a ring), plus the fixed cost of its
        kernel calls: a member's two zigzag chunks i and 2g-1-i meet every chunk that starts before
        them, i + 1 and 2g - i calls, 2g + 1 a layer (a local sequence: one), plus the ring's own work
        outside the kernels (ring_work_seconds)."""
        if group <= 1:
            return self.cost(length)
        m = self.model
        block = max(1, length // group)
        # a member's zigzag chunks (2 of length / 2g) against themselves are causal blocks: 1/(2g) of
        # its pairs; the rest are full blocks against earlier chunks
        diagonal = 1.0 / (2 * group)
        per_flop = (diagonal / self.cluster.attention_flops_per_s(block)
                    + (1 - diagonal) / self.cluster.attention_flops_per_s(block, full=True))
        step_fwd = attention_flops(length, m) / (group * group) * per_flop  # one layer, one ring step
        transfer = self.ring_transfer_seconds(length, group, level)
        exposed = (group - 1) * (max(0.0, transfer - step_fwd) + max(0.0, 2 * transfer - 2.5 * step_fwd))
        return ((3.5 * step_fwd * group + exposed) * m.n_layers + self.call_seconds(2 * group + 1)
                + self.ring_work_seconds(length / group, group))

    def ring_work_seconds(self, tokens: float, group: int) -> float:
        """Training seconds (all layers) a ring member holding `tokens` tokens spends outside the
        kernels beyond their cost alone: per ring step (group - 1 of them) the cluster's ring_step_us
        plus ring_token_us a token."""
        c = self.cluster
        return (group - 1) * (c.ring_step_us + c.ring_token_us * tokens) * 1e-6 * self.model.n_layers

    def planner_kwargs(self) -> dict:
        """The cost model's inputs to plan_step: balancing weight, hiding lengths, shared cores, the
        ring member cost the slot schedule weighs rings with (`member_cost`) and, where the ranks
        share cores, the ring member cost the placement weighs rings with (`ring_cost`). On dedicated
        devices placement weighs rings at their ideal share: with ring_member_seconds the planner cuts
        nodes into many small rings of different members that wait for each other even in the slot
        schedule (simulated at scale, 108 configurations of the paper's clusters: 0.88x even_cp on
        average against 1.10x with the ideal share). Where cores are shared that waiting is cheap (a
        waiting rank leaves its core to the others) and the extra work is what counts."""
        kw = dict(cost=self.cost, tau_intra=self.tau("intra"), tau_inter=self.tau("inter"),
                  shared_cores=self.cluster.shared_cores, member_cost=self.ring_member_seconds)
        if self.cluster.shared_cores > 0:
            kw["ring_cost"] = self.ring_member_seconds
        return kw

    def tau(self, level: str, length: int = 16384) -> float:
        return hiding_length(level, self.model, self.cluster, length)

    def regime(self, length: int) -> str:
        return regime(length, self.model, self.cluster)
