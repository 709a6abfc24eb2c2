//! ggml tensor types ([`GgmlType`]: ids, names, block layouts) and one tensor's header entry
//! ([`GgufTensorInfo`]).

use std::fmt;

/// Elements per block for the K-quants.
pub(super) const QK_K: usize = 256;

/// A ggml tensor type (`enum ggml_type`). Ids that no known ggml version uses are `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    IQ2XXS,
    IQ2XS,
    IQ3XXS,
    IQ1S,
    IQ4NL,
    IQ3S,
    IQ2S,
    IQ4XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
    NVFP4,
    Q1_0,
    Other(u32),
}

impl GgmlType {
    pub fn from_id(id: u32) -> Self {
        use GgmlType::*;
        match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2K,
            11 => Q3K,
            12 => Q4K,
            13 => Q5K,
            14 => Q6K,
            15 => Q8K,
            16 => IQ2XXS,
            17 => IQ2XS,
            18 => IQ3XXS,
            19 => IQ1S,
            20 => IQ4NL,
            21 => IQ3S,
            22 => IQ2S,
            23 => IQ4XS,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            29 => IQ1M,
            30 => BF16,
            34 => TQ1_0,
            35 => TQ2_0,
            39 => MXFP4,
            40 => NVFP4,
            41 => Q1_0,
            other => Other(other),
        }
    }

    pub fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q8_1 => 9,
            Q2K => 10,
            Q3K => 11,
            Q4K => 12,
            Q5K => 13,
            Q6K => 14,
            Q8K => 15,
            IQ2XXS => 16,
            IQ2XS => 17,
            IQ3XXS => 18,
            IQ1S => 19,
            IQ4NL => 20,
            IQ3S => 21,
            IQ2S => 22,
            IQ4XS => 23,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            IQ1M => 29,
            BF16 => 30,
            TQ1_0 => 34,
            TQ2_0 => 35,
            MXFP4 => 39,
            NVFP4 => 40,
            Q1_0 => 41,
            Other(id) => id,
        }
    }

    /// ggml's name for the type (`"q4_0"`, `"f16"`, ...).
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "f32",
            F16 => "f16",
            Q4_0 => "q4_0",
            Q4_1 => "q4_1",
            Q5_0 => "q5_0",
            Q5_1 => "q5_1",
            Q8_0 => "q8_0",
            Q8_1 => "q8_1",
            Q2K => "q2_K",
            Q3K => "q3_K",
            Q4K => "q4_K",
            Q5K => "q5_K",
            Q6K => "q6_K",
            Q8K => "q8_K",
            IQ2XXS => "iq2_xxs",
            IQ2XS => "iq2_xs",
            IQ3XXS => "iq3_xxs",
            IQ1S => "iq1_s",
            IQ4NL => "iq4_nl",
            IQ3S => "iq3_s",
            IQ2S => "iq2_s",
            IQ4XS => "iq4_xs",
            I8 => "i8",
            I16 => "i16",
            I32 => "i32",
            I64 => "i64",
            F64 => "f64",
            IQ1M => "iq1_m",
            BF16 => "bf16",
            TQ1_0 => "tq1_0",
            TQ2_0 => "tq2_0",
            MXFP4 => "mxfp4",
            NVFP4 => "nvfp4",
            Q1_0 => "q1_0",
            Other(_) => "unknown",
        }
    }

    /// `(elements per block, bytes per block)`, as ggml's type traits; `None` for unknown ids.
    pub fn block_layout(self) -> Option<(u64, u64)> {
        use GgmlType::*;
        let k = QK_K as u64;
        Some(match self {
            F32 => (1, 4),
            F16 => (1, 2),
            Q4_0 => (32, 2 + 16),
            Q4_1 => (32, 2 + 2 + 16),
            Q5_0 => (32, 2 + 4 + 16),
            Q5_1 => (32, 2 + 2 + 4 + 16),
            Q8_0 => (32, 2 + 32),
            Q8_1 => (32, 2 + 2 + 32),
            Q2K => (k, 2 + 2 + k / 16 + k / 4),
            Q3K => (k, 2 + k / 4 + k / 8 + 12),
            Q4K => (k, 2 + 2 + k / 2 + 12),
            Q5K => (k, 2 + 2 + k / 2 + k / 8 + 12),
            Q6K => (k, 2 + k / 2 + k / 4 + k / 16),
            Q8K => (k, 4 + k + k / 8),
            IQ2XXS => (k, 2 + k / 4),
            IQ2XS => (k, 2 + k / 4 + k / 32),
            IQ3XXS => (k, 2 + k / 4 + k / 8),
            IQ1S => (k, 2 + k / 8 + k / 16),
            IQ4NL => (32, 2 + 16),
            IQ3S => (k, 2 + k / 4 + k / 8 + k / 32 + 4),
            IQ2S => (k, 2 + k / 4 + k / 16),
            IQ4XS => (k, 2 + 2 + k / 2 + k / 64),
            I8 => (1, 1),
            I16 => (1, 2),
            I32 => (1, 4),
            I64 => (1, 8),
            F64 => (1, 8),
            IQ1M => (k, k / 8 + k / 16 + k / 32),
            BF16 => (1, 2),
            TQ1_0 => (k, 2 + 4 * 13),
            TQ2_0 => (k, 2 + 64),
            MXFP4 => (32, 1 + 16),
            NVFP4 => (64, 4 + 32),
            Q1_0 => (128, 2 + 16),
            Other(_) => return None,
        })
    }

    /// Whether [`dequantize`](super::dequantize) (and so [`GgufFile::tensor_f32`](super::GgufFile::tensor_f32)) handles this type.
    pub fn can_dequantize(self) -> bool {
        use GgmlType::*;
        matches!(
            self,
            F32 | F16
                | BF16
                | F64
                | I8
                | I16
                | I32
                | I64
                | Q4_0
                | Q4_1
                | Q5_0
                | Q5_1
                | Q8_0
                | Q2K
                | Q3K
                | Q4K
                | Q5K
                | Q6K
                | Q8K
                | IQ4NL
                | IQ4XS
                | MXFP4
        )
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GgmlType::Other(id) => write!(f, "unknown({id})"),
            t => f.write_str(t.name()),
        }
    }
}

