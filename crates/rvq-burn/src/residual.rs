//! The residual stack: `EmaResidualVectorQuantizer`.
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
//! The straight-through estimator is applied once, after the loop, so `dy/dx` is the identity
//! and the residuals carry no second path to the input; applying it per level multiplies the
//! decoder's gradient by the number of levels or cuts levels > 1 off (encodec issue 25,
//! vector-quantize-pytorch issue 33).

use burn::module::{Content, DisplaySettings, Flag, Module, ModuleDisplay, Param, RunningState};
use burn::tensor::{Bool, Device, FloatDType, Int, Tensor};

use crate::codebook::{EmaCodebook, LevelStep};
use crate::config::{DeadCodeRule, EmaResidualVectorQuantizerConfig, Execution};
use crate::error::RvqError;
use crate::hash::SplitMix64;
use crate::metrics::CodebookHealth;
use crate::options::{ForwardOptions, Mask};
use crate::output::RvqOutput;
use crate::path::tensor::Search;
use crate::path::{LevelPath, Path, RunningSums, Work, with_path};
use crate::update::{PlanConfig, StepPlan};

/// Residual vector quantizer with EMA codebook updates, a drop-in VQ-VAE bottleneck.
///
/// Behaves as the Keras layer `EmaResidualVectorQuantizer` of helia-edge 0.6.2 (see the crate
/// documentation). Create it with [`EmaResidualVectorQuantizerConfig::init`].
///
/// Training and evaluation are told apart as in Burn's `BatchNorm`: the EMA statistics are
/// updated when the input lives on an autodiff device and the layer is not frozen
/// ([`Module::freeze`]); [`Module::valid`] gives a copy that never updates.
/// [`ForwardOptions::update_ema`] skips the update for one call.
///
/// # State
///
/// Per level `l` (0-based in record paths, 1-based in the reference's names):
/// `levels.{l}.ema_count` `[K_l]` is the reference's `ema_count_l{l+1}`,
/// `levels.{l}.ema_weight` `[K_l, D]` its `ema_weight_l{l+1}`, and the codebook
/// (`codebook_l{l+1}`) is derived from them ([`EmaResidualVectorQuantizer::codebook`]).
/// The statistics are `RunningState`s: optimizers never see them, records save them.
/// Updates are deferred until read; call [`EmaResidualVectorQuantizer::sync_state`] (or
/// `valid()`) before `save_file`/`into_record` right after a training step.
#[derive(Module, Debug)]
#[module(custom_display)]
pub struct EmaResidualVectorQuantizer {
    /// The codebooks, one per level.
    pub levels: Vec<EmaCodebook>,
    /// Whether training forwards update the EMA statistics (cleared by `freeze()` and in
    /// `valid()` copies).
    pub training: Param<Flag>,
    /// `D`.
    pub embedding_dim: usize,
    /// Commitment loss weight.
    pub beta: f64,
    /// EMA decay.
    pub ema_decay: f64,
    /// Largest distance matrix formed at once (rows x codes).
    pub max_distance_elements: usize,
    /// See [`EmaResidualVectorQuantizerConfig::dense_statistics`].
    pub dense_statistics: bool,
    /// Number of EMA steps taken so far, `[1]` (0 until the first training step; k-means
    /// init runs on that step, dead-code checks and quantizer dropout are keyed to it).
    pub steps: RunningState<Tensor<1>>,
    /// See [`EmaResidualVectorQuantizerConfig::kmeans_init`].
    pub kmeans_init: bool,
    /// See [`EmaResidualVectorQuantizerConfig::kmeans_iterations`].
    pub kmeans_iterations: usize,
    /// See [`EmaResidualVectorQuantizerConfig::threshold_ema_dead_code`].
    pub threshold_ema_dead_code: f64,
    /// See [`EmaResidualVectorQuantizerConfig::dead_code_check_every`].
    pub dead_code_check_every: usize,
    /// See [`EmaResidualVectorQuantizerConfig::dead_code_rule`].
    #[module(skip)]
    pub dead_code_rule: DeadCodeRule,
    /// See [`EmaResidualVectorQuantizerConfig::quantize_dropout`].
    pub quantize_dropout: f64,
    /// See [`EmaResidualVectorQuantizerConfig::quantize_dropout_min_levels`].
    pub quantize_dropout_min_levels: usize,
    /// See [`EmaResidualVectorQuantizerConfig::data_parallel`].
    pub data_parallel: bool,
    /// See [`EmaResidualVectorQuantizerConfig::rotation_trick`].
    pub rotation_trick: bool,
    /// See [`EmaResidualVectorQuantizerConfig::execution`].
    #[module(skip)]
    pub execution: Execution,
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
            .map(|size| {
                EmaCodebook::init(
                    size,
                    self.embedding_dim,
                    self.epsilon,
                    self.codebook_rule,
                    device,
                )
            })
            .collect();
        Ok(EmaResidualVectorQuantizer {
            levels,
            training: Param::from_bool(true),
            embedding_dim: self.embedding_dim,
            beta: self.beta,
            ema_decay: self.ema_decay,
            max_distance_elements: self.max_distance_elements,
            dense_statistics: self.dense_statistics,
            steps: RunningState::new(Tensor::zeros([1], &device.clone().without_autodiff())),
            kmeans_init: self.kmeans_init,
            kmeans_iterations: self.kmeans_iterations,
            threshold_ema_dead_code: self.threshold_ema_dead_code,
            dead_code_check_every: self.dead_code_check_every,
            dead_code_rule: self.dead_code_rule,
            quantize_dropout: self.quantize_dropout,
            quantize_dropout_min_levels: self.quantize_dropout_min_levels,
            data_parallel: self.data_parallel,
            rotation_trick: self.rotation_trick,
            execution: self.execution,
        })
    }
}

