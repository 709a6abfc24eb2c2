use thiserror::Error;

/// What can go wrong on the way to, on, or back from a device.
#[derive(Debug, Error)]
pub enum KernelError {
    #[error("no {what} device available: {reason}")]
    DeviceUnavailable { what: &'static str, reason: String },
    #[error("device error during {during}: {message}")]
    Device { during: &'static str, message: String },
    #[error("the device ran out of memory during {during}: {message}")]
    OutOfMemory { during: &'static str, message: String },
    #[error("{what}: expected {expected}, found {found}")]
    Shape { what: &'static str, expected: String, found: String },
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Nf4(#[from] nf4::Nf4Error),
}

impl KernelError {
    /// Classifies a cubecl server error: allocation failures become [`KernelError::OutOfMemory`].
    pub(crate) fn from_server(during: &'static str, error: impl std::fmt::Debug + std::fmt::Display) -> Self {
        let message = format!("{error}");
        let debug = format!("{error:?}");
        // cubecl's IoError::OutOfMemory / BufferTooBig, possibly nested in a "several failures" error.
        let allocation = ["OutOfMemory", "BufferTooBig", "out of device memory", "can't allocate buffer"];
        if allocation.iter().any(|needle| message.contains(needle) || debug.contains(needle)) {
            KernelError::OutOfMemory { during, message }
        } else {
            KernelError::Device { during, message }
        }
    }
}
