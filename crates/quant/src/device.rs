//! The quantized weight on a burn device: packed codes and f32 statistics as tensors, dequantized there.
//!
//! Byte arrays (the packed 4-bit codes, the 8-bit double-quant codes) are held as little-endian `u32` words
//! (byte `i` is byte `i % 4` of word `i / 4`, zero padded): every backend has 32-bit integers, while 8-bit
//! ones are missing on some (WGSL), and the CubeCL kernels read words directly.

use burn::module::Module;
use burn::tensor::{DType, Device, Int, IntDType, Tensor, TensorData};
use nf4::Absmax;

use crate::QuantizedWeight;

/// The per-block statistics on the device.
#[derive(Module, Debug)]
pub enum DeviceAbsmax {
    /// One f32 absmax per block.
    Plain(Tensor<1>),
    /// Double quantized.
    Double(DeviceDoubleQuant),
}

/// Double-quantized statistics on the device: `absmax[b] = code_map[codes[b]] * nested_absmax[b / nested_blocksize] + offset`.
#[derive(Module, Debug)]
pub struct DeviceDoubleQuant {
    /// One 8-bit code per block, as u32 words.
    pub codes: Tensor<1, Int>,
    /// Number of blocks (bytes in `codes`).
    pub num_codes: usize,
    pub code_map: Tensor<1>,
    pub nested_absmax: Tensor<1>,
    pub offset: f32,
    pub nested_blocksize: usize,
}

/// A 4-bit weight resident on a burn device: packed codes as u32 words, statistics as float tensors.
/// It takes ~4.1 bits per parameter of device memory; [`dequantize`](Self::dequantize) rebuilds the float
/// weight on the device when an op needs it. As a burn module it holds no parameters: nothing here trains.
#[derive(Module, Debug)]
pub struct DeviceQuantizedWeight {
    /// `ceil(numel / 2)` bytes as u32 words, element `2i` in the high nibble of byte `i`.
    pub packed: Tensor<1, Int>,
    pub absmax: DeviceAbsmax,
    /// The 16 code values.
    pub codebook: Tensor<1>,
    /// Rows of the weight (`out_features`).
    pub rows: usize,
    /// Columns of the weight (`in_features`).
    pub cols: usize,
    pub numel: usize,
    pub blocksize: usize,
}

impl QuantizedWeight {
    /// Moves the weight to `device` (a 2-D `[out, in]` weight; higher ranks are flattened to `[rows, last]`).
    pub fn to_device(&self, device: &Device) -> DeviceQuantizedWeight {
        let cols = *self.shape.last().expect("non-empty shape");
        let rows = self.numel() / cols.max(1);
        let u8_tensor = |bytes: Vec<u8>| words_tensor(&bytes, device);
        let f32_tensor =
            |values: &[f32]| Tensor::<1>::from_data(TensorData::new(values.to_vec(), [values.len()]), device);
        let absmax = match &self.data.absmax {
            Absmax::Plain(values) => DeviceAbsmax::Plain(f32_tensor(values)),
            Absmax::Double(dq) => DeviceAbsmax::Double(DeviceDoubleQuant {
                codes: u8_tensor(dq.codes.clone()),
                num_codes: dq.codes.len(),
                code_map: f32_tensor(&dq.code[..]),
                nested_absmax: f32_tensor(&dq.nested_absmax),
                offset: dq.offset,
                nested_blocksize: dq.nested_blocksize,
            }),
        };
        DeviceQuantizedWeight {
            packed: u8_tensor(self.data.packed.clone()),
            absmax,
            codebook: f32_tensor(self.quant_type().codebook()),
            rows,
            cols,
            numel: self.numel(),
            blocksize: self.blocksize(),
        }
    }
}

impl DeviceQuantizedWeight {
    /// Bytes of the packed codes.
    pub fn packed_bytes(&self) -> usize {
        self.numel.div_ceil(2)
    }

    /// The 4-bit codes, one per element, as I32 indices `[numel]`.
    pub fn codes(&self) -> Tensor<1, Int> {
        let packed = unpack_bytes(self.packed.clone(), self.packed_bytes());
        let high = packed.clone().bitwise_right_shift_scalar(4);
        let low = packed.bitwise_and_scalar(15);
        let pairs: Tensor<2, Int> = Tensor::stack(vec![high, low], 1);
        let n = pairs.dims()[0] * 2;
        pairs.reshape([n]).narrow(0, 0, self.numel)
    }

    /// The f32 absmax of every block `[blocks]` (decoded on the device when double-quantized).
    pub fn absmax_f32(&self) -> Tensor<1> {
        match &self.absmax {
            DeviceAbsmax::Plain(values) => values.clone(),
            DeviceAbsmax::Double(dq) => {
                let values = dq.code_map.clone().select(0, unpack_bytes(dq.codes.clone(), dq.num_codes));
                scale_blocks(values, dq.nested_absmax.clone(), dq.nested_blocksize).add_scalar(dq.offset)
            }
        }
    }

    /// The dequantized weight `[out, in]` in f32: `code[q] * absmax[block]`, equal to bitsandbytes' values.
    /// On the CPU (flex) the decode runs in the `nf4` crate's threaded kernel; elsewhere in tensor ops.
    pub fn dequantize(&self) -> Tensor<2> {
        let device = self.packed.device();
        if device.clone().without_autodiff() == Device::flex() {
            return self.dequantize_on_host(&device);
        }
        self.dequantize_with_tensor_ops()
    }