impl EmaResidualVectorQuantizer {
    /// Number of levels `M`.
    pub fn num_levels(&self) -> usize {
        self.levels.len()
    }

    /// Codebook size of every level.
    pub fn sizes(&self) -> Vec<usize> {
        self.levels
            .iter()
            .map(|level| level.num_embeddings)
            .collect()
    }

    /// Bits one index of each level costs when stored plainly: `log2 K_l`.
    pub fn bits_per_level(&self) -> Vec<f64> {
        self.levels
            .iter()
            .map(|level| (level.num_embeddings as f64).log2())
            .collect()
    }

    /// How many levels fit a budget of `bits_per_second` at `frames_per_second` quantized
    /// vectors per second, with each level's own `log2 K_l` bits per index: the most levels
    /// `n` with `frames_per_second * sum_{l < n} log2 K_l <= bits_per_second`, and at least
    /// one, as EnCodec's bandwidth selection (`n_q = max(1, floor(bandwidth / (log2 K *
    /// frame_rate)))` for one `K`). The inverse of [`EmaResidualVectorQuantizer::bitrate`].
    ///
    /// # Panics
    ///
    /// On the errors of [`EmaResidualVectorQuantizer::try_levels_for_bitrate`].
    pub fn levels_for_bitrate(&self, bits_per_second: f64, frames_per_second: f64) -> usize {
        self.try_levels_for_bitrate(bits_per_second, frames_per_second)
            .unwrap_or_else(|error| panic!("{error}"))
    }

    /// Fallible [`EmaResidualVectorQuantizer::levels_for_bitrate`]: fails if
    /// `bits_per_second` is not finite and >= 0 or `frames_per_second` not finite and > 0.
    pub fn try_levels_for_bitrate(
        &self,
        bits_per_second: f64,
        frames_per_second: f64,
    ) -> Result<usize, RvqError> {
        if !(bits_per_second.is_finite() && bits_per_second >= 0.0) {
            return Err(RvqError::InvalidArgument {
                argument: "bits_per_second",
                value: bits_per_second.to_string(),
                rule: "must be finite and >= 0",
            });
        }
        check_frames_per_second(frames_per_second)?;
        // A budget met exactly counts, whatever the rounding of the sum of logarithms.
        let budget = bits_per_second * (1.0 + 1e-12);
        let mut bits = 0.0;
        let fitting = self
            .bits_per_level()
            .into_iter()
            .take_while(|level_bits| {
                bits += level_bits * frames_per_second;
                bits <= budget
            })
            .count();
        Ok(fitting.max(1))
    }

    /// The bitrate, in bits per second, of the plainly stored indices of the first
    /// `num_levels` levels at `frames_per_second` quantized vectors per second:
    /// `frames_per_second * sum_{l < num_levels} log2 K_l` (entropy coding, [`Self::try_compress`],
    /// takes less).
    ///
    /// # Panics
    ///
    /// On the errors of [`EmaResidualVectorQuantizer::try_bitrate`].
    pub fn bitrate(&self, num_levels: usize, frames_per_second: f64) -> f64 {
        self.try_bitrate(num_levels, frames_per_second)
            .unwrap_or_else(|error| panic!("{error}"))
    }

