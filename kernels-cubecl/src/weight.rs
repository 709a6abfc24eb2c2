//! A 4-bit weight in device memory, laid out for the kernels.
//!
//! Bytes become little-endian `u32` words (WGSL has no 8-bit type): packed code byte `i` is byte `i % 4` of
//! word `i / 4`, so element `2i` is the high nibble of that byte, as bitsandbytes packs it. Double-quantized
//! absmax codes are packed the same way. Nothing here is ever expanded to a dense matrix on the device.

use cubecl::prelude::*;
use cubecl::server::Handle;
use nf4::{Absmax, Blockwise4bit, FloatDtype};

use crate::KernelError;

/// The comptime code kernels use for an element type in global memory (0 f32, 1 bf16, 2 f16).
pub(crate) fn dtype_code(dtype: FloatDtype) -> u32 {
    match dtype {
        FloatDtype::F32 => 0,
        FloatDtype::Bf16 => 1,
        FloatDtype::F16 => 2,
    }
}

/// Packs bytes into little-endian u32 words (zero padded).
pub(crate) fn bytes_to_words(bytes: &[u8]) -> Vec<u32> {
    bytes.chunks(4).map(|c| c.iter().enumerate().fold(0u32, |w, (i, &b)| w | (u32::from(b) << (8 * i)))).collect()
}

/// The inverse of [`bytes_to_words`], keeping `len` bytes.
pub(crate) fn words_to_bytes(words: &[u32], len: usize) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).take(len).collect()
}

/// A buffer of f32 values on the device.
pub(crate) fn upload_f32(client: &Client, values: &[f32]) -> Handle {
    // Buffers of zero bytes are not allowed on every backend: keep one element.
    if values.is_empty() {
        client.create_from_slice(f32::as_bytes(&[0.0]))
    } else {
        client.create_from_slice(f32::as_bytes(values))
    }
}

pub(crate) fn upload_u32(client: &Client, values: &[u32]) -> Handle {
    if values.is_empty() {
        client.create_from_slice(u32::as_bytes(&[0]))
    } else {
        client.create_from_slice(u32::as_bytes(values))
    }
}

/// Uploads f32 values as `dtype` (bf16/f16 rounded to nearest even, packed two per u32 word); returns the
/// handle and the values as the device holds them, widened back to f32.
pub fn upload_as(client: &Client, values: &[f32], dtype: FloatDtype) -> (Handle, Vec<f32>) {
    fn packed<T: nf4::Element + Into<f32>>(
        client: &Client,
        values: &[f32],
        bytes: impl Fn(T) -> [u8; 2],
    ) -> (Handle, Vec<f32>) {
        let rounded: Vec<T> = values.iter().map(|&v| T::from_f32(v)).collect();
        let raw: Vec<u8> = rounded.iter().flat_map(|&v| bytes(v)).collect();
        (upload_u32(client, &bytes_to_words(&raw)), rounded.into_iter().map(Into::into).collect())
    }
    match dtype {
        FloatDtype::F32 => (upload_f32(client, values), values.to_vec()),
        FloatDtype::Bf16 => packed::<half::bf16>(client, values, half::bf16::to_le_bytes),
        FloatDtype::F16 => packed::<half::f16>(client, values, half::f16::to_le_bytes),
    }
}

pub(crate) fn read_f32(
    client: &Client,
    handle: Handle,
    len: usize,
    during: &'static str,
) -> Result<Vec<f32>, KernelError> {
    let bytes = client.read_one(handle).map_err(|e| KernelError::from_server(during, e))?;
    let values: &[f32] = bytemuck::cast_slice(&bytes[..len * 4]);
    Ok(values.to_vec())
}

pub(crate) fn read_u32(
    client: &Client,
    handle: Handle,
    len: usize,
    during: &'static str,
) -> Result<Vec<u32>, KernelError> {
    let bytes = client.read_one(handle).map_err(|e| KernelError::from_server(during, e))?;
    let values: &[u32] = bytemuck::cast_slice(&bytes[..len * 4]);
    Ok(values.to_vec())
}

