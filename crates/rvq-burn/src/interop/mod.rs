//! The quantizer state of PyTorch codecs, in and out (feature `pytorch`): EnCodec, Mimi and
//! vector-quantize-pytorch keep exactly this layer's state, an EMA count and an EMA sum per
//! code and level, under their own key names.
//!
//! | layout | keys after `{prefix}layers.{l}.` | codebook |
//! |---|---|---|
//! | [`Layout::Encodec`] | `_codebook.{inited, cluster_size, embed, embed_avg}` (transformers: `codebook.*`) | Laplace |
//! | [`Layout::Mimi`] | `_codebook.{_initialized, cluster_usage, embedding_sum}` (transformers: `codebook.{initialized, cluster_usage, embed_sum}`) | clamp |
//! | [`Layout::VectorQuantizePytorch`] | `_codebook.{initted, cluster_size, embed_avg, embed}`, a heads axis of 1 first | Laplace |
//!
//! Files are read through burn-store: `.pt`/`.pth` with its `PytorchStore` (a pickle reader
//! that never runs anything from the file), safetensors with its `SafetensorsStore`, the
//! layout's keys mapped onto the layer's by the store's `KeyRemapper`; everything else in
//! the file (a whole model's weights) is left alone. Exports are safetensors files the
//! PyTorch module loads with `load_state_dict`.
//!
//! ```
//! # let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/interop");
//! use burn::tensor::{Device, Distribution, Tensor};
//! use rvq_burn::{EmaResidualVectorQuantizerConfig, KeyStyle, Layout, PytorchState};
//!
//! let device = Device::flex();
//! // Mimi's acoustic quantizer: its levels, sizes and dimension, and its codebook rule.
//! let mut rvq = EmaResidualVectorQuantizerConfig::new(4, 64.into(), 8)
//!     .with_codebook_rule(Layout::Mimi.codebook_rule())
//!     .init(&device);
//! // A whole moshi checkpoint: only the keys under the prefix are read.
//! let state = PytorchState::new(Layout::Mimi)
//!     .with_prefix("quantizer.rvq_rest.vq.")
//!     .with_top_level_key("model");
//! let report = rvq.try_import_pytorch(format!("{fixtures}/mimi_m4_k64_d8.model.pt"), &state)?;
//! assert_eq!(report.keys.len(), 12);
//!
//! // Fine-tune in Burn, then hand the state back, named as transformers names it.
//! let x = Tensor::<2>::random([256, 8], Distribution::Normal(0.0, 1.0), &device);
//! let _ = rvq.forward(x.autodiff());
//! rvq.sync_state();
//! let out = std::env::temp_dir().join("rvq-interop-doc.safetensors");
//! let hf = PytorchState::new(Layout::Mimi)
//!     .with_prefix("quantizer.acoustic_residual_vector_quantizer.")
//!     .with_key_style(KeyStyle::Transformers);
//! rvq.try_export_pytorch(&out, &hf)?;
//! # std::fs::remove_file(out).ok();
//! # Ok::<(), rvq_burn::RvqError>(())
//! ```

mod export;
mod import;
mod layout;
mod pickle;
mod projection;

use std::fmt;

use burn::tensor::Device;

pub use self::layout::{KeyStyle, Layout};
use crate::error::RvqError;
use crate::quantizer::EmaResidualVectorQuantizer;

/// Where a stored `embed` and the codebook derived from the stored sums may differ before the
/// import rebuilds the sums from `embed` (largest per-code relative difference).
pub const EMBED_TOLERANCE: f64 = 1e-4;