/// One tensor's entry in the header.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// Dimensions as stored in GGUF: fastest-varying first (`ne[0]` = row length).
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset of the data from the start of the data section (see [`GgufFile::data_offset`](super::GgufFile::data_offset)).
    pub offset: u64,
    /// Number of elements (product of `dims`).
    pub n_elements: u64,
    /// Size of the data in bytes; `None` when the type is unknown.
    pub n_bytes: Option<u64>,
}

impl GgufTensorInfo {
    /// The shape in PyTorch / Hugging Face order (slowest-varying first): `dims` reversed.
    pub fn shape(&self) -> Vec<usize> {
        // Each dim fits in usize: it was checked when the header was parsed.
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_names_and_block_layouts() {
        for id in 0..64 {
            let ty = GgmlType::from_id(id);
            assert_eq!(ty.id(), id, "{ty}");
            if ty.can_dequantize() {
                assert!(ty.block_layout().is_some(), "{ty}");
            }
            match ty {
                GgmlType::Other(_) => assert_eq!(ty.to_string(), format!("unknown({id})")),
                _ => assert_eq!(ty.to_string(), ty.name()),
            }
        }
        assert_eq!(GgmlType::Q4_0.block_layout(), Some((32, 18)));
        assert_eq!(GgmlType::Q4K.block_layout(), Some((256, 144)));
        assert_eq!(GgmlType::Q6K.block_layout(), Some((256, 210)));
        assert_eq!(GgmlType::Other(200).block_layout(), None);
        let info = GgufTensorInfo {
            name: "w".into(),
            dims: vec![3, 2],
            ggml_type: GgmlType::F32,
            offset: 0,
            n_elements: 6,
            n_bytes: Some(24),
        };
        assert_eq!(info.shape(), vec![2, 3]);
    }
}
