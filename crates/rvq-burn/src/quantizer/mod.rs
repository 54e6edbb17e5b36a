//! The residual stack: [`EmaResidualVectorQuantizer`], its creation, its state and what
//! `init` fixed.
//!
//! ```text
//! r_1 = x
//! for l in 1..=M:
//!     idx_l = argmin_k ||r_l - e_k||^2         (codebook from before this step's update)
//!     q_l   = e[idx_l]
//!     loss += beta * mean((sg(q_l) - r_l)^2)
//!     EMA update of level l                   (training only)
//!     r_{l+1} = r_l - sg(q_l)
//! y = x + sg(sum_l q_l - x)                    one straight-through estimator, on the sum
//! ```
//!
//! The entry points (`forward`, `encode`, `decode`) are in `forward.rs`, the loss and the
//! gradient estimators in `estimator.rs`, the bitrate arithmetic in `bitrate.rs`, the
//! rate-distortion encoding (`try_encode_with`, `try_decode_partial`) in
//! `rate_distortion.rs`.

mod bitrate;
mod estimator;
mod forward;
mod projection;
mod rate_distortion;

use burn::module::{Content, DisplaySettings, Flag, Module, ModuleDisplay, Param, RunningState};
use burn::tensor::{Device, Int, Tensor};

#[cfg(feature = "pytorch")]
pub(crate) use self::projection::LinearValues;
pub use self::projection::Projection;
use crate::config::EmaResidualVectorQuantizerConfig;
use crate::error::RvqError;
use crate::level::{EmaCodebook, Statistics};
use crate::metrics::CodebookHealth;

/// Residual vector quantizer with EMA codebook updates, a drop-in VQ-VAE bottleneck.
///
/// Behaves as the Keras layer `EmaResidualVectorQuantizer` of helia-edge 0.6.2 (see the crate
/// documentation). Create it with [`EmaResidualVectorQuantizerConfig::init`]; its
/// configuration is fixed then and read back with [`EmaResidualVectorQuantizer::config`].
///
/// Training and evaluation are told apart as in Burn's `BatchNorm`: the EMA statistics are
/// updated when the input lives on an autodiff device and the layer is not frozen
/// ([`Module::freeze`]); [`Module::valid`] gives a copy that never updates.
/// [`ForwardOptions::update_ema`](crate::ForwardOptions::update_ema) skips the update for one
/// call.
///
/// # State
///
/// Per level `l` (0-based in record paths, 1-based in the reference's names):
/// `levels.{l}.ema_count` `[K_l]` is the reference's `ema_count_l{l+1}`,
/// `levels.{l}.ema_weight` `[K_l, D]` its `ema_weight_l{l+1}`, and the codebook
/// (`codebook_l{l+1}`) is derived from them ([`EmaResidualVectorQuantizer::codebook`]);
/// `steps` `[1]` counts the training steps taken. The statistics are `RunningState`s:
/// optimizers never see them, records save them. Updates are deferred until read; call
/// [`EmaResidualVectorQuantizer::sync_state`] (or `valid()`) before
/// `save_file`/`into_record` right after a training step.
#[derive(Module, Debug)]
#[module(custom_display)]
pub struct EmaResidualVectorQuantizer {
    /// The codebooks, one per level.
    levels: Vec<EmaCodebook>,
    /// The projections into the codebooks' space and back, with `codebook_dim`.
    projection: Option<Projection>,
    /// Whether training forwards update the EMA statistics (cleared by `freeze()` and in
    /// `valid()` copies).
    training: Param<Flag>,
    /// Number of EMA steps taken so far, `[1]` (0 until the first training step; k-means
    /// init runs on that step, dead-code checks and quantizer dropout are keyed to it).
    steps: RunningState<Tensor<1>>,
    /// The configuration `init` was given: the one copy every part reads.
    #[module(skip)]
    config: EmaResidualVectorQuantizerConfig,
}

impl EmaResidualVectorQuantizerConfig {
    /// Creates the quantizer on `device`, with the reference's initial state: codebooks
    /// uniform in `[-1/K, 1/K]`, counts one, sums equal to the codebooks.
    ///
    /// # Panics
    ///
    /// If the configuration breaks a rule of [`EmaResidualVectorQuantizerConfig::validate`];
    /// use [`EmaResidualVectorQuantizerConfig::try_init`] for configurations read from files.
    pub fn init(&self, device: &Device) -> EmaResidualVectorQuantizer {
        self.try_init(device)
            .unwrap_or_else(|error| panic!("{error}"))
    }

