//! `--device`: where training and inference run.
//!
//! `cpu` (burn's flex backend, always built), `wgpu` (burn's CubeCL backend on wgpu's default adapter:
//! a GPU, or Mesa's lavapipe on the CPU; feature `wgpu`) and `cuda` / `cuda:N` (CubeCL on CUDA; feature
//! `cuda`). On the CubeCL devices the 4-bit product, dropout and the chunked loss run as the
//! `qlora-kernels` / backend-extension ops registered in `lora` and `llama`.

use burn::tensor::Device;

use crate::TrainError;

/// The devices this build can use, for messages.
pub fn available() -> &'static str {
    match (cfg!(feature = "wgpu"), cfg!(feature = "cuda")) {
        (true, true) => "cpu, wgpu, cuda, cuda:N",
        (true, false) => "cpu, wgpu",
        (false, true) => "cpu, cuda, cuda:N",
        (false, false) => "cpu (build with --features wgpu or cuda for GPUs)",
    }
}

/// The device a spec names, checked to open (a missing GPU is an error, not a panic later).
pub fn parse_device(spec: &str) -> Result<Device, TrainError> {
    let unknown = || TrainError::Input(format!("--device {spec}: this build has {}", available()));
    match spec.trim().to_ascii_lowercase().as_str() {
        "cpu" | "flex" => Ok(Device::flex()),
        #[cfg(feature = "wgpu")]
        "wgpu" => {
            lora::cube::probe(qlora_kernels_kind::wgpu())
                .map_err(|e| TrainError::Input(format!("--device wgpu: {e}")))?;
            Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice))
        }
        #[cfg(feature = "cuda")]
        cuda if cuda == "cuda" || cuda.starts_with("cuda:") => {
            let index: usize = match cuda.strip_prefix("cuda:") {
                None => 0,
                Some(n) => n.parse().map_err(|_| {
                    TrainError::Input(format!("--device {spec}: expected cuda or cuda:N"))
                })?,
            };
            lora::cube::probe(qlora_kernels_kind::cuda(index))
                .map_err(|e| TrainError::Input(format!("--device {spec}: {e}")))?;
            Ok(Device::cuda(index))
        }
        _ => Err(unknown()),
    }
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod qlora_kernels_kind {
    pub use lora::cube::DeviceKind;
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
