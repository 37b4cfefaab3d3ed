"""Cached decoding (models/decode.py) for every model family, one process: standard and ladder
transformers, hybrid Mamba-2 stacks (Mamba layers carry their conv window and SSM state across
steps), hybrids with MLA layers. Greedy `generate` with caches gives exactly the tokens of
recomputing the whole prefix at every step; prompts of different lengths batched (left-padded)
give each row's unbatched tokens; top-p keeps exactly the nucleus transformers' TopPLogitsWarper
keeps; a prompt longer than the context fails with one line."""
from __future__ import annotations

import pytest
import torch

from decode_cases import MODELS, make, peaked, prompts, recompute_greedy
from longtrain.models.decode import KVCache, LatentCache, MambaState, cached_logits, generate, left_pad, sample_next

TOL = 1e-5


@pytest.mark.parametrize("kind", list(MODELS))
def test_cached_greedy_equals_recomputation_batched(kind):
    model = make(kind)
    vocab = model.cfg.vocab_size
    batch = prompts([11, 11, 11], vocab)
    out, caches = generate(model, torch.tensor(batch), 12)
    for row, prompt in enumerate(batch):
        assert out[row, 11:].tolist() == recompute_greedy(model, prompt, 12), f"{kind} row {row}"
    kinds = {type(c) for c in caches}  # the caches were installed (and removed afterwards)
    want = {KVCache} if kind in ("standard", "ladder", "ladder_last2") else \
        {LatentCache} if kind == "mla" else {MambaState, LatentCache} if kind == "hybrid_mla" else {MambaState, KVCache}
    assert kinds == want
    assert not any(type(m.ssm_core).__name__ == "MambaState" for m in model.modules() if hasattr(m, "ssm_core"))
    # teacher-forced, every logit (prefill, single steps, several tokens per call) equals the full forward
    x = torch.randint(0, vocab, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(x)
    for step in (1, 5):
        err = (cached_logits(model, x, 7, step=step) - full).abs().max() / full.abs().max()
        assert err <= TOL, (kind, step, err)  # relative to the largest logit (peaked weights: logits ~10)


@pytest.mark.parametrize("kind", ["standard", "ladder", "hybrid", "hybrid_mla"])
def test_prompts_of_different_lengths_batched_equal_unbatched(kind):
    """Left padding: every row gets exactly its unbatched tokens (and its unbatched logits), with
    prompts shorter than the Mamba conv window among them."""
    model = make(kind, seed=2)
    batch = prompts([9, 2, 14, 5], model.cfg.vocab_size, seed=4)
    padded, lengths = left_pad(batch, pad_id=7)
    out, _ = generate(model, padded, 10, prompt_lengths=lengths)
    for row, prompt in enumerate(batch):
        alone, _ = generate(model, torch.tensor([prompt]), 10)
        assert out[row, padded.shape[1]:].tolist() == alone[0, len(prompt):].tolist(), f"{kind} row {row}"
        assert out[row, padded.shape[1]:].tolist() == recompute_greedy(model, prompt, 10)
    # the pad token's value does not matter
    again, _ = generate(model, left_pad(batch, pad_id=3)[0], 10, prompt_lengths=lengths)
    assert torch.equal(again[:, padded.shape[1]:], out[:, padded.shape[1]:])


def test_mamba_state_holds_window_and_ssm_state():
    """The Mamba cache is the recurrent state: after the prompt, its SSM state equals the
    step-by-step recurrence's final state over the prompt, and its window the last d_conv-1 inputs."""
    model = make("hybrid")
    mixer = model.layers["0"].mixer
    x = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(5))
    seen = {}
    real = mixer.ssm_core

    def spy(xBC, dt, *, mixer, doc_ids=None):
        seen["xBC"], seen["dt"] = xBC, dt
        return real(xBC, dt, mixer=mixer, doc_ids=doc_ids)

    mixer.ssm_core = spy
    with torch.no_grad():
        model(x)
    mixer.ssm_core = real
    state = MambaState()
    with torch.no_grad():
        state(seen["xBC"], seen["dt"], mixer=mixer)
    from longtrain.kernels.ssd import causal_conv1d

    weight, bias = mixer.conv_params()
    conv = causal_conv1d(seen["xBC"], weight, bias, activation="silu")
    xs, B, C = mixer.split_xBC(conv, seen["dt"].shape[-1])
    A, D = mixer.scan_params()
    from longtrain.kernels.ssd import ssd_reference

    _, final = ssd_reference(xs, seen["dt"], A, B, C, D=D)
    assert (state.state - final).abs().max() <= 1e-5
    assert torch.equal(state.window, seen["xBC"][:, -(mixer.d_conv - 1):])
    assert state.nbytes() == state.window.nbytes + state.state.nbytes and len(state) == 13


