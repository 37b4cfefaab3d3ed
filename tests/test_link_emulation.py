"""Emulated links (parallel/context/link_emulation.py): a message arrives no earlier than bytes /
bandwidth of its level after it was posted, queued behind the sender's earlier messages on the same
link; a remap exchange is held for its larger direction; the data are untouched and the balance
engine stays exact under it; the routing layer is refused; the bandwidths that give this machine a
cluster's compute-to-link ratio, written out."""
import pytest

from balance_cases import emulated_exchanges, engine_errors
from distributed import run_group
from longtrain.parallel.balance.cost import PRESETS, ClusterSpec, emulated_bandwidths, with_links
from longtrain.parallel.context.link_emulation import LinkEmulator, active, emulate_links


def test_stamps_queue_on_the_senders_link_per_level():
    emu = LinkEmulator(intra_bytes_per_s=1000.0, inter_bytes_per_s=100.0, ranks_per_node=2)
    assert emu.level(0, 1) == "intra" and emu.level(1, 2) == "inter" and emu.level(3, 2) == "intra"
    assert emu.stamp(500, 0, 1, now=10.0) == pytest.approx(10.5)  # 500 B at 1000 B/s
    assert emu.stamp(500, 0, 1, now=10.1) == pytest.approx(11.0)  # behind the first on the same link
    assert emu.stamp(50, 0, 2, now=10.1) == pytest.approx(10.6)  # the inter-node link is another queue
    assert emu.stamp(100, 0, 1, now=20.0) == pytest.approx(20.1)  # an idle link starts now
    assert emu.stats["messages"] == 4 and emu.stats["intra_bytes"] == 1100 and emu.stats["inter_bytes"] == 50
    # a collective: the longer of the sends and the receives, each summed over peers at their level
    assert emu.collective_seconds(0, {0: 999, 1: 300, 2: 10}, {1: 100, 3: 20}) == pytest.approx(max(0.4, 0.3))
    with pytest.raises(ValueError, match="bandwidths"):
        LinkEmulator(0.0, 1.0, 2)
    with pytest.raises(ValueError, match="ranks_per_node"):
        LinkEmulator(1.0, 1.0, 0)
    assert active() is None
    with emulate_links(emu):
        assert active() is emu
        with emulate_links(None):  # the real links inside, the emulator again after
            assert active() is None
        assert active() is emu
    assert active() is None


def test_emulated_bandwidths_give_the_clusters_compute_to_link_ratio():
    local = ClusterSpec("cpu", 4, 4, 8.0, 3.0, attention_tflops=((4096, 0.05),), bytes_per_element=4,
                        shared_cores=2)
    target = PRESETS["A"]
    intra, inter = emulated_bandwidths(local, target, ranks=4)
    # written plainly: per rank 0.05 TFLOP/s x 2 cores / 4 ranks, against the A800's rate at 4096
    # tokens; fp32 elements are twice the bytes of bf16 ones
    factor = 0.05e12 * 2 / 4 / target.attention_flops_per_s(4096) * 4 / 2
    assert intra == pytest.approx(target.intra_gbs * factor) and inter == pytest.approx(target.inter_gbs * factor)
    # the same FLOPs per element moved as on the cluster
    assert (local.attention_flops_per_s(4096) / 2) / (intra * 1e9 / 4) == pytest.approx(
        target.attention_flops_per_s(4096) / (target.intra_gbs * 1e9 / 2))
    spec = with_links(local, intra, inter)
    assert spec.intra_gbs == intra and spec.inter_gbs == pytest.approx(inter) and spec.gpus_per_node == 4


def test_ring_and_remap_exchanges_arrive_when_the_links_would_deliver_them():
    intra, inter, nbytes = 4e6, 1e6, 200_000  # 50 ms intra, 200 ms inter per message
    ranks = run_group(4, emulated_exchanges, (intra, inter), 2, nbytes)
    for r in ranks:
        assert r["exact"], r
        bandwidth = intra if r["rank"] // 2 == r["prev"] // 2 else inter  # the link it receives over
        # lower bounds only (a slower machine takes longer, never shorter)
        assert r["one_s"] >= 0.95 * nbytes / bandwidth, r
        assert r["two_s"] >= 0.95 * 2 * nbytes / bandwidth, r  # the second queued behind the first
        assert "routing layer" in r["routed_error"], r
        # the remap's exchange: each rank sends one block to the next and receives one from the previous
        sent_over = intra if r["rank"] // 2 == ((r["rank"] + 1) % 4) // 2 else inter
        assert r["a2a_held_s"] > 0 and r["a2a_s"] >= 0.95 * nbytes / min(sent_over, bandwidth), r
        assert r["stats"]["messages"] == 3 and r["stats"]["held_s"] > 0
    # a rank that only receives is held for all of it: rank 1's block over the intra-node link, ranks 2
    # and 3's over the inter-node one
    assert ranks[0]["gather_held_s"] >= 0.9 * (nbytes / intra + 2 * nbytes / inter), ranks[0]


def test_balance_engine_exact_over_emulated_links():
    lengths = [1, 7, 100, 3000, 5, 700, 33, 64]
    # slow links (a ring step's ~80 KB of K/V, positions and documents: 40-80 ms) against ring steps that
    # compute in a few ms, so the links hold some message even on a machine several times slower
    cases = [{"lengths": lengths, "strategy": strategy, "capacity": 1500, "tau": 16, "gpus_per_node": 2,
              "remap": strategy == "zeppelin", "links": (2e6, 1e6), "name": strategy}
             for strategy in ("zeppelin", "even_cp")]
    for case, res in zip(cases, run_group(4, engine_errors, cases)):
        for key in ("out", "dq", "dk", "dv"):
            assert res[key] <= 1e-5, (case["name"], key, res)
        assert res["ring"] > 0 and res["emulated_messages"] > 0 and res["held_s"] > 0, res
        assert (res["remap"] > 0) == case["remap"], res