/// A 4-bit weight (packed codes + statistics) resident on a device.
#[derive(Clone)]
pub struct DeviceWeight4bit {
    /// Packed codes as u32 words (`ceil(numel / 8)` words).
    pub packed: Handle,
    /// f32 absmax per block (plain), or the 8-bit codes packed into u32 words (double quant).
    pub absmax: Handle,
    /// Double quant: one f32 per 256 absmax codes; plain: a one-element placeholder.
    pub nested_absmax: Handle,
    /// Double quant: the 256-entry code map; plain: a one-element placeholder.
    pub nested_code: Handle,
    /// The 16-entry code book.
    pub codebook: Handle,
    /// Double quant: the mean subtracted from the absmax values.
    pub offset: f32,
    pub double_quant: bool,
    pub numel: usize,
    pub blocksize: usize,
    /// `[rows, cols]` of the matrix (`[out, in]` for a linear weight); `[1, numel]` for a flat tensor.
    pub shape: [usize; 2],
}

impl DeviceWeight4bit {
    /// Uploads a quantized tensor as a `[rows, cols]` matrix (row-major, the layout bitsandbytes quantized).
    pub fn upload(client: &Client, weight: &Blockwise4bit, shape: [usize; 2]) -> Result<Self, KernelError> {
        nf4::check_blocksize(weight.blocksize)?;
        if shape[0].checked_mul(shape[1]) != Some(weight.numel) || weight.numel == 0 {
            return Err(KernelError::Shape {
                what: "4-bit weight shape",
                expected: format!("{} elements", weight.numel),
                found: format!("{shape:?}"),
            });
        }
        let blocks = nf4::num_blocks(weight.numel, weight.blocksize);
        if weight.packed.len() != nf4::packed_len(weight.numel) || weight.absmax.num_blocks() != blocks {
            return Err(KernelError::Shape {
                what: "4-bit weight data",
                expected: format!("{} bytes and {blocks} blocks", nf4::packed_len(weight.numel)),
                found: format!("{} bytes and {} blocks", weight.packed.len(), weight.absmax.num_blocks()),
            });
        }
        let packed = upload_u32(client, &bytes_to_words(&weight.packed));
        let codebook = upload_f32(client, weight.quant_type.codebook());
        let (absmax, nested_absmax, nested_code, offset, double_quant) = match &weight.absmax {
            Absmax::Plain(values) => {
                (upload_f32(client, values), upload_f32(client, &[0.0]), upload_f32(client, &[0.0]), 0.0, false)
            }
            Absmax::Double(dq) => {
                if dq.nested_blocksize != nf4::NESTED_BLOCKSIZE
                    || dq.nested_absmax.len() != blocks.div_ceil(dq.nested_blocksize)
                {
                    return Err(KernelError::Unsupported(format!(
                        "double quantization with nested blocksize {} (kernels use 256)",
                        dq.nested_blocksize
                    )));
                }
                (
                    upload_u32(client, &bytes_to_words(&dq.codes)),
                    upload_f32(client, &dq.nested_absmax),
                    upload_f32(client, &dq.code[..]),
                    dq.offset,
                    true,
                )
            }
        };
        Ok(DeviceWeight4bit {
            packed,
            absmax,
            nested_absmax,
            nested_code,
            codebook,
            offset,
            double_quant,
            numel: weight.numel,
            blocksize: weight.blocksize,
            shape,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::client;

    #[test]
    fn a_failed_device_allocation_is_a_typed_error_not_a_panic() {
        let client = client();
        // Far beyond any device (and wgpu's buffer limit): the allocation fails when the buffer is used.
        let huge = client.empty(1usize << 42);
        match read_f32(&client, huge, 1, "reading a huge buffer") {
            Err(KernelError::OutOfMemory { during, .. }) => assert_eq!(during, "reading a huge buffer"),
            Err(other) => panic!("expected OutOfMemory, got {other}"),
            Ok(_) => panic!("a 4 TiB buffer was allocated"),
        }
        // The device keeps working afterwards.
        let small = upload_f32(&client, &[1.5, 2.5]);
        assert_eq!(read_f32(&client, small, 2, "reading back").unwrap(), vec![1.5, 2.5]);
    }

    #[test]
    fn byte_words_round_trip() {
        let bytes: Vec<u8> = (0..11u8).collect();
        let words = bytes_to_words(&bytes);
        assert_eq!(words[0], 0x0302_0100);
        assert_eq!(words_to_bytes(&words, 11), bytes);
    }
}
