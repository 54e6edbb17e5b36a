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
//! let rvq = EmaResidualVectorQuantizerConfig::new(4, 64.into(), 8)
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

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use burn::store::{KeyRemapper, ModuleStore, PytorchStore, SafetensorsStore, bridge, burn_pack};
use burn::tensor::{DType, Device, Tensor, TensorData};

mod pickle;

use crate::config::CodebookRule;
use crate::error::RvqError;
use crate::level::{BadStatistics, Schedule, check_statistics};
use crate::quantizer::EmaResidualVectorQuantizer;

/// Where a stored `embed` and the codebook derived from the stored sums may differ before the
/// import rebuilds the sums from `embed` (largest per-code relative difference).
pub const EMBED_TOLERANCE: f64 = 1e-4;

/// The name under which the store's remapper files a layer's tensors.
const CANONICAL: &str = "rvq-import";

/// Whose state dict it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// EnCodec (`encodec/quantization/core_vq.py`; transformers `EncodecResidualVectorQuantizer`).
    Encodec,
    /// Mimi (moshi `moshi/quantization/core_vq.py`; transformers `MimiResidualVectorQuantizer`).
    Mimi,
    /// vector-quantize-pytorch `ResidualVQ` (one head).
    VectorQuantizePytorch,
}

/// Which naming of a layout's keys: the codec's own, or the Hugging Face `transformers`
/// conversion's (EnCodec and Mimi only). Imports read either.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyStyle {
    /// The codec's own module names (`layers.{l}._codebook.*`).
    #[default]
    Original,
    /// The `transformers` conversion (`layers.{l}.codebook.*`, Mimi's buffers renamed).
    Transformers,
}

/// A layer's field in a layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Field {
    Initialized,
    Count,
    Sum,
    Embed,
}

impl Field {
    const ALL: [Field; 4] = [Field::Initialized, Field::Count, Field::Sum, Field::Embed];

    fn canonical(self) -> &'static str {
        match self {
            Field::Initialized => "initialized",
            Field::Count => "count",
            Field::Sum => "sum",
            Field::Embed => "embed",
        }
    }
}

impl Layout {
    /// Every layout.
    pub const ALL: [Layout; 3] = [Layout::Encodec, Layout::Mimi, Layout::VectorQuantizePytorch];

