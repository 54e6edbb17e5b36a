//! The one error type of the crate.
//!
//! Every message names what was expected and what came, so that a wrong configuration or a
//! wrongly shaped tensor is found at the call that received it, not hours later in training.

use std::fmt;

/// What went wrong in a fallible (`try_*`) call.
///
/// A call that returns an error has left the quantizer's state exactly as it was.
#[derive(Debug, Clone, PartialEq)]
pub enum RvqError {
    /// A configuration value breaks its rule.
    InvalidConfig {
        /// The configuration field, e.g. `ema_decay`.
        parameter: &'static str,
        /// The value that was given, formatted.
        value: String,
        /// The rule it breaks, e.g. `must lie in [0, 1]`.
        rule: &'static str,
    },
    /// An argument of a call breaks its rule.
    InvalidArgument {
        /// The argument, e.g. `frames_per_second`.
        argument: &'static str,
        /// The value that was given, formatted.
        value: String,
        /// The rule it breaks, e.g. `must be finite and > 0`.
        rule: &'static str,
    },
    /// The last dimension of the input is not `embedding_dim`.
    InputDim {
        /// `embedding_dim` of the quantizer.
        expected: usize,
        /// The shape that came.
        shape: Vec<usize>,
    },
    /// A padding mask's shape is not the input's leading shape.
    MaskShape {
        /// The input's shape without its last dimension.
        expected: Vec<usize>,
        /// The mask's shape.
        got: Vec<usize>,
    },
    /// A number of levels outside `1..=num_levels` was asked for.
    LevelCount {
        /// The number of levels asked for.
        requested: usize,
        /// The levels the quantizer has.
        available: usize,
    },
    /// `decode` got index tensors of different lengths, or a length that does not match the
    /// requested output shape.
    IndicesLength {
        /// The level (0-based) whose index tensor is off.
        level: usize,
        /// The number of vectors the output shape holds.
        expected: usize,
        /// The length of that level's index tensor.
        got: usize,
    },
    /// An index outside `0..num_embeddings` of its level.
    IndexOutOfRange {
        /// The level (0-based).
        level: usize,
        /// The smallest index found at that level.
        min: i64,
        /// The largest index found at that level.
        max: i64,
        /// The codebook size of that level.
        num_embeddings: usize,
    },
    /// A state tensor given to the quantizer has the wrong shape.
    StateShape {
        /// The state tensor, e.g. `levels.1.ema_weight`.
        field: String,
        /// The shape the quantizer needs.
        expected: Vec<usize>,
        /// The shape that came.
        got: Vec<usize>,
    },
    /// A state tensor given to the quantizer holds values that would poison the EMA
    /// (negative or non-finite counts, non-finite sums).
    InvalidState {
        /// The state tensor, e.g. `levels.0.ema_count`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A PyTorch checkpoint could not be imported or exported (module `interop`, feature
    /// `pytorch`).
    Checkpoint {
        /// The file's path (`<bytes>` for in-memory files, `<export>` while exporting).
        file: String,
        /// The key at fault, when one is.
        key: Option<String>,
        /// What is wrong, with what was expected and what came.
        problem: String,
    },
    /// A compressed stream could not be written or read (see [`StreamError`]).
    Stream(StreamError),
}

impl fmt::Display for RvqError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidConfig {
                parameter,
                value,
                rule,
            } => write!(f, "invalid configuration: `{parameter}` = {value} {rule}"),
            Self::InvalidArgument {
                argument,
                value,
                rule,
            } => write!(f, "invalid argument: `{argument}` = {value} {rule}"),
            Self::InputDim { expected, shape } => write!(
                f,
                "input of shape {shape:?} has last dimension {}, expected embedding_dim = \
                 {expected} (input shape must be [..., {expected}])",
                shape.last().copied().unwrap_or(0)
            ),
            Self::MaskShape { expected, got } => write!(
                f,
                "mask of shape {got:?}, expected the input's leading shape {expected:?} (true \
                 where a position is real)"
            ),
            Self::LevelCount {
                requested,
                available,
            } => write!(
                f,
                "asked for {requested} levels, expected between 1 and num_levels = {available}"
            ),
            Self::IndicesLength {
                level,
                expected,
                got,
            } => write!(
                f,
                "indices of level {level} hold {got} codes, expected {expected} (one per vector \
                 of the output shape)"
            ),
            Self::IndexOutOfRange {
                level,
                min,
                max,
                num_embeddings,
            } => write!(
                f,
                "indices of level {level} range over [{min}, {max}], expected 0 <= index < \
                 num_embeddings = {num_embeddings}"
            ),
            Self::StateShape {
                field,
                expected,
                got,
            } => write!(
                f,
                "state `{field}` has shape {got:?}, expected {expected:?}"
            ),
            Self::InvalidState { field, reason } => write!(f, "state `{field}` {reason}"),
            Self::Checkpoint { file, key, problem } => match key {
                Some(key) => write!(f, "checkpoint {file}: `{key}` {problem}"),
                None => write!(f, "checkpoint {file} {problem}"),
            },
            Self::Stream(error) => error.fmt(f),
        }
    }
}

