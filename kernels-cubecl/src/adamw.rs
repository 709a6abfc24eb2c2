//! The paged optimizer's update on the device: AdamW with f32 state (torch's rule, and bitsandbytes' 32-bit
//! rule) and with 8-bit blockwise state (bitsandbytes' `AdamW8bit`), fused into one kernel each, and
//! [`DevicePages`], an `adamw_rules::PageDevice` whose pages live in device memory.
//!
//! Every rule keeps the host reference's f32 operation order (`adamw_rules::update`), including its explicit fused
//! multiply-adds; products the reference rounds on their own are kept out of the compiler's FMA contraction.
//! The 8-bit rule runs one cube per 256-element state block: decode both moments, update them and the
//! parameter, take the block's new absmax with a shared-memory reduction, and re-quantize through
//! bitsandbytes' 65,536-entry lookup tables, as the CPU reference does.

use adamw_rules::UpdateRule;
use adamw_rules::update::{AdamHyper, STATE_BLOCKSIZE};
use adamw_rules::{PageDevice, PageState};
use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::KernelError;
use crate::numerics::mul_rounded;
use crate::weight::{bytes_to_words, read_f32, read_u32, upload_f32, upload_u32, words_to_bytes};

#[cube(launch_unchecked)]
fn adamw_torch_kernel(
    param: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    n: usize,
    scalars: &[f32],
    #[comptime] apply_decay: bool,
) {
    // scalars: decay, 1-β1, β2, 1-β2, sqrt(1-β2^t), -lr/(1-β1^t), eps
    let i = ABSOLUTE_POS;
    if i < n {
        let g = grad[i];
        let mut p = param[i];
        if comptime![apply_decay] {
            p = mul_rounded(p, scalars[0]);
        }
        let m_new = fma(scalars[1], g - m[i], m[i]);
        let v_new = fma(scalars[3] * g, g, mul_rounded(v[i], scalars[2]));
        let denom = Sqrt::sqrt(v_new) / scalars[4] + scalars[6];
        p += (scalars[5] * m_new) / denom;
        m[i] = m_new;
        v[i] = v_new;
        param[i] = p;
    }
}

#[cube(launch_unchecked)]
fn adamw_bnb32_kernel(
    param: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    n: usize,
    scalars: &[f32],
    #[comptime] apply_decay: bool,
) {
    // scalars: β1, 1-β1, β2, 1-β2, decay, step size (-lr·c2/c1), eps·c2
    let i = ABSOLUTE_POS;
    if i < n {
        let g = grad[i];
        let m_new = fma(g, scalars[1], mul_rounded(m[i], scalars[0]));
        let v_new = fma(scalars[3] * g, g, mul_rounded(v[i], scalars[2]));
        let mut p = param[i];
        if comptime![apply_decay] {
            p = mul_rounded(p, scalars[4]);
        }
        let update = m_new / (Sqrt::sqrt(v_new) + scalars[6]);
        param[i] = fma(update, scalars[5], p);
        m[i] = m_new;
        v[i] = v_new;
    }
}

/// The code of `scaled` (already multiplied by the block's inverse absmax) through a 65,536-entry table.
#[cube]
fn lut_code(scaled: f32, lut: &[u32]) -> u32 {
    let v = (scaled).clamp(-1.0f32, 1.0f32);
    let t = (v + 1.0f32) * 0.5f32;
    let index = u32::cast_from(fma(t, 65535.0f32, 0.5f32)) & 0xFFFFu32;
    (lut[(index / 4u32) as usize] >> (8u32 * (index % 4u32))) & 0xFFu32
}

/// Max over the cube's 256 units (every unit gets the result).
#[cube]
fn cube_max(value: f32, scratch: &mut [f32]) -> f32 {
    let unit = UNIT_POS as usize;
    scratch[unit] = value;
    sync_cube();
    let mut stride = 128usize;
    while stride > 0 {
        if unit < stride {
            scratch[unit] = max(scratch[unit], scratch[unit + stride]);
        }
        sync_cube();
        stride /= 2;
    }
    let result = scratch[0];
    sync_cube();
    result
}