    /// The short name (`encodec`, `mimi`, `vqp`), as in the interop cases.
    pub fn name(self) -> &'static str {
        match self {
            Layout::Encodec => "encodec",
            Layout::Mimi => "mimi",
            Layout::VectorQuantizePytorch => "vqp",
        }
    }

    /// How the codec derives its codebook: the quantizer must be configured with it.
    pub fn codebook_rule(self) -> CodebookRule {
        match self {
            Layout::Mimi => CodebookRule::Clamp,
            Layout::Encodec | Layout::VectorQuantizePytorch => CodebookRule::Laplace,
        }
    }

    /// The key styles the layout has.
    fn styles(self) -> &'static [KeyStyle] {
        match self {
            Layout::VectorQuantizePytorch => &[KeyStyle::Original],
            _ => &[KeyStyle::Original, KeyStyle::Transformers],
        }
    }

    /// Whether its tensors carry a leading heads axis (`[1, K]`, `[1, K, D]`).
    fn heads_axis(self) -> bool {
        self == Layout::VectorQuantizePytorch
    }

    /// The file's shape of a layer's `[K]` or `[K, D]` tensor.
    fn file_shape(self, shape: &[usize]) -> Vec<usize> {
        let heads: &[usize] = if self.heads_axis() { &[1] } else { &[] };
        [heads, shape].concat()
    }

    /// The submodule holding the buffers.
    fn module(self, style: KeyStyle) -> &'static str {
        match style {
            KeyStyle::Original => "_codebook",
            KeyStyle::Transformers => "codebook",
        }
    }

    /// The buffer name of `field`, if the layout stores it.
    fn key(self, style: KeyStyle, field: Field) -> Option<&'static str> {
        use Field::*;
        match (self, style, field) {
            (Layout::Encodec, _, Initialized) => Some("inited"),
            (Layout::Encodec | Layout::VectorQuantizePytorch, _, Count) => Some("cluster_size"),
            (Layout::Encodec | Layout::VectorQuantizePytorch, _, Sum) => Some("embed_avg"),
            (Layout::Encodec | Layout::VectorQuantizePytorch, _, Embed) => Some("embed"),
            (Layout::VectorQuantizePytorch, _, Initialized) => Some("initted"),
            (Layout::Mimi, KeyStyle::Original, Initialized) => Some("_initialized"),
            (Layout::Mimi, KeyStyle::Transformers, Initialized) => Some("initialized"),
            (Layout::Mimi, _, Count) => Some("cluster_usage"),
            (Layout::Mimi, KeyStyle::Original, Sum) => Some("embedding_sum"),
            (Layout::Mimi, KeyStyle::Transformers, Sum) => Some("embed_sum"),
            (Layout::Mimi, _, Embed) => None,
        }
    }

    /// The file's key of `field` of level `level`.
    fn file_key(self, prefix: &str, style: KeyStyle, level: usize, field: Field) -> String {
        let name = self.key(style, field).unwrap_or("?");
        format!("{prefix}layers.{level}.{}.{name}", self.module(style))
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Layout {
    type Err = RvqError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Layout::ALL
            .into_iter()
            .find(|layout| layout.name() == name)
            .ok_or_else(|| RvqError::InvalidArgument {
                argument: "layout",
                value: format!("{name:?}"),
                rule: "must be one of \"encodec\", \"mimi\", \"vqp\"",
            })
    }
}

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

/// One level read from a file: counts `[K]`, sums `[K, D]`, in f32.
struct LevelState {
    count: Vec<f32>,
    sum: Vec<f32>,
    embed_difference: Option<f64>,
    rebuilt: bool,
}

fn checkpoint_error(file: &str, key: Option<&str>, problem: impl Into<String>) -> RvqError {
    RvqError::Checkpoint {
        file: file.to_string(),
        key: key.map(str::to_string),
        problem: problem.into(),
    }
}

impl EmaResidualVectorQuantizer {
    /// Imports a PyTorch codec's quantizer state from a `.pt`/`.pth` checkpoint or a
    /// safetensors file (told apart by their contents), replacing every level's statistics.
    ///
    /// The quantizer must have the codec's number of levels, codebook sizes, dimension and
    /// [`Layout::codebook_rule`]. The import counts as the end of any initialization: the step
    /// counter moves to the first multiple of `dead_code_check_every` past the init steps, so
    /// no k-means init runs on it and the next dead-code check comes that many training steps
    /// later (as in Mimi after loading). On error the quantizer is unchanged. Import with no
    /// training forward in flight on other threads: their pending updates would be averaged
    /// into the imported state (Burn's `RunningState`).
    pub fn try_import_pytorch(
        &self,
        path: impl AsRef<Path>,
        state: &PytorchState,
    ) -> Result<ImportReport, RvqError> {
        let path = path.as_ref();
        let file = path.display().to_string();
        let mut head = [0u8; 9];
        let is_safetensors = {
            use std::io::Read;
            let mut reader = std::fs::File::open(path)
                .map_err(|error| checkpoint_error(&file, None, format!("cannot open: {error}")))?;
            let read = reader
                .read(&mut head)
                .map_err(|error| checkpoint_error(&file, None, format!("cannot read: {error}")))?;
            read == 9 && head[8] == b'{'
        };
        let remapper = remapper(state)?;
        let tensors = if is_safetensors {
            let mut store = SafetensorsStore::from_file(path).remap(remapper);
            read_all(&mut store, &file, "safetensors")?
        } else {
            refuse_unexpected_globals(path, state, &file)?;
            let mut store = PytorchStore::from_file(path)
                .map_indices_contiguous(false)
                .remap(remapper);
            if let Some(key) = &state.top_level_key {
                store = store.with_top_level_key(key.clone());
            }
            read_all(&mut store, &file, "PyTorch")?
        };
        self.import_tensors(tensors, state, &file)
    }

