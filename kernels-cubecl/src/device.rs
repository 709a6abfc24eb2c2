//! Picking a device and getting its cubecl client.

use cubecl::prelude::*;

use crate::KernelError;

/// The runtimes this crate can launch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// wgpu's default adapter (a GPU, or Mesa's lavapipe on the CPU).
    #[cfg(feature = "wgpu")]
    Wgpu,
    /// CUDA device `index`.
    #[cfg(feature = "cuda")]
    Cuda(usize),
}

/// A client for `kind`, or a clear error when the device is missing (never a panic for a missing GPU).
pub fn client_for(kind: DeviceKind) -> Result<Client, KernelError> {
    let device = match kind {
        #[cfg(feature = "wgpu")]
        DeviceKind::Wgpu => cubecl::Device::wgpu(cubecl::device::WgpuDeviceKind::DefaultDevice)
            .map_err(|e| KernelError::DeviceUnavailable { what: "wgpu", reason: format!("{e:?}") })?,
        #[cfg(feature = "cuda")]
        DeviceKind::Cuda(index) => cubecl::Device::cuda(index)
            .map_err(|e| KernelError::DeviceUnavailable { what: "CUDA", reason: format!("{e:?}") })?,
    };
    // wgpu panics when no adapter can be acquired; turn that into an error.
    std::panic::catch_unwind(move || device.client()).map_err(|_| KernelError::DeviceUnavailable {
        what: "GPU",
        reason: "the runtime could not open the device".into(),
    })
}
