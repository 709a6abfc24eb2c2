#!/usr/bin/env python3
"""A tiny valid GGUF (Llama, hidden 8, 1 layer, vocab 261: 256 byte-level tokens, 4 specials, one merge; ChatML template) as a fuzzing seed.

    /tmp/ref/bin/python fuzz/make_gguf_seed.py fuzz/seeds/gguf/tiny.gguf        (gguf 0.19.0, numpy)
"""
import json
import sys
from pathlib import Path

import numpy as np
import gguf

ROOT = Path(__file__).resolve().parents[1]


def main(out):
    tok = json.loads((ROOT / "tests/fixtures/tiny-train/model-nf4/tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab] + [a["content"] for a in sorted(tok["added_tokens"], key=lambda a: a["id"])]
    tokens.append("ab")  # one merge: llama.cpp (and our reader) require merges for a gpt2 tokenizer
    template = json.loads((ROOT / "tests/fixtures/tiny-train/model-nf4/tokenizer_config.json").read_text())["chat_template"]
    hidden, ff, heads, kv, n_vocab = 8, 16, 2, 1, len(tokens)
    head_dim = hidden // heads
    w = gguf.GGUFWriter(out, "llama")
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_block_count(1)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * 256 + [3] * 4 + [1])
    w.add_token_merges(["a b"])
    w.add_bos_token_id(256)
    w.add_eos_token_id(257)
    w.add_chat_template(template)
    rng = np.random.default_rng(0)
    t = lambda *shape: (rng.standard_normal(shape) * 0.1).astype(np.float16)
    w.add_tensor("token_embd.weight", t(n_vocab, hidden))
    w.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    w.add_tensor("output.weight", t(n_vocab, hidden))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(hidden, dtype=np.float32))
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(hidden, dtype=np.float32))
    w.add_tensor("blk.0.attn_q.weight", t(hidden, hidden))
    w.add_tensor("blk.0.attn_k.weight", t(kv * head_dim, hidden))
    w.add_tensor("blk.0.attn_v.weight", t(kv * head_dim, hidden))
    w.add_tensor("blk.0.attn_output.weight", t(hidden, hidden))
    w.add_tensor("blk.0.ffn_gate.weight", t(ff, hidden))
    w.add_tensor("blk.0.ffn_up.weight", t(ff, hidden))
    w.add_tensor("blk.0.ffn_down.weight", t(hidden, ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print("wrote", out, Path(out).stat().st_size, "bytes")


if __name__ == "__main__":
    Path(sys.argv[1]).parent.mkdir(parents=True, exist_ok=True)
    main(sys.argv[1])