    /// [`EmaResidualVectorQuantizer::try_import_pytorch`] from the bytes of a safetensors
    /// file.
    pub fn try_import_safetensors_bytes(
        &self,
        bytes: Vec<u8>,
        state: &PytorchState,
    ) -> Result<ImportReport, RvqError> {
        let mut store = SafetensorsStore::from_bytes(Some(bytes)).remap(remapper(state)?);
        let tensors = read_all(&mut store, "<bytes>", "safetensors")?;
        self.import_tensors(tensors, state, "<bytes>")
    }

    /// Writes the quantizer's state in `state`'s layout and key style, under its prefix, as a
    /// safetensors file the PyTorch module loads with `load_state_dict` (merge it into a
    /// whole model's state dict for a full checkpoint). Written to a temporary file and
    /// renamed, so an existing file is replaced whole or not at all.
    pub fn try_export_pytorch(
        &self,
        path: impl AsRef<Path>,
        state: &PytorchState,
    ) -> Result<(), RvqError> {
        let path = path.as_ref();
        let file = path.display().to_string();
        let bytes = self.try_export_safetensors_bytes(state)?;
        let mut temporary = path.as_os_str().to_owned();
        temporary.push(".tmp");
        let write =
            std::fs::write(&temporary, &bytes).and_then(|()| std::fs::rename(&temporary, path));
        write.map_err(|error| {
            let _ = std::fs::remove_file(&temporary);
            checkpoint_error(&file, None, format!("cannot write: {error}"))
        })
    }