/// Where a codec's quantizer state sits in a checkpoint, and how it is named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PytorchState {
    /// The codec.
    pub layout: Layout,
    /// Prefix of the quantizer's keys, e.g. `quantizer.vq.` (EnCodec),
    /// `quantizer.rvq_rest.vq.` (Mimi), `quantizer.acoustic_residual_vector_quantizer.`
    /// (transformers' Mimi); empty for a quantizer's own `state_dict()`.
    pub prefix: String,
    /// The naming written by exports (imports read either).
    pub key_style: KeyStyle,
    /// For `.pt` files that nest the state dict under a key (e.g. `state_dict`, `model`).
    pub top_level_key: Option<String>,
    /// Globals (`module.name`) a `.pt` file's pickle may name besides tensors, storages,
    /// dtypes and containers, e.g. `numpy.core.multiarray.scalar` in a training checkpoint
    /// you trust. Nothing is ever called either way; without this such a file is refused.
    pub trusted_globals: Vec<String>,
}

impl PytorchState {
    /// The layout's state at the root of the file, original key names.
    pub fn new(layout: Layout) -> Self {
        Self {
            layout,
            prefix: String::new(),
            key_style: KeyStyle::Original,
            top_level_key: None,
            trusted_globals: Vec::new(),
        }
    }

    /// With the quantizer's keys under `prefix`.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// With exports named in `style`.
    pub fn with_key_style(mut self, style: KeyStyle) -> Self {
        self.key_style = style;
        self
    }

    /// With a `.pt` file's state dict read from under `key`.
    pub fn with_top_level_key(mut self, key: impl Into<String>) -> Self {
        self.top_level_key = Some(key.into());
        self
    }

    /// With `module.name` accepted in a `.pt` file's pickle (see
    /// [`PytorchState::trusted_globals`]).
    pub fn with_trusted_global(mut self, name: impl Into<String>) -> Self {
        self.trusted_globals.push(name.into());
        self
    }
}

/// What an import found and did.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportReport {
    /// The layout read.
    pub layout: Layout,
    /// The naming the file used.
    pub key_style: KeyStyle,
    /// The file's keys that were read, in order.
    pub keys: Vec<String>,
    /// Keys of the file that are not the quantizer's (a whole model's other weights).
    pub other_keys: usize,
    /// Per level, for layouts that store the codebook (`embed`): the largest per-code
    /// relative difference between it and the codebook derived from the stored statistics.
    pub embed_difference: Vec<Option<f64>>,
    /// Levels whose stored `embed` differed from the derived codebook by more than
    /// [`EMBED_TOLERANCE`] (EnCodec right after its k-means init, when `embed_avg` holds the
    /// centroids rather than centroid x count): their sums were rebuilt as `embed` x the
    /// smoothed counts, so the codes are the codec's.
    pub rebuilt_levels: Vec<usize>,
}

impl fmt::Display for ImportReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "imported {} levels of {} state ({:?} keys), {} keys read, {} other keys left alone",
            self.embed_difference.len(),
            self.layout,
            self.key_style,
            self.keys.len(),
            self.other_keys
        )?;
        if !self.rebuilt_levels.is_empty() {
            write!(
                f,
                "; levels {:?}: the stored `embed` differs from embed_avg / smoothed counts by \
                 more than {EMBED_TOLERANCE} (state right after EnCodec's k-means init), sums \
                 rebuilt from `embed`",
                self.rebuilt_levels
            )?;
        }
        Ok(())
    }
}

fn checkpoint_error(file: &str, key: Option<&str>, problem: impl Into<String>) -> RvqError {
    RvqError::Checkpoint {
        file: file.to_string(),
        key: key.map(str::to_string),
        problem: problem.into(),
    }
}

impl EmaResidualVectorQuantizer {
    /// The device the state lives on.
    fn state_device(&self) -> Device {
        self.levels()[0].state_device()
    }

    /// The quantizer derives its codebooks as `layout` does.
    fn check_layout(&self, layout: Layout, file: &str) -> Result<(), RvqError> {
        let rule = self.config().codebook_rule;
        if rule != layout.codebook_rule() {
            return Err(checkpoint_error(
                file,
                None,
                format!(
                    "layout `{layout}` derives its codebook by CodebookRule::{:?}, this \
                     quantizer by CodebookRule::{rule:?}: configure it with \
                     `.with_codebook_rule(CodebookRule::{:?})`",
                    layout.codebook_rule(),
                    layout.codebook_rule()
                ),
            ));
        }
        Ok(())
    }
}