#[cube(launch_unchecked)]
fn adamw_bnb8_kernel(
    param: &mut [f32],
    grad: &[f32],
    codes1: &mut [u32],
    absmax1: &mut [f32],
    codes2: &mut [u32],
    absmax2: &mut [f32],
    signed_values: &[f32],
    unsigned_values: &[f32],
    signed_lut: &[u32],
    unsigned_lut: &[u32],
    n: usize,
    scalars: &[f32],
    #[comptime] apply_decay: bool,
) {
    // scalars: β1, 1-β1, β2, 1-β2, decay, sqrt(1-β2^t), -lr/(1-β1^t), eps
    let mut scratch = Shared::<[f32]>::new_slice(256usize);
    let mut new_codes = Shared::<[u32]>::new_slice(512usize);
    let block = CUBE_POS;
    let unit = UNIT_POS as usize;
    let i = block * 256 + unit;
    let active = i < n;
    let mut m_new = 0.0f32;
    let mut v_new = 0.0f32;
    if active {
        let g = grad[i];
        let m_old =
            signed_values[((codes1[i / 4] >> (8u32 * u32::cast_from(i % 4))) & 0xFFu32) as usize] * absmax1[block];
        let v_old =
            unsigned_values[((codes2[i / 4] >> (8u32 * u32::cast_from(i % 4))) & 0xFFu32) as usize] * absmax2[block];
        m_new = fma(g, scalars[1], mul_rounded(m_old, scalars[0]));
        v_new = fma(scalars[3] * g, g, mul_rounded(v_old, scalars[2]));
        let denom = Sqrt::sqrt(v_new) / scalars[5] + scalars[7];
        let mut p = param[i];
        if comptime![apply_decay] {
            p = mul_rounded(p, scalars[4]);
        }
        param[i] = p + (scalars[6] * m_new) / denom;
    }
    let amax1 = cube_max(Abs::abs(m_new), &mut scratch);
    let amax2 = cube_max(Abs::abs(v_new), &mut scratch);
    let mut c1 = 0u32;
    let mut c2 = 0u32;
    if amax1 != 0.0f32 {
        c1 = lut_code(m_new * (1.0f32 / amax1), signed_lut);
    }
    if amax2 != 0.0f32 {
        c2 = lut_code(v_new * (1.0f32 / amax2), unsigned_lut);
    }
    new_codes[unit] = c1;
    new_codes[256 + unit] = c2;
    sync_cube();
    // Four units pack four codes into each word.
    if unit.is_multiple_of(4) && active {
        let mut w1 = 0u32;
        let mut w2 = 0u32;
        #[unroll]
        for b in 0..4usize {
            if i + b < n {
                w1 |= new_codes[unit + b] << (8u32 * u32::cast_from(b));
                w2 |= new_codes[256 + unit + b] << (8u32 * u32::cast_from(b));
            }
        }
        codes1[i / 4] = w1;
        codes2[i / 4] = w2;
    }
    if unit == 0 {
        absmax1[block] = amax1;
        absmax2[block] = amax2;
    }
}

/// Optimizer state of one page in device memory.
pub enum DevicePage {
    F32 { exp_avg: Handle, exp_avg_sq: Handle, len: usize },
    Blockwise8 { codes1: Handle, absmax1: Handle, codes2: Handle, absmax2: Handle, len: usize },
}

/// The state buffers one update reads and writes in place: f32 moments (`n` each), or 8-bit codes packed four
/// to a u32 word (`n.div_ceil(4)` words, little-endian) with one f32 absmax per 256-element block.
pub enum StateBuffers<'a> {
    F32 { exp_avg: &'a Handle, exp_avg_sq: &'a Handle },
    Blockwise8 { codes1: &'a Handle, absmax1: &'a Handle, codes2: &'a Handle, absmax2: &'a Handle },
}

/// The two 8-bit state code books (values and 65,536-entry lookup tables) in device memory.
pub struct DeviceCodebooks {
    signed_values: Handle,
    unsigned_values: Handle,
    signed_lut: Handle,
    unsigned_lut: Handle,
}