    /// [`EmaResidualVectorQuantizer::try_export_pytorch`] into the bytes of a safetensors file.
    pub fn try_export_safetensors_bytes(&self, state: &PytorchState) -> Result<Vec<u8>, RvqError> {
        let layout = state.layout;
        self.check_layout(layout, "<export>")?;
        if !layout.styles().contains(&state.key_style) {
            return Err(RvqError::InvalidArgument {
                argument: "key_style",
                value: format!("{:?}", state.key_style),
                rule: "is not a naming of this layout (vector-quantize-pytorch has only its own)",
            });
        }
        let device = self.state_device();
        let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        let key = |level: usize, field: Field| {
            layout.file_key(&state.prefix, state.key_style, level, field)
        };
        let d = self.embedding_dim();
        for (index, level) in self.levels().iter().enumerate() {
            let statistics = level.statistics(&device);
            let k = level.num_embeddings();
            let initialized = match layout {
                Layout::VectorQuantizePytorch => (safetensors::Dtype::BOOL, vec![], vec![1u8]),
                _ => (
                    safetensors::Dtype::F32,
                    vec![1],
                    1f32.to_le_bytes().to_vec(),
                ),
            };
            tensors.push((
                key(index, Field::Initialized),
                initialized.0,
                initialized.1,
                initialized.2,
            ));
            if layout.key(state.key_style, Field::Embed).is_some() {
                // The codebook from the statistics just read.
                let codebook = statistics.codebook(self.config());
                tensors.push((
                    key(index, Field::Embed),
                    safetensors::Dtype::F32,
                    layout.file_shape(&[k, d]),
                    f32_bytes(codebook),
                ));
            }
            tensors.push((
                key(index, Field::Count),
                safetensors::Dtype::F32,
                layout.file_shape(&[k]),
                f32_bytes(statistics.counts),
            ));
            tensors.push((
                key(index, Field::Sum),
                safetensors::Dtype::F32,
                layout.file_shape(&[k, d]),
                f32_bytes(statistics.sums),
            ));
        }
        let views = tensors
            .iter()
            .map(|(name, dtype, shape, bytes)| {
                safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                    .map(|view| (name.clone(), view))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| checkpoint_error("<export>", None, error.to_string()))?;
        safetensors::serialize(views, None)
            .map_err(|error| checkpoint_error("<export>", None, error.to_string()))
    }

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

    fn import_tensors(
        &self,
        tensors: BTreeMap<String, burn_pack::Tensor>,
        state: &PytorchState,
        file: &str,
    ) -> Result<ImportReport, RvqError> {
        let layout = state.layout;
        self.check_layout(layout, file)?;
        // The remapper filed the layer's tensors as `rvq-import.{l}.{module}.{field}`.
        let mut found: BTreeMap<(usize, Field), (KeyStyle, &burn_pack::Tensor)> = BTreeMap::new();
        let mut other_keys = 0;
        for (name, tensor) in &tensors {
            match parse_canonical(name) {
                Some((level, style, field)) => {
                    if let Some((other, _)) = found.insert((level, field), (style, tensor)) {
                        let key = |style| layout.file_key(&state.prefix, style, level, field);
                        return Err(checkpoint_error(
                            file,
                            Some(&key(style)),
                            format!(
                                "and `{}` are both in the file: one naming expected (the \
                                 codec's own or transformers')",
                                key(other)
                            ),
                        ));
                    }
                }
                None => other_keys += 1,
            }
        }
        if found.is_empty() {
            return Err(no_layout_keys(&tensors, state, file));
        }
        let key_style = found
            .values()
            .next()
            .map(|(style, _)| *style)
            .unwrap_or_default();
        let levels_in_file: Vec<usize> = found
            .keys()
            .map(|(level, _)| *level)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let num_levels = self.num_levels();
        if levels_in_file.iter().any(|&level| level >= num_levels) {
            return Err(checkpoint_error(
                file,
                None,
                format!(
                    "holds levels {levels_in_file:?} of `{layout}` state under prefix {:?}, \
                     expected {num_levels} levels (num_levels of this quantizer)",
                    state.prefix
                ),
            ));
        }
        let mut keys = Vec::new();
        let mut levels = Vec::with_capacity(num_levels);
        let (rule, epsilon) = (self.config().codebook_rule, self.config().epsilon);
        let d = self.embedding_dim();
        for (index, k) in self.sizes().into_iter().enumerate() {
            let mut read = |field: Field, shape: &[usize]| -> Result<Option<Vec<f32>>, RvqError> {
                let key = layout.file_key(&state.prefix, key_style, index, field);
                let Some(_) = layout.key(key_style, field) else {
                    return Ok(None);
                };
                let Some((_, tensor)) = found.get(&(index, field)) else {
                    return Err(checkpoint_error(
                        file,
                        Some(&key),
                        format!(
                            "is missing: expected level {index} of {num_levels} (the file holds \
                             levels {levels_in_file:?} of `{layout}` state)"
                        ),
                    ));
                };
                keys.push(key.clone());
                read_tensor(tensor, field, shape, layout, file, &key).map(Some)
            };
            let initialized = read(Field::Initialized, &[])?.unwrap_or_default();
            let count = read(Field::Count, &layout.file_shape(&[k]))?.unwrap_or_default();
            let sum = read(Field::Sum, &layout.file_shape(&[k, d]))?.unwrap_or_default();
            let embed = read(Field::Embed, &layout.file_shape(&[k, d]))?;
            let key = |field| layout.file_key(&state.prefix, key_style, index, field);
            if initialized.first().is_none_or(|&flag| flag == 0.0) {
                return Err(checkpoint_error(
                    file,
                    Some(&key(Field::Initialized)),
                    "is 0: the level's k-means init has not run, so the file holds no trained \
                     codebook (expected 1)",
                ));
            }
            check_values(
                &count,
                &sum,
                d,
                file,
                (&key(Field::Count), &key(Field::Sum)),
            )?;
            let mut level_state = LevelState {
                count,
                sum,
                embed_difference: None,
                rebuilt: false,
            };
            if let Some(embed) = embed {
                if let Some((at, value)) = embed.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                    return Err(checkpoint_error(
                        file,
                        Some(&key(Field::Embed)),
                        format!(
                            "holds {value} at code {}, dimension {}, expected finite values",
                            at / d,
                            at % d
                        ),
                    ));
                }
                compare_embed(&mut level_state, &embed, d, epsilon);
                if level_state.rebuilt {
                    let sum_key = format!("{} (rebuilt from `embed`)", key(Field::Sum));
                    let keys = (key(Field::Count), sum_key);
                    check_values(
                        &level_state.count,
                        &level_state.sum,
                        d,
                        file,
                        (&keys.0, &keys.1),
                    )?;
                }
            }
            check_codebook(&level_state, d, (rule, epsilon), file, &key(Field::Sum))?;
            levels.push(level_state);
        }
        // Everything is checked: replace the state.
        let device = self.state_device();
        for (index, (k, read)) in self.sizes().into_iter().zip(&levels).enumerate() {
            let count = Tensor::<1>::from_data(TensorData::new(read.count.clone(), [k]), &device);
            let sum = Tensor::<2>::from_data(TensorData::new(read.sum.clone(), [k, d]), &device);
            self.try_set_statistics(index, count, sum)?;
        }
        self.set_steps_taken(Schedule::of(self.config()).steps_after_import());
        Ok(ImportReport {
            layout,
            key_style,
            keys,
            other_keys,
            embed_difference: levels.iter().map(|level| level.embed_difference).collect(),
            rebuilt_levels: (0..levels.len()).filter(|&l| levels[l].rebuilt).collect(),
        })
    }
}