    /// Fallible [`EmaResidualVectorQuantizerConfig::init`].
    pub fn try_init(&self, device: &Device) -> Result<EmaResidualVectorQuantizer, RvqError> {
        self.validate()?;
        let levels = self
            .sizes()
            .into_iter()
            .map(|size| EmaCodebook::init(size, self.codebook_space_dim(), device))
            .collect();
        let projection = self
            .has_projection()
            .then(|| Projection::init(self.embedding_dim, self.codebook_space_dim(), device));
        Ok(EmaResidualVectorQuantizer {
            levels,
            projection,
            training: Param::from_bool(true),
            steps: RunningState::new(Tensor::zeros([1], &device.clone().without_autodiff())),
            config: self.clone(),
        })
    }
}

impl EmaResidualVectorQuantizer {
    /// The configuration the quantizer was created with.
    pub fn config(&self) -> &EmaResidualVectorQuantizerConfig {
        &self.config
    }

    /// Number of levels `M`.
    pub fn num_levels(&self) -> usize {
        self.levels.len()
    }

    /// Dimension `D` of the vectors it quantizes.
    pub fn embedding_dim(&self) -> usize {
        self.config.embedding_dim
    }

    /// Dimension of the codebooks' space (`codebook_dim`, or `D` without projections): the
    /// codebooks and the EMA sums are `[K, codebook_dim]`.
    pub fn codebook_dim(&self) -> usize {
        self.config.codebook_space_dim()
    }

    /// The learned projections into the codebooks' space and back, with `codebook_dim`.
    pub fn projection(&self) -> Option<&Projection> {
        self.projection.as_ref()
    }

    /// Rows `[N, D]` in the codebooks' space (`project_in`), `[N, codebook_dim]`.
    pub(crate) fn project_in(&self, rows: Tensor<2>) -> Tensor<2> {
        match &self.projection {
            Some(projection) => projection.project_in(rows),
            None => rows,
        }
    }

    /// Rows `[N, codebook_dim]` back in the model's space (`project_out`), `[N, D]`.
    pub(crate) fn project_out(&self, rows: Tensor<2>) -> Tensor<2> {
        match &self.projection {
            Some(projection) => projection.project_out(rows),
            None => rows,
        }
    }

    /// Replaces the projections (an import; the caller checked the shapes and values).
    #[cfg(feature = "pytorch")]
    pub(crate) fn set_projection(&mut self, projection: Projection) {
        self.projection = Some(projection);
    }

    /// Codebook size of every level.
    pub fn sizes(&self) -> Vec<usize> {
        self.levels
            .iter()
            .map(EmaCodebook::num_embeddings)
            .collect()
    }

    /// The codebook `[K_l, D]` of `level` (0-based), derived from its EMA statistics, on
    /// `device` without autodiff.
    ///
    /// # Panics
    ///
    /// If `level >= num_levels`.
    pub fn codebook(&self, level: usize, device: &Device) -> Tensor<2> {
        self.statistics(level, device).codebook(&self.config)
    }

    /// The EMA statistics of `level` (0-based) on `device`, without autodiff, in f32, after
    /// any pending update of this thread.
    ///
    /// # Panics
    ///
    /// If `level >= num_levels`.
    pub fn statistics(&self, level: usize, device: &Device) -> Statistics {
        self.levels[level].statistics(device)
    }

    /// Number of training steps that updated the state so far (a read back to the host).
    pub fn steps_taken(&self) -> u64 {
        self.steps.value_sync().into_scalar::<f64>() as u64
    }

    /// Replaces the EMA statistics of `level` (0-based), e.g. to import a trained quantizer.
    /// The codebook becomes `ema_weight / smoothed(ema_count)` by the configured
    /// [`CodebookRule`](crate::CodebookRule). For a PyTorch codec's state see the `interop`
    /// module (feature `pytorch`).
    ///
    /// Fails, leaving the state as it was, if `level` does not exist, a shape is not
    /// `[K_l]`/`[K_l, D]`, a count is negative or not finite, the counts sum to zero, or a
    /// sum is not finite.
    pub fn try_set_statistics(
        &self,
        level: usize,
        ema_count: Tensor<1>,
        ema_weight: Tensor<2>,
    ) -> Result<(), RvqError> {
        let codebook = self.levels.get(level).ok_or(RvqError::LevelCount {
            requested: level + 1,
            available: self.levels.len(),
        })?;
        let statistics = Statistics {
            counts: ema_count,
            sums: ema_weight,
        };
        codebook.try_set_statistics(level, statistics)
    }