impl DeviceCodebooks {
    pub fn upload(client: &Client) -> Self {
        let signed = adamw_rules::codebooks::signed();
        let unsigned = adamw_rules::codebooks::unsigned();
        DeviceCodebooks {
            signed_values: upload_f32(client, signed.values()),
            unsigned_values: upload_f32(client, unsigned.values()),
            signed_lut: upload_u32(client, &bytes_to_words(signed.lookup_table())),
            unsigned_lut: upload_u32(client, &bytes_to_words(unsigned.lookup_table())),
        }
    }
}

/// Runs `rule` on `n` elements in place on the device: `param` (f32) and the state buffers are updated, `grad`
/// (f32) is read. Nothing is read back.
pub fn update_in_place(
    client: &Client,
    books: &DeviceCodebooks,
    rule: UpdateRule,
    param: &Handle,
    grad: &Handle,
    state: StateBuffers<'_>,
    n: usize,
    h: &AdamHyper,
) -> Result<(), KernelError> {
    if n == 0 {
        return Ok(());
    }
    let c = client;
    let step = h.step as f64;
    let dim = CubeDim::new_1d(256);
    match (state, rule) {
        (StateBuffers::F32 { exp_avg, exp_avg_sq }, rule @ (UpdateRule::TorchAdamW | UpdateRule::Bnb32)) => {
            let c1 = 1.0 - h.beta1.powf(step);
            let c2 = (1.0 - h.beta2.powf(step)).sqrt();
            // Each kernel's scalars, in the order its comment lists them.
            let scalars = if rule == UpdateRule::TorchAdamW {
                [
                    (1.0 - h.lr * h.weight_decay) as f32,
                    (1.0 - h.beta1) as f32,
                    h.beta2 as f32,
                    (1.0 - h.beta2) as f32,
                    ((1.0 - h.beta2.powf(step)).powf(0.5)) as f32,
                    (-(h.lr / c1)) as f32,
                    h.eps as f32,
                ]
            } else {
                [
                    h.beta1 as f32,
                    (1.0 - h.beta1) as f32,
                    h.beta2 as f32,
                    (1.0 - h.beta2) as f32,
                    (1.0 - h.lr * h.weight_decay) as f32,
                    (-h.lr * c2 / c1) as f32,
                    (h.eps * c2) as f32,
                ]
            };
            let count = cubecl::calculate_cube_count_elemwise(c, n, dim);
            macro_rules! launch {
                ($kernel:ident, $apply_decay:expr) => {
                    unsafe {
                        $kernel::launch_unchecked(
                            c,
                            count,
                            dim,
                            BufferArg::from_raw_parts(param.clone(), n),
                            BufferArg::from_raw_parts(grad.clone(), n),
                            BufferArg::from_raw_parts(exp_avg.clone(), n),
                            BufferArg::from_raw_parts(exp_avg_sq.clone(), n),
                            n,
                            BufferArg::from_raw_parts(upload_f32(c, &scalars), scalars.len()),
                            $apply_decay,
                        )
                    }
                };
            }
            // torch decays whenever weight_decay != 0, bitsandbytes only when it is > 0.
            match rule {
                UpdateRule::TorchAdamW => launch!(adamw_torch_kernel, h.weight_decay != 0.0),
                _ => launch!(adamw_bnb32_kernel, h.weight_decay > 0.0),
            }
        }
        (StateBuffers::Blockwise8 { codes1, absmax1, codes2, absmax2 }, UpdateRule::Bnb8) => {
            let c1 = 1.0 - h.beta1.powf(step);
            let c2 = (1.0 - h.beta2.powf(step)).sqrt();
            let scalars = [
                h.beta1 as f32,
                (1.0 - h.beta1) as f32,
                h.beta2 as f32,
                (1.0 - h.beta2) as f32,
                (1.0 - h.lr * h.weight_decay) as f32,
                c2 as f32,
                (-h.lr / c1) as f32,
                h.eps as f32,
            ];
            let blocks = n.div_ceil(STATE_BLOCKSIZE);
            unsafe {
                adamw_bnb8_kernel::launch_unchecked(
                    c,
                    CubeCount::Static(blocks as u32, 1, 1),
                    dim,
                    BufferArg::from_raw_parts(param.clone(), n),
                    BufferArg::from_raw_parts(grad.clone(), n),
                    BufferArg::from_raw_parts(codes1.clone(), n.div_ceil(4)),
                    BufferArg::from_raw_parts(absmax1.clone(), blocks),
                    BufferArg::from_raw_parts(codes2.clone(), n.div_ceil(4)),
                    BufferArg::from_raw_parts(absmax2.clone(), blocks),
                    BufferArg::from_raw_parts(books.signed_values.clone(), 256),
                    BufferArg::from_raw_parts(books.unsigned_values.clone(), 256),
                    BufferArg::from_raw_parts(books.signed_lut.clone(), 16384),
                    BufferArg::from_raw_parts(books.unsigned_lut.clone(), 16384),
                    n,
                    BufferArg::from_raw_parts(upload_f32(c, &scalars), scalars.len()),
                    h.weight_decay > 0.0,
                );
            }
        }
        (_, rule) => {
            return Err(KernelError::Unsupported(format!("update rule {rule:?} on a page of another format")));
        }
    }
    Ok(())
}