/// Refuses a `.pt` file whose pickles name anything but what a state dict needs (see
/// `pickle`).
fn refuse_unexpected_globals(
    path: &Path,
    state: &PytorchState,
    file: &str,
) -> Result<(), RvqError> {
    match pickle::check_file(path, &state.trusted_globals) {
        Ok(()) => Ok(()),
        Err(pickle::Refusal::Global(name)) => Err(checkpoint_error(
            file,
            None,
            format!(
                "names `{name}` in its pickle, expected only tensors, storages, dtypes and \
                 plain containers: PyTorch would call it on loading the file; refused \
                 (nothing from the file was run; `PytorchState::with_trusted_global({name:?})` \
                 accepts it if you know the file)"
            ),
        )),
        Err(pickle::Refusal::Unreadable(reason)) => Err(checkpoint_error(
            file,
            None,
            format!("is not a readable PyTorch file: {reason}"),
        )),
    }
}

/// The store's remapper: the layout's keys under the prefix, in either naming, onto
/// `rvq-import.{l}.{style}.{field}`.
fn remapper(state: &PytorchState) -> Result<KeyRemapper, RvqError> {
    let mut remapper = KeyRemapper::new();
    let prefix = regex::escape(&state.prefix);
    for &style in state.layout.styles() {
        for field in Field::ALL {
            let Some(name) = state.layout.key(style, field) else {
                continue;
            };
            let module = state.layout.module(style);
            let style_name = match style {
                KeyStyle::Original => "original",
                KeyStyle::Transformers => "transformers",
            };
            remapper = remapper
                .add_pattern(
                    format!(r"^{prefix}layers\.(\d+)\.{module}\.{name}$"),
                    format!("{CANONICAL}.$1.{style_name}.{}", field.canonical()),
                )
                .map_err(|error| RvqError::InvalidArgument {
                    argument: "prefix",
                    value: format!("{:?} ({error})", state.prefix),
                    rule: "must make a valid key pattern",
                })?;
        }
    }
    Ok(remapper)
}