    /// Applies every pending (deferred) update of the EMA statistics, from every thread, so
    /// that `into_record`/`save_file` see the state after the last training step.
    ///
    /// `RunningState` keeps each thread's latest update apart until the state is read, then
    /// averages them (one thread: the update itself; several devices: the mean over devices,
    /// which for counts and sums is the statistic of the union of their batches divided by
    /// the number of devices, a factor that cancels in the codebook; see
    /// [`EmaResidualVectorQuantizerConfig::data_parallel`]). Call it too before handing a
    /// model that ran a training forward on this thread to Burn's multi-device learner, or
    /// that update would be averaged into the devices' first one.
    pub fn sync_state(&self) {
        for level in &self.levels {
            level.sync();
        }
        let _ = self.steps.valid();
    }

    /// Batch-independent health of every level from its EMA counts: normalized entropy and
    /// the share of codes alive at the dead-code threshold (0.1 of uniform usage when
    /// restarts are off). Reads the counts back to the host.
    pub fn codebook_health(&self) -> Vec<CodebookHealth> {
        let threshold = match self.config.threshold_ema_dead_code {
            t if t > 0.0 => t,
            _ => 0.1,
        };
        self.host_counts()
            .iter()
            .map(|counts| CodebookHealth::from_ema_counts(counts, threshold))
            .collect()
    }

    /// Every level's EMA counts on the host, as f32 whatever dtype the state holds, after
    /// pending updates are applied.
    pub(crate) fn host_counts(&self) -> Vec<Vec<f32>> {
        self.levels
            .iter()
            .map(|level| {
                let device = level.state_device();
                level.counts(&device).into_data().iter::<f32>().collect()
            })
            .collect()
    }

    /// The levels, for the PyTorch interop's view of the state.
    #[cfg(feature = "pytorch")]
    pub(crate) fn levels(&self) -> &[EmaCodebook] {
        &self.levels
    }

    /// Sets the step counter to `steps`, applied at once (an import).
    #[cfg(feature = "pytorch")]
    pub(crate) fn set_steps_taken(&self, steps: u64) {
        let device = self.steps.value().device();
        self.steps.update(Tensor::<1>::from_data(
            burn::tensor::TensorData::new(vec![steps as f32], [1]),
            &device,
        ));
        let _ = self.steps.valid();
    }

    /// Checks `[..., D]` and returns `N`.
    fn check_input(&self, shape: &[usize]) -> Result<usize, RvqError> {
        let embedding_dim = self.config.embedding_dim;
        match shape.last() {
            Some(&last) if last == embedding_dim => Ok(shape[..shape.len() - 1].iter().product()),
            _ => Err(RvqError::InputDim {
                expected: embedding_dim,
                shape: shape.to_vec(),
            }),
        }
    }

    /// Checks codes for a decode into `shape` (`[..., D]`): `1..=M` levels, each of `N`
    /// indices; returns `N`.
    fn check_codes(&self, indices: &[Tensor<1, Int>], shape: &[usize]) -> Result<usize, RvqError> {
        let num_vectors = self.check_input(shape)?;
        self.check_num_levels(Some(indices.len()))?;
        for (level, level_indices) in indices.iter().enumerate() {
            let [len] = level_indices.dims();
            if len != num_vectors {
                return Err(RvqError::IndicesLength {
                    level,
                    expected: num_vectors,
                    got: len,
                });
            }
        }
        Ok(num_vectors)
    }

    /// `requested` levels if in `1..=M` (all of them for `None`).
    fn check_num_levels(&self, requested: Option<usize>) -> Result<usize, RvqError> {
        let available = self.levels.len();
        match requested {
            None => Ok(available),
            Some(n) if (1..=available).contains(&n) => Ok(n),
            Some(n) => Err(RvqError::LevelCount {
                requested: n,
                available,
            }),
        }
    }
}

impl ModuleDisplay for EmaResidualVectorQuantizer {
    fn custom_settings(&self) -> Option<DisplaySettings> {
        DisplaySettings::new()
            .with_new_line_after_attribute(false)
            .optional()
    }

    fn custom_content(&self, content: Content) -> Option<Content> {
        content
            .add("num_levels", &self.num_levels())
            .add("num_embeddings", &format!("{:?}", self.sizes()))
            .add("embedding_dim", &self.config.embedding_dim)
            .add("codebook_dim", &self.codebook_dim())
            .add("cosine_similarity", &self.config.cosine_similarity)
            .add("beta", &self.config.beta)
            .add("ema_decay", &self.config.ema_decay)
            .optional()
    }
}
