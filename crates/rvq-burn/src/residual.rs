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
use burn::tensor::{Device, Int, Tensor};

use crate::codebook::{EmaCodebook, LevelStep};
use crate::config::{EmaResidualVectorQuantizerConfig, Execution};
use crate::error::RvqError;
use crate::hash::SplitMix64;
use crate::metrics::CodebookHealth;
use crate::options::ForwardOptions;
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
    /// See [`EmaResidualVectorQuantizerConfig::quantize_dropout`].
    pub quantize_dropout: f64,
    /// See [`EmaResidualVectorQuantizerConfig::quantize_dropout_min_levels`].
    pub quantize_dropout_min_levels: usize,
    /// See [`EmaResidualVectorQuantizerConfig::data_parallel`].
    pub data_parallel: bool,
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
            .map(|size| EmaCodebook::init(size, self.embedding_dim, self.epsilon, device))
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
            quantize_dropout: self.quantize_dropout,
            quantize_dropout_min_levels: self.quantize_dropout_min_levels,
            data_parallel: self.data_parallel,
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
    /// The codebook becomes `ema_weight / smoothed(ema_count)`.
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
        let mut num_levels = self.check_num_levels(options.num_levels)?;
        if num_vectors == 0 {
            return Ok(self.empty_output(x, num_levels));
        }
        let autodiff = x.is_autodiff();
        let training = autodiff && self.training.is_enabled();
        let update = training && options.update_ema;
        let device = x.device().without_autodiff();
        let d = self.embedding_dim;

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
        let flat = x.clone().reshape([num_vectors, d]); // [N, D], x's autodiff
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
        let straight_through = sums.quantized.sub(flat_plain);
        let straight_through = if autodiff {
            straight_through.autodiff()
        } else {
            straight_through
        };
        let quantized = flat.add(straight_through).reshape(shape);

        let restarted_codes = steps.iter().map(|step| step.restarted).collect();
        let (indices, code_counts) = steps
            .into_iter()
            .map(|step| {
                let counts = step.batch.counts.expect("a forward counts");
                (step.batch.indices, counts)
            })
            .unzip();
        Ok(RvqOutput {
            quantized,
            indices,
            loss,
            level_losses,
            code_counts,
            restarted_codes,
            update_skipped,
        })
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
            .reshape([num_vectors, self.embedding_dim]);
        let (steps, _) = with_path!(self.path(&device), path => {
            self.run_levels(path, flat, num_levels, None, Work::CODES, &device)
        });
        Ok(steps.into_iter().map(|step| step.batch.indices).collect())
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