fn parse_canonical(name: &str) -> Option<(usize, KeyStyle, Field)> {
    let rest = name.strip_prefix(CANONICAL)?.strip_prefix('.')?;
    let mut parts = rest.split('.');
    let level = parts.next()?.parse().ok()?;
    let style = match parts.next()? {
        "original" => KeyStyle::Original,
        "transformers" => KeyStyle::Transformers,
        _ => return None,
    };
    let field = match parts.next()? {
        "initialized" => Field::Initialized,
        "count" => Field::Count,
        "sum" => Field::Sum,
        "embed" => Field::Embed,
        _ => return None,
    };
    parts.next().is_none().then_some((level, style, field))
}

fn read_all<S: ModuleStore>(
    store: &mut S,
    file: &str,
    kind: &str,
) -> Result<BTreeMap<String, burn_pack::Tensor>, RvqError>
where
    S::Error: fmt::Display,
{
    store.get_all_tensors().cloned().map_err(|error| {
        checkpoint_error(
            file,
            None,
            format!("is not a readable {kind} file: {error}"),
        )
    })
}

/// The error when no key of the layout is under the prefix: what is there, and which layout
/// its keys look like.
fn no_layout_keys(
    tensors: &BTreeMap<String, burn_pack::Tensor>,
    state: &PytorchState,
    file: &str,
) -> RvqError {
    let under_prefix: Vec<&String> = tensors
        .keys()
        .filter(|key| key.starts_with(&state.prefix))
        .collect();
    let sample: Vec<&String> = match under_prefix.is_empty() {
        true => tensors.keys().take(4).collect(),
        false => under_prefix.iter().take(4).copied().collect(),
    };
    let looks_like = Layout::ALL.into_iter().find(|&other| {
        other != state.layout
            && other.styles().iter().any(|&style| {
                let name = other.key(style, Field::Sum).unwrap_or("?");
                let suffix = format!(".{}.{name}", other.module(style));
                under_prefix.iter().any(|key| key.ends_with(&suffix))
            })
    });
    let hint = match looks_like {
        Some(other) => format!("; they look like the `{other}` layout"),
        None => String::new(),
    };
    let expected = state
        .layout
        .file_key(&state.prefix, KeyStyle::Original, 0, Field::Sum);
    checkpoint_error(
        file,
        None,
        format!(
            "holds no `{}` quantizer state under prefix {:?}: expected keys such as `{expected}`, \
             found {} keys under the prefix ({} in all, e.g. {sample:?}){hint}",
            state.layout,
            state.prefix,
            under_prefix.len(),
            tensors.len()
        ),
    )
}

/// A tensor's values as f32, after checking its kind and shape.
fn read_tensor(
    tensor: &burn_pack::Tensor,
    field: Field,
    shape: &[usize],
    layout: Layout,
    file: &str,
    key: &str,
) -> Result<Vec<f32>, RvqError> {
    let dtype = tensor.dtype;
    let kind_ok = match field {
        Field::Initialized => dtype.is_float() || matches!(dtype, DType::Bool(_)),
        _ => dtype.is_float() && !matches!(dtype, DType::QFloat(_)),
    };
    if !kind_ok {
        return Err(checkpoint_error(
            file,
            Some(key),
            format!(
                "has dtype {dtype:?}, expected {}",
                match field {
                    Field::Initialized => "a float or bool flag",
                    _ => "floats",
                }
            ),
        ));
    }
    let got = tensor.shape.to_vec();
    let shape_ok = match field {
        // EnCodec and Mimi store `[1]`, vector-quantize-pytorch a 0-d bool.
        Field::Initialized => got.iter().product::<usize>() == 1 && got.len() <= 1,
        _ => got == shape,
    };
    if !shape_ok {
        let expected = match field {
            Field::Initialized => "one value ([1] or [])".to_string(),
            _ => format!("{shape:?}"),
        };
        let heads = if layout.heads_axis() && got.len() == shape.len() && got[0] != 1 {
            " (vector-quantize-pytorch with heads > 1: only one head is supported)"
        } else {
            ""
        };
        return Err(checkpoint_error(
            file,
            Some(key),
            format!("has shape {got:?}, expected {expected}{heads}"),
        ));
    }
    let data = bridge::to_data(tensor)
        .map_err(|error| checkpoint_error(file, Some(key), format!("cannot be read: {error:?}")))?;
    Ok(data.iter::<f32>().collect())
}

