//! `--device`: where training and inference run.
//!
//! `cpu` (burn's flex backend, always built), `wgpu` (burn's CubeCL backend on wgpu's default adapter:
//! a GPU, or Mesa's lavapipe on the CPU; feature `wgpu`) and `cuda` / `cuda:N` (CubeCL on CUDA; feature
//! `cuda`). On the CubeCL devices the 4-bit product, dropout and the chunked loss run as the
//! `qlora-kernels` / backend-extension ops registered in `lora` and `llama`.

use burn::tensor::Device;

use crate::TrainError;
use crate::config::DeviceSpec;

/// The devices this build can use, for messages.
pub fn available() -> &'static str {
    match (cfg!(feature = "wgpu"), cfg!(feature = "cuda")) {
        (true, true) => "cpu, wgpu, cuda, cuda:N",
        (true, false) => "cpu, wgpu",
        (false, true) => "cpu, cuda, cuda:N",
        (false, false) => "cpu (build with --features wgpu or cuda for GPUs)",
    }
}

/// The device a spec names (`cpu`, `wgpu`, `cuda`, `cuda:N`), checked to open.
pub fn parse_device(spec: &str) -> Result<Device, TrainError> {
    open(spec.parse()?)
}

/// Opens a device, checked (a missing GPU or a build without its feature is an error, not a panic later).
pub fn open(spec: DeviceSpec) -> Result<Device, TrainError> {
    let unavailable = || TrainError::Input(format!("--device {spec}: this build has {}", available()));
    match spec {
        DeviceSpec::Cpu => Ok(Device::flex()),
        #[cfg(feature = "wgpu")]
        DeviceSpec::Wgpu => {
            ops::cube::probe(qlora_kernels_kind::wgpu())
                .map_err(|e| TrainError::Input(format!("--device wgpu: {e}")))?;
            Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice))
        }
        #[cfg(feature = "cuda")]
        DeviceSpec::Cuda(index) => {
            ops::cube::probe(qlora_kernels_kind::cuda(index))
                .map_err(|e| TrainError::Input(format!("--device {spec}: {e}")))?;
            Ok(Device::cuda(index))
        }
        #[allow(unreachable_patterns)]
        _ => Err(unavailable()),
    }
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod qlora_kernels_kind {
    pub use ops::cube::DeviceKind;
    #[cfg(feature = "wgpu")]
    pub fn wgpu() -> DeviceKind {
        DeviceKind::Wgpu
    }
    #[cfg(feature = "cuda")]
    pub fn cuda(index: usize) -> DeviceKind {
        DeviceKind::Cuda(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_devices_are_clear_errors() {
        let err = parse_device("tpu").unwrap_err().to_string();
        assert!(err.contains("--device tpu") && err.contains("cpu"), "{err}");
        assert!(parse_device("cpu").is_ok());
        assert!(parse_device("cuda:x").is_err());
    }
}