    /// Fallible [`EmaResidualVectorQuantizer::bitrate`]: fails if `num_levels` is outside
    /// `1..=M` or `frames_per_second` is not finite and > 0.
    pub fn try_bitrate(&self, num_levels: usize, frames_per_second: f64) -> Result<f64, RvqError> {
        let num_levels = self.check_num_levels(Some(num_levels))?;
        check_frames_per_second(frames_per_second)?;
        let bits: f64 = self.bits_per_level()[..num_levels].iter().sum();
        Ok(bits * frames_per_second)
    }

    /// The codebook `[K_l, D]` of `level` (0-based), derived from its EMA statistics, on
    /// `device` without autodiff.
    ///
    /// # Panics
    ///
    /// If `level >= num_levels`.
    pub fn codebook(&self, level: usize, device: &Device) -> Tensor<2> {
        self.levels[level].codebook(device)
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
        codebook.try_set_statistics(level, ema_count, ema_weight)
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
            let _ = level.ema_count.valid();
            let _ = level.ema_weight.valid();
        }
        let _ = self.steps.valid();
    }

    /// Quantizes `x` `[..., D]` (reference behaviour, all levels).
    ///
    /// Updates the EMA statistics when `x` is on an autodiff device and the layer is not
    /// frozen.
    ///
    /// # Shapes
    ///
    /// - `x`: `[..., D]`, any rank >= 1
    /// - output `quantized`: same as `x`; `indices`: `M` tensors `[N]`, `N` = product of the
    ///   leading dimensions
    ///
    /// # Panics
    ///
    /// If the last dimension of `x` is not `D`; see [`EmaResidualVectorQuantizer::try_forward`].
    pub fn forward<const R: usize>(&self, x: Tensor<R>) -> RvqOutput<R> {
        self.forward_with(x, &ForwardOptions::default())
    }

    /// Fallible [`EmaResidualVectorQuantizer::forward`]. On error the state is unchanged.
    pub fn try_forward<const R: usize>(&self, x: Tensor<R>) -> Result<RvqOutput<R>, RvqError> {
        self.try_forward_with(x, &ForwardOptions::default())
    }

    /// [`EmaResidualVectorQuantizer::forward`] with per-call options (skip the EMA update,
    /// fewer levels).
    ///
    /// # Panics
    ///
    /// On the errors of [`EmaResidualVectorQuantizer::try_forward_with`].
    pub fn forward_with<const R: usize>(
        &self,
        x: Tensor<R>,
        options: &ForwardOptions,
    ) -> RvqOutput<R> {
        self.try_forward_with(x, options)
            .unwrap_or_else(|error| panic!("{error}"))
    }

    /// Fallible [`EmaResidualVectorQuantizer::forward_with`]: fails if the last dimension of
    /// `x` is not `D` or `options.num_levels` is outside `1..=M`. On error the state is
    /// unchanged.
    pub fn try_forward_with<const R: usize>(
        &self,
        x: Tensor<R>,
        options: &ForwardOptions,
    ) -> Result<RvqOutput<R>, RvqError> {
        let shape = x.dims();
        let num_vectors = self.check_input(&shape)?;
        let num_levels = self.check_num_levels(options.num_levels)?;
        let real = match &options.mask {
            Some(mask) => Some(mask.real_rows(&shape[..R - 1], &x.device())?),
            None => None,
        };
        if num_vectors == 0 {
            return Ok(self.empty_output(x, num_levels));
        }
        // Half precision in, f32 inside (search, statistics, state), the input's dtype out.
        let dtype = x.dtype();
        let flat = x
            .reshape([num_vectors, self.embedding_dim])
            .cast(FloatDType::F32); // [N, D]
        let out = match real {
            None => self.forward_rows(flat, num_levels, options),
            // The real positions alone, then put back in place.
            Some(real) => self
                .forward_rows(flat.select(0, real.clone()), num_levels, options)
                .scatter_rows(&real, num_vectors),
        };
        Ok(out.into_shape(shape, dtype))
    }

    /// The forward of rows `flat` `[N, D]` (f32, the input's autodiff) with `num_levels`
    /// levels (before quantizer dropout).
    fn forward_rows(
        &self,
        flat: Tensor<2>,
        mut num_levels: usize,
        options: &ForwardOptions,
    ) -> RvqOutput<2> {
        let [num_vectors, d] = flat.dims();
        if num_vectors == 0 {
            return self.empty_output(flat, num_levels);
        }
        let autodiff = flat.is_autodiff();
        let training = autodiff && self.training.is_enabled();
        let update = training && options.update_ema;
        let device = flat.device().without_autodiff();

        // The step counter is read back only when an option is keyed to it.
        let needs_step = training
            && (self.kmeans_init
                || self.data_parallel
                || self.quantize_dropout > 0.0
                || (self.threshold_ema_dead_code > 0.0 && self.dead_code_check_every > 1));
        let step = needs_step.then(|| self.steps.value_sync().into_scalar::<f64>() as u64);
        if training && options.num_levels.is_none() && self.quantize_dropout > 0.0 {
            num_levels = self.dropout_depth(step.unwrap_or(0));
        }
        let flat_plain = flat.clone().without_autodiff(); // [N, D]
        // What this step does to the state: chosen once, applied by every level.
        let plan = update.then(|| {
            let non_finite = flat_plain.clone().is_finite().all().bool_not();
            StepPlan::new(&self.plan_config(), step, non_finite)
        });

        let work = match plan {
            Some(_) => Work::TRAINING,
            None => Work::FORWARD,
        };
        let (steps, sums) = with_path!(self.path(&device), path => {
            self.run_levels(path, flat_plain.clone(), num_levels, plan.as_ref(), work, &device)
        });
        let sums = sums.expect("a forward keeps the running sums");
        let update_skipped = plan.map(|plan| plan.non_finite);
        if let Some(skipped) = &update_skipped {
            let steps = self
                .steps
                .value_sync()
                .without_autodiff()
                .to_device(&device);
            self.steps
                .update(steps.add(skipped.clone().bool_not().float()));
        }

        // loss_l = beta * mean((q_l - r_l)^2) = beta * mean(r_{l+1}^2)
        let elements = (num_vectors * d) as f64;
        let level_losses: Vec<Tensor<1>> = steps
            .iter()
            .map(|step| {
                let squared_error = step.batch.squared_error.clone();
                squared_error
                    .expect("a forward sums the squared error")
                    .div_scalar(elements)
                    .mul_scalar(self.beta)
            })
            .collect();
        let total_loss = level_losses
            .iter()
            .cloned()
            .reduce(|a, b| a.add(b))
            .expect("at least one level");
        let loss = if autodiff {
            commitment_loss_autodiff(flat.clone(), &sums, num_levels, total_loss, self.beta)
        } else {
            total_loss
        };
        // y = x + sg(q_sum - x): one straight-through estimator, on the sum.
        let straight_through = sums.quantized.clone().sub(flat_plain);
        let straight_through = if autodiff {
            straight_through.autodiff()
        } else {
            straight_through
        };
        let mut quantized = flat.clone().add(straight_through);
        if autodiff && self.rotation_trick {
            quantized = quantized.add(rotation_gradient(flat, sums.quantized));
        }

        let restarted_codes = steps.iter().map(|step| step.restarted).collect();
        let (indices, code_counts) = steps
            .into_iter()
            .map(|step| {
                let counts = step.batch.counts.expect("a forward counts");
                (step.batch.indices, counts)
            })
            .unzip();
        RvqOutput {
            quantized,
            indices,
            loss,
            level_losses,
            code_counts,
            restarted_codes,
            update_skipped,
        }
    }

    /// Per-level code indices of `x` `[..., D]`, each `[N]`; no gradient, no update.
    ///
    /// # Panics
    ///
    /// If the last dimension of `x` is not `D`.
    pub fn encode<const R: usize>(&self, x: Tensor<R>) -> Vec<Tensor<1, Int>> {
        self.try_encode(x, self.num_levels())
            .unwrap_or_else(|error| panic!("{error}"))
    }

    /// Codes of `x` with only the first `num_levels` levels (a lower bitrate:
    /// [`EmaResidualVectorQuantizer::bits_per_level`] gives each level's cost). Fails if the
    /// last dimension of `x` is not `D` or `num_levels` is outside `1..=M`.
    pub fn try_encode<const R: usize>(
        &self,
        x: Tensor<R>,
        num_levels: usize,
    ) -> Result<Vec<Tensor<1, Int>>, RvqError> {
        let shape = x.dims();
        let num_vectors = self.check_input(&shape)?;
        let num_levels = self.check_num_levels(Some(num_levels))?;
        let device = x.device().without_autodiff();
        if num_vectors == 0 {
            return Ok(vec![Tensor::<1, Int>::zeros([0], &device); num_levels]);
        }
        let flat = x
            .without_autodiff()
            .reshape([num_vectors, self.embedding_dim])
            .cast(FloatDType::F32);
        Ok(self.encode_rows(flat, num_levels))
    }

    /// The codes of the real positions of `x` `[..., D]` alone (`mask` over its leading
    /// shape, true where a position is real; see [`Mask`]), in
    /// row-major order, `[N_real]` per level: what
    /// [`EmaResidualVectorQuantizer::try_decode`] takes back with the shape `[N_real, D]`.
    /// Fails as [`EmaResidualVectorQuantizer::try_encode`] does, or if the mask's shape is not
    /// the input's leading shape. Reads the mask back to the host once.
    pub fn try_encode_masked<const R: usize, const L: usize>(
        &self,
        x: Tensor<R>,
        num_levels: usize,
        mask: Tensor<L, Bool>,
    ) -> Result<Vec<Tensor<1, Int>>, RvqError> {
        let shape = x.dims();
        let num_vectors = self.check_input(&shape)?;
        let num_levels = self.check_num_levels(Some(num_levels))?;
        let real = Mask::new(mask).real_rows(&shape[..R - 1], &x.device())?;
        if num_vectors == 0 {
            let device = x.device().without_autodiff();
            return Ok(vec![Tensor::<1, Int>::zeros([0], &device); num_levels]);
        }
        let flat = x
            .without_autodiff()
            .reshape([num_vectors, self.embedding_dim])
            .cast(FloatDType::F32);
        Ok(self.encode_rows(flat.select(0, real), num_levels))
    }

    /// The codes of rows `[N, D]` (f32, no autodiff) with the first `num_levels` levels.
    fn encode_rows(&self, flat: Tensor<2>, num_levels: usize) -> Vec<Tensor<1, Int>> {
        let [num_vectors, _] = flat.dims();
        let device = flat.device();
        if num_vectors == 0 {
            return vec![Tensor::<1, Int>::zeros([0], &device); num_levels];
        }
        let (steps, _) = with_path!(self.path(&device), path => {
            self.run_levels(path, flat, num_levels, None, Work::CODES, &device)
        });
        steps.into_iter().map(|step| step.batch.indices).collect()
    }

    /// Sums the code vectors of `indices` (one `[N]` tensor per level, the first `n <= M`
    /// levels) and reshapes to `shape` (`[..., D]`, `N` vectors).
    ///
    /// # Panics
    ///
    /// On the errors of [`EmaResidualVectorQuantizer::try_decode`].
    pub fn decode<const R: usize>(
        &self,
        indices: &[Tensor<1, Int>],
        shape: [usize; R],
    ) -> Tensor<R> {
        self.try_decode(indices, shape)
            .unwrap_or_else(|error| panic!("{error}"))
    }

    /// Fallible [`EmaResidualVectorQuantizer::decode`]: fails if there are no or more than `M`
    /// index tensors, the last entry of `shape` is not `D`, a tensor's length is not the
    /// number of vectors in `shape`, or an index is outside its level's codebook. Checking the
    /// range reads the indices' minimum and maximum back to the host once (on Burn's CPU
    /// backends the indices are read, and the sum is one pass over the rows on the host).
    pub fn try_decode<const R: usize>(
        &self,
        indices: &[Tensor<1, Int>],
        shape: [usize; R],
    ) -> Result<Tensor<R>, RvqError> {
        let num_vectors = self.check_input(&shape)?;
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
        let device = indices[0].device().without_autodiff();
        if num_vectors == 0 {
            return Ok(Tensor::zeros(shape, &device));
        }
        let codebooks = self.levels[..indices.len()]
            .iter()
            .map(|level| level.codebook(&device))
            .collect();
        let sum = with_path!(self.path(&device), path => path.decode(codebooks, indices))?;
        Ok(sum.reshape(shape))
    }

    /// The execution path of a call on `device` (see [`crate::path`]).
    fn path(&self, device: &Device) -> Path {
        let search = Search {
            max_elements: self.max_distance_elements,
            dense: self.dense_statistics,
        };
        Path::choose(device, self.execution, search)
    }

    /// The options a training step's [`StepPlan`] is made from.
    fn plan_config(&self) -> PlanConfig {
        PlanConfig {
            ema_decay: self.ema_decay,
            kmeans_init: self.kmeans_init,
            kmeans_iterations: self.kmeans_iterations,
            threshold_ema_dead_code: self.threshold_ema_dead_code,
            dead_code_check_every: self.dead_code_check_every,
            dead_code_rule: self.dead_code_rule,
            data_parallel: self.data_parallel,
        }
    }

    /// Runs the first `num_levels` levels on `x` `[N, D]` (`N > 0`, no autodiff) on `path`:
    /// each level's step in turn, every one passing its residual to the next; with a `plan`,
    /// a training step. Returns each level's step and, for `work.forward`, the running sums.
    fn run_levels<P: LevelPath>(
        &self,
        path: &P,
        x: Tensor<2>,
        num_levels: usize,
        plan: Option<&StepPlan>,
        work: Work,
        device: &Device,
    ) -> (Vec<LevelStep>, Option<RunningSums>) {
        let mut rows = path.start(x, work);
        let steps = self.levels[..num_levels]
            .iter()
            .enumerate()
            .map(|(index, level)| level.step(index, path, &mut rows, plan, work, device))
            .collect();
        (steps, path.finish(rows))
    }

    /// The depth quantizer dropout draws for training step `step`: with probability
    /// `quantize_dropout`, uniform in `min..=M` (the full depth included), else `M`.
    /// A fixed hash of the step, so it is reproducible and the same on every device.
    fn dropout_depth(&self, step: u64) -> usize {
        let num_levels = self.levels.len();
        let min = self.quantize_dropout_min_levels.clamp(1, num_levels);
        // One draw: its top 53 bits decide whether to drop, its low 32 bits the depth.
        let draw = SplitMix64::new(step).next_u64();
        let uniform = (draw >> 11) as f64 / (1u64 << 53) as f64;
        if uniform >= self.quantize_dropout {
            return num_levels;
        }
        min + ((draw & 0xFFFF_FFFF) % (num_levels - min + 1) as u64) as usize
    }

    /// Batch-independent health of every level from its EMA counts: normalized entropy and
    /// the share of codes alive at the dead-code threshold (0.1 of uniform usage when
    /// restarts are off). Reads the counts back to the host.
    pub fn codebook_health(&self) -> Vec<CodebookHealth> {
        let threshold = if self.threshold_ema_dead_code > 0.0 {
            self.threshold_ema_dead_code
        } else {
            0.1
        };
        self.levels
            .iter()
            .map(|level| {
                let counts: Vec<f32> = level
                    .ema_count
                    .value_sync()
                    .into_data()
                    .iter::<f32>()
                    .collect();
                CodebookHealth::from_ema_counts(&counts, threshold)
            })
            .collect()
    }

    /// The output for a batch of no vectors: the (empty) input itself, empty indices, zero
    /// losses and histograms, no update. Built without reshapes: Burn reads a 0 in a reshape
    /// target as "keep this dimension".
    fn empty_output<const R: usize>(&self, x: Tensor<R>, num_levels: usize) -> RvqOutput<R> {
        let device = x.device().without_autodiff();
        let zero = || Tensor::<1>::zeros([1], &device);
        let loss = if x.is_autodiff() {
            // Zero, on the input's graph.
            x.clone().sum().mul_scalar(0.0)
        } else {
            zero()
        };
        let levels = &self.levels[..num_levels];
        RvqOutput {
            quantized: x,
            indices: vec![Tensor::<1, Int>::zeros([0], &device); num_levels],
            loss,
            level_losses: vec![zero(); num_levels],
            code_counts: levels
                .iter()
                .map(|level| Tensor::zeros([level.num_embeddings], &device))
                .collect(),
            restarted_codes: vec![0; num_levels],
            update_skipped: None,
        }
    }

    /// Checks `[..., D]` and returns `N`.
    fn check_input(&self, shape: &[usize]) -> Result<usize, RvqError> {
        match shape.last() {
            Some(&last) if last == self.embedding_dim => {
                Ok(shape[..shape.len() - 1].iter().product())
            }
            _ => Err(RvqError::InputDim {
                expected: self.embedding_dim,
                shape: shape.to_vec(),
            }),
        }
    }

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