/// Device memory as a page device for host parameters: pages are uploaded on page-in, updated in place by the
/// fused kernels (parameter and gradient slices travel with each update), and read back on page-out. The
/// kernel checks use it; the trainer keeps parameters on the device too (`optim::TensorPages`).
pub struct DevicePages {
    client: Client,
    books: DeviceCodebooks,
    /// The first device error; `PageDevice` methods cannot return errors, so the optimizer's caller checks
    /// [`DevicePages::take_error`] after a step (state of a failed update is left as it was on the host).
    error: Option<KernelError>,
}

impl DevicePages {
    pub fn new(client: Client) -> Self {
        DevicePages { books: DeviceCodebooks::upload(&client), client, error: None }
    }

    /// The first device error since the last call (out of memory, a lost device).
    pub fn take_error(&mut self) -> Option<KernelError> {
        self.error.take()
    }

    fn record<T>(&mut self, result: Result<T, KernelError>) -> Option<T> {
        match result {
            Ok(v) => Some(v),
            Err(e) => {
                self.error.get_or_insert(e);
                None
            }
        }
    }

    fn try_download(&self, page: &DevicePage) -> Result<PageState, KernelError> {
        let c = &self.client;
        Ok(match page {
            DevicePage::F32 { exp_avg, exp_avg_sq, len } => PageState::F32 {
                exp_avg: read_f32(c, exp_avg.clone(), *len, "paging out")?,
                exp_avg_sq: read_f32(c, exp_avg_sq.clone(), *len, "paging out")?,
            },
            DevicePage::Blockwise8 { codes1, absmax1, codes2, absmax2, len } => {
                let blocks = len.div_ceil(STATE_BLOCKSIZE);
                PageState::Blockwise8 {
                    codes1: words_to_bytes(&read_u32(c, codes1.clone(), len.div_ceil(4), "paging out")?, *len),
                    absmax1: read_f32(c, absmax1.clone(), blocks, "paging out")?,
                    codes2: words_to_bytes(&read_u32(c, codes2.clone(), len.div_ceil(4), "paging out")?, *len),
                    absmax2: read_f32(c, absmax2.clone(), blocks, "paging out")?,
                }
            }
        })
    }

    /// Runs `rule` on a resident page: `param` is updated in place (through the device).
    pub fn try_update(
        &mut self,
        page: &mut DevicePage,
        rule: UpdateRule,
        param: &mut [f32],
        grad: &[f32],
        h: &AdamHyper,
    ) -> Result<(), KernelError> {
        let c = self.client.clone();
        let n = param.len();
        let (state, len) = match page {
            DevicePage::F32 { exp_avg, exp_avg_sq, len } => (StateBuffers::F32 { exp_avg, exp_avg_sq }, *len),
            DevicePage::Blockwise8 { codes1, absmax1, codes2, absmax2, len } => {
                (StateBuffers::Blockwise8 { codes1, absmax1, codes2, absmax2 }, *len)
            }
        };
        if grad.len() != n || len != n {
            return Err(KernelError::Shape {
                what: "gradient and page",
                expected: format!("{n} elements"),
                found: format!("{} and {len}", grad.len()),
            });
        }
        if n == 0 {
            return Ok(());
        }
        let p = upload_f32(&c, param);
        let g = upload_f32(&c, grad);
        update_in_place(&c, &self.books, rule, &p, &g, state, n, h)?;
        let updated = read_f32(&c, p, n, "the optimizer update")?;
        param.copy_from_slice(&updated);
        Ok(())
    }
}

