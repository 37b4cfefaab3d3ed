"""Zeppelin-style balancing of variable-length batches over the data x context ranks.

cost.py       per-sequence cost model (attention/linear FLOPs, ring bytes, hiding lengths, regimes)
              and the cluster presets (`cluster:` recipe section)
probe.py      `longtrain probe`: this machine's attention FLOP/s by length and P2P bandwidth -> a preset
planner.py    one step's whole sequences -> pieces per rank (zeppelin, even_cp, tokens, hybrid_dp)
engine.py     the attention strategy over per-sequence ring groups (local and ring attention)
remap.py      linear-layout <-> attention-layout token exchange (one all_to_all_single each way)
simulator.py  event-level step time per strategy from the cost model
"""
