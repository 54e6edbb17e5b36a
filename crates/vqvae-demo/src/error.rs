//! Errors of the demo, each printed as one line that says what to fix.

use std::fmt;
use std::path::Path;

use crate::data::DataError;

/// Why a run stopped.
#[derive(Debug)]
pub enum DemoError {
    /// A data file is missing or malformed.
    Data(DataError),
    /// The quantizer's configuration breaks a rule.
    Quantizer(rvq_burn::RvqError),
    /// Another configuration or command-line problem.
    Config(String),
    /// A training step failed (a worker thread panicked).
    Training(String),
    /// A compressed stream did not round-trip.
    Codec(String),
    /// The backend's device cannot be had (no adapter, too few, a driver that fails).
    Device(String),
    /// A checkpoint is missing or does not fit the model.
    Checkpoint(String),
    /// A file could not be read or written.
    Io(String),
}

impl DemoError {
    /// An I/O error on `path`.
    pub fn io(path: &Path, error: std::io::Error) -> Self {
        Self::Io(format!("{}: {error}", path.display()))
    }
}

impl fmt::Display for DemoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Data(error) => write!(f, "data: {error}"),
            Self::Quantizer(error) => write!(f, "quantizer: {error}"),
            Self::Config(message) => write!(f, "configuration: {message}"),
            Self::Training(message) => write!(f, "training: {message}"),
            Self::Codec(message) => write!(f, "codec: {message}"),
            Self::Device(message) => write!(f, "device: {message}"),
            Self::Checkpoint(message) => write!(f, "checkpoint: {message}"),
            Self::Io(message) => write!(f, "{message}"),
        }
    }
}

impl std::error::Error for DemoError {}

/// The message a panic carried (its `String` or `&str` payload), for an error that reports a
/// panic caught on another thread.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("a panic without a message")
}

impl From<DataError> for DemoError {
    fn from(error: DataError) -> Self {
        Self::Data(error)
    }
}

impl From<rvq_burn::RvqError> for DemoError {
    fn from(error: rvq_burn::RvqError) -> Self {
        Self::Quantizer(error)
    }
}