impl PageDevice for DevicePages {
    type Page = Option<DevicePage>;
    type Values = [f32];

    fn upload(&mut self, host: PageState) -> Option<DevicePage> {
        let c = &self.client;
        Some(match host {
            PageState::F32 { exp_avg, exp_avg_sq } => DevicePage::F32 {
                len: exp_avg.len(),
                exp_avg: upload_f32(c, &exp_avg),
                exp_avg_sq: upload_f32(c, &exp_avg_sq),
            },
            PageState::Blockwise8 { codes1, absmax1, codes2, absmax2 } => DevicePage::Blockwise8 {
                len: codes1.len(),
                codes1: upload_u32(c, &bytes_to_words(&codes1)),
                absmax1: upload_f32(c, &absmax1),
                codes2: upload_u32(c, &bytes_to_words(&codes2)),
                absmax2: upload_f32(c, &absmax2),
            },
        })
    }

    fn download(&mut self, page: Option<DevicePage>) -> PageState {
        let page = page.expect("pages are always present once uploaded");
        let result = self.try_download(&page);
        self.record(result).unwrap_or_else(|| match page {
            DevicePage::F32 { len, .. } => {
                PageState::F32 { exp_avg: vec![f32::NAN; len], exp_avg_sq: vec![f32::NAN; len] }
            }
            DevicePage::Blockwise8 { len, .. } => PageState::zeros(adamw_rules::StateFormat::Blockwise8, len),
        })
    }

    fn snapshot(&self, page: &Option<DevicePage>) -> PageState {
        let page = page.as_ref().expect("pages are always present once uploaded");
        self.try_download(page).unwrap_or_else(|_| match page {
            DevicePage::F32 { len, .. } => {
                PageState::F32 { exp_avg: vec![f32::NAN; *len], exp_avg_sq: vec![f32::NAN; *len] }
            }
            DevicePage::Blockwise8 { len, .. } => PageState::zeros(adamw_rules::StateFormat::Blockwise8, *len),
        })
    }

    fn update(
        &mut self,
        page: &mut Option<DevicePage>,
        rule: UpdateRule,
        param: &mut [f32],
        grad: &[f32],
        range: std::ops::Range<usize>,
        hyper: &AdamHyper,
    ) {
        let page = page.as_mut().expect("pages are always present once uploaded");
        let result = self.try_update(page, rule, &mut param[range.clone()], &grad[range], hyper);
        self.record(result);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::{Rng, client};
    use adamw_rules::update::{Blockwise8Mut, adamw_bnb8, adamw_bnb32, adamw_torch};

    fn hyper(step: u64, weight_decay: f64) -> AdamHyper {
        AdamHyper { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay, step }
    }

    /// Parameters may differ from the host by the last bit of a square root (both are correctly rounded
    /// in theory; lavapipe's sqrt is not always); moments must be identical.
    /// Moments: bit-identical where the device fuses `fma` (CUDA); where it multiplies and adds (lavapipe)
    /// within `tolerance` of the largest moment, since the rules copy the host's fused multiply-adds and a
    /// moment that is a small difference of large terms (`β·m + (1 − β)·g` with opposite signs) carries the
    /// terms' rounding relative to itself (seen: 1.5e-5 on a 1-element block after 5 steps).
    fn moments_equal(a: &[f32], b: &[f32], fused: bool, tolerance: f32, what: &str) {
        if fused {
            assert_eq!(a, b, "{what}");
        } else {
            let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert!((x - y).abs() <= tolerance * scale + 1e-30, "{what}: element {i}: {x} vs {y}");
            }
        }
    }

    /// 8-bit codes: identical where `fma` is fused; else a moment a few ulp off may land in the next code.
    fn codes_equal(a: &[u8], b: &[u8], fused: bool, what: &str) {
        if fused {
            assert_eq!(a, b, "{what}");
        } else {
            let off = a.iter().zip(b).filter(|(x, y)| x != y).count();
            assert!(a.iter().zip(b).all(|(x, y)| x.abs_diff(*y) <= 1), "{what}: a code moved by more than one step");
            assert!(off * 50 <= a.len().max(50), "{what}: {off} of {} codes differ", a.len());
        }
    }