    /// The same values through tensor ops only, on any device (the reference for the host path).
    pub fn dequantize_with_tensor_ops(&self) -> Tensor<2> {
        let values = self.codebook.clone().select(0, self.codes());
        scale_blocks(values, self.absmax_f32(), self.blocksize).reshape([self.rows, self.cols])
    }

    fn dequantize_on_host(&self, device: &Device) -> Tensor<2> {
        let bytes = |t: &Tensor<1, Int>, len: usize| -> Vec<u8> { tensor_bytes(t, len) };
        let floats = |t: &Tensor<1>| -> Vec<f32> { t.to_data().try_into_vec::<f32>().expect("f32 values") };
        let absmax = match &self.absmax {
            DeviceAbsmax::Plain(values) => floats(values),
            DeviceAbsmax::Double(dq) => {
                let code: [f32; 256] = floats(&dq.code_map).try_into().expect("256-entry map");
                let stats = nf4::DoubleQuantized {
                    codes: bytes(&dq.codes, dq.num_codes),
                    nested_absmax: floats(&dq.nested_absmax),
                    offset: dq.offset,
                    nested_blocksize: dq.nested_blocksize,
                    code: Box::new(code),
                };
                stats.dequantize().expect("consistent by construction")
            }
        };
        let codebook: [f32; 16] = floats(&self.codebook).try_into().expect("16-entry code book");
        let mut out = vec![0.0f32; self.numel];
        nf4::dequantize_4bit_with_codebook_into(
            &bytes(&self.packed, self.packed_bytes()),
            &absmax,
            self.blocksize,
            &codebook,
            &mut out,
        )
        .expect("consistent by construction");
        Tensor::<2>::from_data(TensorData::new(out, [self.rows, self.cols]), device)
    }

    /// Device bytes held by this weight (codes + statistics + code books).
    pub fn device_bytes(&self) -> usize {
        let stats = match &self.absmax {
            DeviceAbsmax::Plain(v) => v.dims()[0] * 4,
            DeviceAbsmax::Double(dq) => dq.codes.dims()[0] * 4 + dq.nested_absmax.dims()[0] * 4 + 256 * 4,
        };
        self.packed.dims()[0] * 4 + stats + 16 * 4
    }
}

/// `bytes` as a tensor of little-endian u32 words (zero padded to whole words).
pub fn words_tensor(bytes: &[u8], device: &Device) -> Tensor<1, Int> {
    let words: Vec<u32> = bytes.chunks(4).map(|c| c.iter().rev().fold(0u32, |w, &b| (w << 8) | u32::from(b))).collect();
    let n = words.len();
    Tensor::<1, Int>::from_data(TensorData::new(words, [n]), (device, DType::U32))
}

/// The first `len` bytes of a tensor of u32 words (read back to the host).
pub fn tensor_bytes(words: &Tensor<1, Int>, len: usize) -> Vec<u8> {
    let words: Vec<u32> = words.to_data().convert_dtype(DType::U32).try_into_vec::<u32>().expect("u32 words");
    let mut bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    bytes.truncate(len);
    bytes
}

/// The first `len` bytes of a tensor of u32 words, one I32 value (0..=255) per byte, on the device.
pub fn unpack_bytes(words: Tensor<1, Int>, len: usize) -> Tensor<1, Int> {
    let n = words.dims()[0];
    let bytes: Vec<Tensor<1, Int>> = (0..4)
        .map(|i| words.clone().bitwise_right_shift_scalar(8 * i).bitwise_and_scalar(255).cast(IntDType::I32))
        .collect();
    let bytes: Tensor<2, Int> = Tensor::stack(bytes, 1);
    bytes.reshape([n * 4]).narrow(0, 0, len)
}

/// `values[i] * scales[i / blocksize]` for a flat `values` whose last block may be short.
fn scale_blocks(values: Tensor<1>, scales: Tensor<1>, blocksize: usize) -> Tensor<1> {
    let numel = values.dims()[0];
    let blocks = scales.dims()[0];
    let padded = blocks * blocksize;
    let device = values.device();
    let values =
        if padded > numel { Tensor::cat(vec![values, Tensor::zeros([padded - numel], &device)], 0) } else { values };
    let scaled = values.reshape([blocks, blocksize]) * scales.reshape([blocks, 1]);
    scaled.reshape([padded]).narrow(0, 0, numel)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::QuantConfig;
    use nf4::QuantType;

    fn check(config: QuantConfig, shape: [usize; 2]) {
        let n = shape[0] * shape[1];
        let values: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.7311).sin() * (1.0 + (i % 97) as f32)).collect();
        let w = QuantizedWeight::quantize("w", &values, &shape, &config).unwrap();
        let host = w.dequantize_f32().unwrap();
        let device = Device::flex();
        let on_device = w.to_device(&device);
        for (path, tensor) in
            [("host kernel", on_device.dequantize()), ("tensor ops", on_device.dequantize_with_tensor_ops())]
        {
            assert_eq!(tensor.dims(), shape);
            let got: Vec<f32> = tensor.into_data().try_into_vec().unwrap();
            for (i, (a, b)) in got.iter().zip(&host).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "{config:?} {shape:?} {path} element {i}: device {a} host {b}");
            }
        }
    }

    #[test]
    fn flex_dequantize_equals_host_reference_bit_for_bit() {
        check(QuantConfig::new(), [96, 96]);
        check(QuantConfig::new(), [37, 51]);
        check(QuantConfig::new().with_double_quant(false).with_blocksize(128), [17, 300]);
        check(QuantConfig::new().with_quant_type(QuantType::Fp4), [300, 200]);
    }
}