def test_top_p_keeps_the_nucleus_of_transformers_warper():
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    for top_p in (0.3, 0.8, 0.95):
        kept = TopPLogitsWarper(top_p)(None, logits.clone()).isfinite()
        gen = torch.Generator().manual_seed(1)
        drawn = torch.cat([sample_next(logits, 1.0, top_p, gen) for _ in range(3000)], dim=1)
        for row in range(3):
            support = torch.zeros(50, dtype=torch.bool)
            support[drawn[row]] = True
            assert torch.equal(support, kept[row]), (top_p, row)  # exactly the nucleus, all of it
        # frequencies follow the renormalised nucleus
        probs = torch.softmax(logits, -1) * kept
        probs = probs / probs.sum(-1, keepdim=True)
        freq = torch.stack([torch.bincount(drawn[r], minlength=50) for r in range(3)]).float() / 3000
        assert (freq - probs).abs().max() < 0.04
    assert torch.equal(sample_next(logits, 0.0, 0.5), logits.argmax(-1, keepdim=True))  # greedy ignores top-p


def test_sampled_generate_is_reproducible_and_uses_top_p():
    model = make("ladder")
    batch = torch.tensor(prompts([6, 6], 260))
    a, _ = generate(model, batch, 8, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(0))
    b, _ = generate(model, batch, 8, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    tiny, _ = generate(model, batch, 8, temperature=1.0, top_p=1e-6, generator=torch.Generator().manual_seed(5))
    greedy, _ = generate(model, batch, 8)
    assert torch.equal(tiny, greedy)  # a vanishing nucleus is the most likely token alone


def test_bad_decode_settings_fail_with_one_line():
    model = make("hybrid")
    with pytest.raises(ValueError, match=r"^generate: a prompt of 250 tokens \+ 10 new tokens exceed model.max_seq_len=256$"):
        generate(model, torch.zeros(1, 250, dtype=torch.long), 10)
    with pytest.raises(ValueError, match=r"top_p 0 must be in \(0, 1\]"):
        generate(model, torch.zeros(1, 3, dtype=torch.long), 2, temperature=1.0, top_p=0)
    with pytest.raises(ValueError, match="every prompt needs at least one token"):
        left_pad([[1, 2], []])


def _hf_greedy(hf, batch: list[list[int]], n: int) -> list[list[int]]:
    """transformers' own greedy generate with its own cache (KV cache / Mamba2 cache), one prompt at a time."""
    out = []
    with torch.no_grad():
        for prompt in batch:
            ids = torch.tensor([prompt])
            got = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)
            out.append(got[0, len(prompt):].tolist())
    return out


def test_mamba2_decode_equals_transformers_generate(tmp_path):
    """Outside reference for the Mamba state: a transformers Mamba2ForCausalLM (torch path) imported
    into our hybrid model; our cached greedy decode of a left-padded batch gives the tokens of
    transformers' generate with its own conv/SSM cache."""
    import importlib.util

    if any(importlib.util.find_spec(m) is not None for m in ("mamba_ssm", "causal_conv1d")):
        pytest.skip("mamba-ssm/causal-conv1d installed: transformers would not run its torch path")
    from transformers import Mamba2Config, Mamba2ForCausalLM

    from longtrain.models.hf_mamba import model_from_hf_mamba2

    torch.manual_seed(0)
    hf = Mamba2ForCausalLM(Mamba2Config(hidden_size=32, num_heads=8, head_dim=8, state_size=16, n_groups=2, expand=2,
                                        conv_kernel=4, chunk_size=8, num_hidden_layers=2, vocab_size=97,
                                        tie_word_embeddings=False)).eval()
    peaked(hf, seed=3)
    hf.save_pretrained(tmp_path)
    ours = model_from_hf_mamba2(tmp_path).eval()
    batch = prompts([9, 2, 13], 97, seed=6)
    padded, lengths = left_pad(batch)
    got, _ = generate(ours, padded, 10, prompt_lengths=lengths)
    assert [row[padded.shape[1]:] for row in got.tolist()] == _hf_greedy(hf, batch, 10)


def test_llama_kv_cache_decode_equals_transformers_generate(tmp_path):
    """Outside reference for the KV cache: transformers' LlamaForCausalLM greedy generate (its KV
    cache) against our import of the same weights, batched prompts of different lengths."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from longtrain.models.hf import model_from_hf

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=False)).float().eval()
    peaked(hf, seed=4)
    hf.save_pretrained(tmp_path)
    ours = model_from_hf(tmp_path).eval()
    batch = prompts([7, 3, 12], 97, seed=8)
    padded, lengths = left_pad(batch)
    got, _ = generate(ours, padded, 10, prompt_lengths=lengths)
    assert [row[padded.shape[1]:] for row in got.tolist()] == _hf_greedy(hf, batch, 10)