    fn close(a: &[f32], b: &[f32], what: &str) {
        let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-30);
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= 1e-6 * scale, "{what}: element {i}: {x} vs {y}");
        }
    }

    #[test]
    fn fused_updates_follow_the_host_rules() {
        let client = client();
        let mut rng = Rng::from_env("adamw");
        let fused = crate::numerics::fma_is_fused(&client).unwrap();
        println!("device fma fused: {fused}");
        for n in [1usize, 255, 256, 1000, 4099] {
            for wd in [0.0, 0.01] {
                let mut device = DevicePages::new(client.clone());
                let init: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
                // 32-bit rules.
                for rule in [UpdateRule::TorchAdamW, UpdateRule::Bnb32] {
                    let (mut p_host, mut m, mut v) = (init.clone(), vec![0.0; n], vec![0.0; n]);
                    let mut p_dev = init.clone();
                    let mut page = device.upload(PageState::zeros(adamw_rules::StateFormat::F32, n));
                    for step in 1..=5 {
                        let grad: Vec<f32> = (0..n).map(|_| rng.normal() * 0.1).collect();
                        let h = hyper(step, wd);
                        match rule {
                            UpdateRule::TorchAdamW => adamw_torch(&mut p_host, &grad, &mut m, &mut v, &h),
                            _ => adamw_bnb32(&mut p_host, &grad, &mut m, &mut v, &h),
                        }
                        device.update(&mut page, rule, &mut p_dev, &grad, 0..n, &h);
                        assert!(device.take_error().is_none());
                    }
                    let PageState::F32 { exp_avg, exp_avg_sq } = device.download(page) else { panic!("format") };
                    moments_equal(&exp_avg, &m, fused, 1e-4, &format!("{rule:?} n {n}: exp_avg"));
                    moments_equal(&exp_avg_sq, &v, fused, 1e-4, &format!("{rule:?} n {n}: exp_avg_sq"));
                    close(&p_dev, &p_host, &format!("{rule:?} n {n} wd {wd}"));
                }
                // 8-bit blockwise.
                let mut p_host = init.clone();
                let mut p_dev = init.clone();
                let PageState::Blockwise8 { mut codes1, mut absmax1, mut codes2, mut absmax2 } =
                    PageState::zeros(adamw_rules::StateFormat::Blockwise8, n)
                else {
                    panic!()
                };
                let mut page = device.upload(PageState::zeros(adamw_rules::StateFormat::Blockwise8, n));
                for step in 1..=5 {
                    let grad: Vec<f32> = (0..n).map(|_| rng.normal() * 0.1).collect();
                    let h = hyper(step, wd);
                    let state = Blockwise8Mut {
                        codes1: &mut codes1,
                        absmax1: &mut absmax1,
                        codes2: &mut codes2,
                        absmax2: &mut absmax2,
                    };
                    adamw_bnb8(
                        &mut p_host,
                        &grad,
                        state,
                        adamw_rules::codebooks::signed(),
                        adamw_rules::codebooks::unsigned(),
                        &h,
                    );
                    device.update(&mut page, UpdateRule::Bnb8, &mut p_dev, &grad, 0..n, &h);
                    assert!(device.take_error().is_none());
                }
                let PageState::Blockwise8 { codes1: d1, absmax1: a1, codes2: d2, absmax2: a2 } = device.download(page)
                else {
                    panic!("format")
                };
                moments_equal(&a1, &absmax1, fused, 1e-3, &format!("8-bit n {n}: absmax1"));
                moments_equal(&a2, &absmax2, fused, 1e-3, &format!("8-bit n {n}: absmax2"));
                codes_equal(&d1, &codes1, fused, &format!("8-bit n {n}: codes1"));
                codes_equal(&d2, &codes2, fused, &format!("8-bit n {n}: codes2"));
                close(&p_dev, &p_host, &format!("8-bit n {n} wd {wd}"));
            }
        }
    }
}