/// The rotation trick's correction to the straight-through output `y = x + sg(q - x)`: a
/// term of value zero whose gradient turns `dy/dx` from the identity into `lambda R`, where
/// `R` rotates each row's direction `u = x / |x|` onto `q^ = q / |q|` and `lambda = |q| / |x|`
/// (Fifty et al. 2024, section 4.2; `R`, `lambda` are constants).
///
/// `R v = v - 2 (v.w) w + 2 (v.u) q^` with `w = (u + q^) / |u + q^|`: two Householder
/// reflections, `[N, D]` work, nothing of size `D x D`. With `f(x) = lambda R x` the term is
/// `(f - sg(f)) - (x - sg(x))`, exactly zero in value (so the output keeps the
/// straight-through estimator's floats) and of gradient `lambda R^T g - g`. Norms below 1e-6
/// are taken as 1e-6 in the divisions, as vector-quantize-pytorch does.
fn rotation_gradient(x: Tensor<2>, quantized: Tensor<2>) -> Tensor<2> {
    const EPS: f64 = 1e-6;
    let norm = |t: &Tensor<2>| t.clone().powi_scalar(2).sum_dim(1).sqrt(); // [N, 1]
    let x_plain = x.clone().without_autodiff();
    let (x_norm, q_norm) = (norm(&x_plain), norm(&quantized));
    let u = x_plain.div(x_norm.clone().clamp_min(EPS)); // [N, D]
    let q_hat = quantized.div(q_norm.clone().clamp_min(EPS)); // [N, D]
    let w = u.clone().add(q_hat.clone());
    let w = w.clone().div(norm(&w).clamp_min(EPS)); // [N, D]
    let scale = q_norm.div(x_norm.clamp_min(EPS)); // [N, 1]
    let (u, q_hat, w, scale) = (
        u.autodiff(),
        q_hat.autodiff(),
        w.autodiff(),
        scale.autodiff(),
    );
    let along = |direction: &Tensor<2>| x.clone().mul(direction.clone()).sum_dim(1); // [N, 1]
    let rotated = x
        .clone()
        .sub(along(&w).mul_scalar(2.0).mul(w.clone()))
        .add(along(&u).mul_scalar(2.0).mul(q_hat))
        .mul(scale); // lambda R x
    let identity = x.clone().sub(x.detach());
    rotated.clone().sub(rotated.detach()).sub(identity)
}