impl std::error::Error for RvqError {}

/// Why a stream could not be written or read.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamError {
    /// The stream ends before the header or the payload it declares.
    Truncated {
        /// Bytes the stream needs.
        needed: usize,
        /// Bytes that came.
        got: usize,
    },
    /// The stream is longer than it declares.
    TrailingBytes {
        /// Bytes the stream declares.
        declared: usize,
        /// Bytes that came.
        got: usize,
    },
    /// The first four bytes are not `RVQZ`.
    BadMagic {
        /// The bytes found.
        found: [u8; 4],
    },
    /// A format version this crate cannot read.
    UnsupportedVersion {
        /// The version in the stream.
        found: u8,
        /// The newest version this crate reads (it reads every one from 1).
        supported: u8,
    },
    /// The checksum does not match the bytes: the stream was altered.
    Checksum {
        /// The checksum stored in the stream.
        stored: u64,
        /// The checksum of the bytes that came.
        computed: u64,
    },
    /// The stream was written by a quantizer of another configuration.
    ConfigMismatch {
        /// What differs, e.g. `K of level 2`.
        field: String,
        /// The stream's value.
        stream: String,
        /// This quantizer's value.
        quantizer: String,
    },
    /// The stream was coded with other probability tables (another checkpoint's counts).
    ModelMismatch {
        /// The fingerprint in the stream.
        stream: u64,
        /// The fingerprint of this quantizer's tables.
        quantizer: u64,
    },
    /// The header or payload is inconsistent in a way the checksum cannot catch.
    Malformed {
        /// What is inconsistent.
        reason: String,
    },
    /// A level's codebook is too large for the fixed-point tables.
    UnsupportedCodebookSize {
        /// The level (0-based).
        level: usize,
        /// Its `K`.
        size: usize,
        /// The largest `K` that can be coded.
        max: usize,
    },
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated { needed, got } => write!(
                f,
                "stream truncated: {got} bytes, expected at least {needed}"
            ),
            Self::TrailingBytes { declared, got } => write!(
                f,
                "stream has {got} bytes, expected {declared} as its header declares"
            ),
            Self::BadMagic { found } => write!(
                f,
                "not an rvq-burn stream: starts with {found:?}, expected {:?} (\"RVQZ\")",
                *b"RVQZ"
            ),
            Self::UnsupportedVersion { found, supported } => {
                write!(
                    f,
                    "stream format version {found}, expected 1 to {supported}"
                )
            }
            Self::Checksum { stored, computed } => write!(
                f,
                "stream corrupted: checksum of its bytes is {computed:016x}, expected the \
                 stored {stored:016x}"
            ),
            Self::ConfigMismatch {
                field,
                stream,
                quantizer,
            } => write!(
                f,
                "stream was written by another configuration: {field} is {stream} in the \
                 stream, expected {quantizer} (this quantizer)"
            ),
            Self::ModelMismatch { stream, quantizer } => write!(
                f,
                "stream was coded with probability tables {stream:016x}, this quantizer's are \
                 {quantizer:016x}: decode with the checkpoint (EMA counts) that wrote it"
            ),
            Self::Malformed { reason } => write!(f, "malformed stream: {reason}"),
            Self::UnsupportedCodebookSize { level, size, max } => write!(
                f,
                "level {level} has {size} codes, expected 1 to {max} for entropy coding"
            ),
        }
    }
}

impl From<StreamError> for RvqError {
    fn from(error: StreamError) -> Self {
        RvqError::Stream(error)
    }
}
