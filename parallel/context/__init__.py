"""Context parallelism: one sequence split across the cp axis, attention computed exactly.

layout.py    which tokens each cp rank holds (contiguous, zigzag, document-aware zigzag)
comm.py      the collectives, with autograd (Ulysses all-to-all, sequence all-gather, ring P2P)
ring.py      ring attention (pass-KV), its blocks and backward
strategy.py  the attention strategy installed into the model: ring, zigzag, ulysses, hybrid, allgather
"""