fn check_frames_per_second(frames_per_second: f64) -> Result<(), RvqError> {
    match frames_per_second.is_finite() && frames_per_second > 0.0 {
        true => Ok(()),
        false => Err(RvqError::InvalidArgument {
            argument: "frames_per_second",
            value: frames_per_second.to_string(),
            rule: "must be finite and > 0",
        }),
    }
}

/// The total commitment loss on the autodiff device, with the gradient of every level's term.
///
/// `sum_l beta * mean((x - c_l)^2)` with `c_l = q_1 + ... + q_l` (constants), since
/// `r_l - q_l = x - c_l`. Its gradient `2 beta / (N D) * sum_l (x - c_l)` equals that of the
/// single term `beta * M * mean((x - mean_l c_l)^2)`, so one autodiff expression serves all
/// levels; the value is then corrected to the exact sum of the level losses with a constant.
fn commitment_loss_autodiff(
    flat: Tensor<2>,
    sums: &RunningSums,
    num_levels: usize,
    total_loss: Tensor<1>,
    beta: f64,
) -> Tensor<1> {
    // c_l = x - r_{l+1}; mean_l c_l = x - mean_l r_{l+1}
    let flat_plain = flat.clone().without_autodiff();
    let mean_residual = sums.residuals.clone().div_scalar(num_levels as f64);
    let centre = flat_plain.sub(mean_residual).autodiff(); // [N, D] constant
    let surrogate = flat
        .sub(centre)
        .powi_scalar(2)
        .mean()
        .mul_scalar(beta * num_levels as f64);
    let correction = total_loss
        .sub(surrogate.clone().without_autodiff())
        .autodiff();
    surrogate.add(correction)
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
            .add("embedding_dim", &self.embedding_dim)
            .add("beta", &self.beta)
            .add("ema_decay", &self.ema_decay)
            .optional()
    }
}
