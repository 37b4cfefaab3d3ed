"""Emulated links: point-to-point transfers delivered no earlier than a link of a given bandwidth
would deliver them, so that a CPU machine whose ranks talk through shared memory can run in the
regime of a GPU cluster, where a ring step's transfer is not free next to its compute.

On this project's machines the ranks' "links" are memory copies (GB/s) next to attention kernels of
tens of GFLOP/s: a ring step's transfer is nearly free and every placement of a sequence costs about
its compute. A GPU cluster has three to four orders of magnitude more FLOP/s per byte of link
bandwidth (cluster A: ~150 TFLOP/s of attention against 200 GB/s NVLink and 12.5 GB/s of NIC per GPU).
`LinkEmulator` brings that ratio here: `emulated_bandwidths` (parallel/balance/cost.py) scales a
cluster preset's bandwidths by this machine's attention FLOP/s over the cluster's, and every ring
transfer and remap exchange is then held until the emulated link would have delivered it.

The model (the simulator's, parallel/balance/simulator.py): each rank has one outgoing link per level
(intra-node to a rank of its node, inter-node to another node's); a message waits for the link to be
free, then takes bytes / bandwidth. The sender stamps the time the message arrives (`stamp`, in the
clock all local processes share, time.monotonic) and sends the stamp with it; the receiver holds the
message until then (`hold_until`). A rank that waits sleeps: its core is free for the others, as a
GPU computes while its NIC transfers. The real copy's time is not added (it is the floor: a stamp
earlier than the real arrival holds nothing). A collective (the remap's all_to_all) is held for the
longer of what the rank sends and what it receives, each summed over its peers at their level.

Where it is used: RingExchange (parallel/context/comm.py) and the remap's TokenExchange
(parallel/balance/remap.py) ask `active()`; `benchmarks/balance.py` measures runs under it. Off by
default (nothing is emulated unless `emulate_links` is entered). The routing layer's multi-phase hops
are not emulated (RingExchange refuses a routed ring under emulation).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class LinkEmulator:
    intra_bytes_per_s: float  # one rank's link to a rank of its own node
    inter_bytes_per_s: float  # one rank's share of its node's NICs
    ranks_per_node: int  # global ranks per (simulated) node
    # what was emulated (tests assert on it): messages stamped, seconds held, bytes per level
    stats: dict = field(default_factory=lambda: {"messages": 0, "held_s": 0.0, "intra_bytes": 0, "inter_bytes": 0})
    _link_free_at: dict = field(default_factory=dict)  # level -> when this rank's link finishes its queue

    def __post_init__(self):
        if self.intra_bytes_per_s <= 0 or self.inter_bytes_per_s <= 0:
            raise ValueError("LinkEmulator: bandwidths must be > 0 bytes/s")
        if self.ranks_per_node < 1:
            raise ValueError("LinkEmulator: ranks_per_node must be >= 1")

    def level(self, src: int, dst: int) -> str:
        return "intra" if src // self.ranks_per_node == dst // self.ranks_per_node else "inter"

    def bandwidth(self, level: str) -> float:
        return self.intra_bytes_per_s if level == "intra" else self.inter_bytes_per_s

    def stamp(self, nbytes: int, src: int, dst: int, now: float | None = None) -> float:
        """Sender side: when a message of `nbytes` posted now from `src` to `dst` arrives (it queues
        behind this rank's earlier messages on the same link)."""
        now = time.monotonic() if now is None else now
        level = self.level(src, dst)
        start = max(now, self._link_free_at.get(level, 0.0))
        arrival = start + nbytes / self.bandwidth(level)
        self._link_free_at[level] = arrival
        self.stats["messages"] += 1
        self.stats[f"{level}_bytes"] += int(nbytes)
        return arrival

    def hold_until(self, arrival: float) -> None:
        """Receiver side: the message is usable from `arrival` on (sleep until then)."""
        wait = arrival - time.monotonic()
        if wait > 0:
            self.stats["held_s"] += wait
            time.sleep(wait)

    def collective_seconds(self, me: int, send_bytes: dict, recv_bytes: dict) -> float:
        """An all_to_all's transfer time for rank `me`: the longer of its sends and its receives,
        each summed over its peers ({rank: bytes}) at their level."""
        def total(per_peer):
            return sum(n / self.bandwidth(self.level(me, peer)) for peer, n in per_peer.items() if peer != me)
        out, into = total(send_bytes), total(recv_bytes)
        for peer, n in send_bytes.items():
            if peer != me and n:
                self.stats[f"{self.level(me, peer)}_bytes"] += int(n)
        return max(out, into)


_ACTIVE: LinkEmulator | None = None


def active() -> LinkEmulator | None:
    """The emulator in force in this process, if any."""
    return _ACTIVE


@contextmanager
def emulate_links(emulator: LinkEmulator | None):
    """Every RingExchange and remap exchange of this process inside the block runs over `emulator`'s
    links (None: over the real ones, nothing held)."""
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, emulator
    try:
        yield emulator
    finally:
        _ACTIVE = previous