/// The statistics as every level needs them (`level::check_statistics`), the error naming
/// the file's keys and where the value sits.
fn check_values(
    count: &[f32],
    sum: &[f32],
    d: usize,
    file: &str,
    (count_key, sum_key): (&str, &str),
) -> Result<(), RvqError> {
    let (key, problem) = match check_statistics(count, sum) {
        Ok(()) => return Ok(()),
        Err(BadStatistics::Count { at, value }) => (
            count_key,
            format!("holds {value} at code {at}, expected finite counts >= 0"),
        ),
        Err(BadStatistics::ZeroTotal) => (
            count_key,
            "sums to 0, expected a positive total (no training step has run on this level)"
                .to_string(),
        ),
        Err(BadStatistics::Sum { at, value }) => (
            sum_key,
            format!(
                "holds {value} at code {}, dimension {}, expected finite values",
                at / d,
                at % d
            ),
        ),
    };
    Err(checkpoint_error(file, Some(key), problem))
}

/// The codebook the statistics derive (by the level's rule, in f32 as the paths compute it)
/// must be finite: counts so small that the smoothing underflows, or sums so large that the
/// division overflows, are refused here rather than found as NaN in training.
fn check_codebook(
    level: &LevelState,
    d: usize,
    (rule, epsilon): (CodebookRule, f64),
    file: &str,
    sum_key: &str,
) -> Result<(), RvqError> {
    let divisors = rule.divisors(&level.count, epsilon);
    for (code, &divisor) in divisors.iter().enumerate() {
        let row = &level.sum[code * d..(code + 1) * d];
        if let Some(value) = row.iter().map(|&m| m / divisor).find(|v| !v.is_finite()) {
            return Err(checkpoint_error(
                file,
                Some(sum_key),
                format!(
                    "gives a codebook entry of {value} at code {code} (count {}, divided by \
                     {divisor} under CodebookRule::{rule:?}), expected finite values",
                    level.count[code]
                ),
            ));
        }
    }
    Ok(())
}

/// Compares the stored `embed` with the codebook the Laplace rule derives from the
/// statistics (the layouts that store `embed` use it), and rebuilds the sums from `embed`
/// when they differ by more than [`EMBED_TOLERANCE`].
fn compare_embed(level: &mut LevelState, embed: &[f32], d: usize, epsilon: f64) {
    let smoothed = CodebookRule::Laplace.divisors(&level.count, epsilon);
    let mut worst = 0.0f64;
    for (code, &c) in smoothed.iter().enumerate() {
        let row = code * d..(code + 1) * d;
        let (mut diff, mut norm) = (0.0f64, 0.0f64);
        for (&m, &e) in level.sum[row.clone()].iter().zip(&embed[row]) {
            let derived = f64::from(m / c);
            diff += (derived - f64::from(e)).powi(2);
            norm += f64::from(e).powi(2);
        }
        let relative = diff.sqrt() / norm.sqrt().max(1e-12);
        worst = worst.max(if relative.is_finite() {
            relative
        } else {
            f64::INFINITY
        });
    }
    level.embed_difference = Some(worst);
    if worst > EMBED_TOLERANCE {
        for (code, &c) in smoothed.iter().enumerate() {
            for j in 0..d {
                level.sum[code * d + j] = embed[code * d + j] * c;
            }
        }
        level.rebuilt = true;
    }
}

fn f32_bytes<const D: usize>(tensor: Tensor<D>) -> Vec<u8> {
    tensor
        .into_data()
        .iter::<f32>()
        .flat_map(f32::to_le_bytes)
        .collect()
}
