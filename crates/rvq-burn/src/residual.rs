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
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

use crate::codebook::{EmaCodebook, Search, codebook_from_statistics};
use crate::config::EmaResidualVectorQuantizerConfig;
use crate::error::RvqError;
use crate::hash::SplitMix64;
use crate::host::{self, host_floats, host_ints, in_host_memory};
use crate::metrics::CodebookHealth;
use crate::options::ForwardOptions;
use crate::output::RvqOutput;

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
        })
    }
}

/// Below this count a code counts as empty during the data-parallel init (counts there are
/// numbers of vectors, averaged over devices: 0, or at least 1 / devices).
const EMPTY_CODE_COUNT: f64 = 1e-6;

/// One level's pass over a batch: its assignment and the residual it leaves.
struct LevelPass {
    assignment: crate::codebook::Assignment,
    /// `r_{l+1} = r_l - q_l`, `[N, D]`, no autodiff.
    next_residual: Tensor<2>,
    /// Codes restarted by the dead-code check of this pass.
    restarted: usize,
}

/// What a training step does to the state besides the EMA update.
struct UpdatePlan {
    /// `[1]`, true when the batch holds a NaN or an infinity: then every state change of
    /// the step is discarded on the device (no read back), and the output reports it.
    non_finite: Tensor<1, Bool>,
    /// Initialize the codebooks by k-means first (first training step).
    kmeans: bool,
    /// Restart dead codes at this threshold after the update.
    restart_threshold: Option<f64>,
    /// Data-parallel mode: `Some(step)` while the batch statistics replace the state (the
    /// first step, or the first `kmeans_iterations` steps with k-means init), `None` after.
    replace: Option<u64>,
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
        let replace_steps = match self.kmeans_init {
            true => self.kmeans_iterations as u64,
            false => 1,
        };
        let plan = update.then(|| UpdatePlan {
            non_finite: flat_plain.clone().is_finite().all().bool_not(),
            kmeans: !self.data_parallel && self.kmeans_init && step == Some(0),
            restart_threshold: (self.threshold_ema_dead_code > 0.0
                && step.is_none_or(|s| (s + 1) % self.dead_code_check_every as u64 == 0))
            .then_some(self.threshold_ema_dead_code),
            replace: step.filter(|&s| self.data_parallel && s < replace_steps),
        });

        let passes = self.run_levels(flat_plain.clone(), num_levels, plan.as_ref(), &device);
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
        let level_losses: Vec<Tensor<1>> = passes
            .iter()
            .map(|pass| {
                pass.next_residual
                    .clone()
                    .powi_scalar(2)
                    .mean()
                    .mul_scalar(self.beta)
            })
            .collect();
        let total_loss = level_losses
            .iter()
            .cloned()
            .reduce(|a, b| a.add(b))
            .unwrap_or_else(|| Tensor::zeros([1], &device));

        // q_sum = sum_l q_l = x - r_{M+1}
        let quantized_sum = passes
            .iter()
            .map(|pass| pass.assignment.quantized.clone())
            .reduce(|a, b| a.add(b))
            .unwrap_or_else(|| flat_plain.zeros_like());
        let loss = if autodiff {
            commitment_loss_autodiff(flat.clone(), &passes, total_loss, self.beta)
        } else {
            total_loss
        };
        // y = x + sg(q_sum - x): one straight-through estimator, on the sum.
        let straight_through = quantized_sum.sub(flat_plain);
        let straight_through = if autodiff {
            straight_through.autodiff()
        } else {
            straight_through
        };
        let quantized = flat.add(straight_through).reshape(shape);

        let restarted_codes = passes.iter().map(|pass| pass.restarted).collect();
        let (indices, code_counts) = passes
            .into_iter()
            .map(|pass| (pass.assignment.indices, pass.assignment.counts))
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
        if in_host_memory(&device) {
            // One host buffer, searched and turned into the next residual level by level.
            let mut rows = host_floats(flat);
            let search = self.search();
            return Ok(self.levels[..num_levels]
                .iter()
                .map(|level| {
                    EmaCodebook::encode_on_host(&level.codebook(&device), &mut rows, search)
                })
                .collect());
        }
        Ok(self
            .run_levels(flat, num_levels, None, &device)
            .into_iter()
            .map(|pass| pass.assignment.indices)
            .collect())
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
        if in_host_memory(&device) {
            // One pass over the rows, every level's code added in place.
            let codes: Vec<Vec<i64>> = indices.iter().cloned().map(host_ints).collect();
            self.check_index_range(codes.iter().map(|level| {
                let min = level.iter().copied().min().unwrap_or(0);
                let max = level.iter().copied().max().unwrap_or(0);
                (min, max)
            }))?;
            let codebooks: Vec<Vec<f32>> = self.levels[..codes.len()]
                .iter()
                .map(|level| host_floats(level.codebook(&device)))
                .collect();
            let sum = host::decode(&codebooks, &codes, self.embedding_dim);
            let flat = Tensor::<2>::from_data(
                TensorData::new(sum, [num_vectors, self.embedding_dim]),
                &device,
            );
            return Ok(flat.reshape(shape));
        }
        // One read back for all levels: [min_0, max_0, min_1, max_1, ...].
        let bounds: Vec<Tensor<1, Int>> = indices
            .iter()
            .flat_map(|level| [level.clone().min(), level.clone().max()])
            .collect();
        let bounds: Vec<i64> = Tensor::cat(bounds, 0).into_data().iter::<i64>().collect();
        self.check_index_range(bounds.chunks(2).map(|pair| (pair[0], pair[1])))?;
        let sum = indices
            .iter()
            .zip(&self.levels)
            .map(|(level_indices, level)| level.codebook(&device).select(0, level_indices.clone()))
            .reduce(|a, b| a.add(b))
            .expect("at least one level");
        Ok(sum.reshape(shape))
    }

    /// How the levels search and accumulate (see [`Search`]).
    fn search(&self) -> Search {
        Search {
            max_elements: self.max_distance_elements,
            dense: self.dense_statistics,
        }
    }

    /// Runs the first `num_levels` levels on `residual` `[N, D]` (`N > 0`, no autodiff); with a plan,
    /// a training step: (k-means init,) EMA update (, dead-code restart) of each level.
    fn run_levels(
        &self,
        mut residual: Tensor<2>,
        num_levels: usize,
        plan: Option<&UpdatePlan>,
        device: &Device,
    ) -> Vec<LevelPass> {
        let mut passes = Vec::with_capacity(num_levels);
        let search = self.search();
        // On CPU devices the residual also lives in a host buffer that each level's search
        // turns into the next residual (see `crate::host`); data-parallel passes work on
        // tensors.
        let data_parallel = plan.is_some() && self.data_parallel;
        let mut host_rows =
            (in_host_memory(device) && !data_parallel).then(|| host_floats(residual.clone()));
        for (index, level) in self.levels[..num_levels].iter().enumerate() {
            let (old_count, old_weight) = level.statistics(device);
            if let Some(plan) = plan.filter(|_| self.data_parallel) {
                let pass = self.data_parallel_pass(
                    level,
                    index,
                    old_count,
                    old_weight,
                    residual.clone(),
                    plan,
                    search,
                );
                residual = pass.next_residual.clone();
                passes.push(pass);
                continue;
            }
            let (mut count, mut weight) = (old_count.clone(), old_weight.clone());
            if plan.is_some_and(|plan| plan.kmeans) {
                // Level by level: this level's residuals come from the initialized levels
                // before it.
                (count, weight) = EmaCodebook::kmeans(
                    residual.clone(),
                    level.num_embeddings,
                    self.kmeans_iterations,
                    search,
                );
            }
            let codebook = codebook_from_statistics(count.clone(), weight.clone(), level.epsilon);
            let (assignment, next_residual) = match host_rows.as_mut() {
                Some(rows) => EmaCodebook::assign_on_host(&codebook, rows, search, device),
                None => {
                    let assignment = EmaCodebook::assign(&codebook, residual.clone(), search);
                    let next_residual = residual.clone().sub(assignment.quantized.clone());
                    (assignment, next_residual)
                }
            };
            let mut restarted = 0;
            if let Some(plan) = plan {
                let (count, weight) = EmaCodebook::ema_step(
                    count,
                    weight,
                    residual.clone(),
                    &assignment,
                    self.ema_decay,
                    search,
                );
                let (count, weight) = match plan.restart_threshold {
                    Some(threshold) => {
                        let (count, weight, n) = EmaCodebook::restart_dead_codes(
                            count,
                            weight,
                            residual.clone(),
                            &assignment,
                            threshold,
                        );
                        restarted = n;
                        (count, weight)
                    }
                    None => (count, weight),
                };
                store_if_finite(level, (count, weight), (old_count, old_weight), plan);
            }
            residual = next_residual.clone();
            passes.push(LevelPass {
                assignment,
                next_residual,
                restarted,
            });
        }
        passes
    }

    /// One level's training pass in data-parallel mode: every decision from the synchronized
    /// state `(old_count, old_weight)`, every batch contribution a per-code count or sum
    /// (see [`EmaResidualVectorQuantizerConfig::data_parallel`]).
    #[allow(clippy::too_many_arguments)]
    fn data_parallel_pass(
        &self,
        level: &EmaCodebook,
        index: usize,
        old_count: Tensor<1>,
        old_weight: Tensor<2>,
        residual: Tensor<2>,
        plan: &UpdatePlan,
        search: Search,
    ) -> LevelPass {
        let step = plan.replace.unwrap_or(0);
        // Which codes to split off the busiest ones, from the synchronized counts: during the
        // init, those no vector chose on the last step (count 0; a code chosen by one vector
        // on one of k devices has 1/k); after, the dead codes by the restart threshold.
        let split_below = match plan.replace {
            Some(0) => None,
            Some(_) => Some((EMPTY_CODE_COUNT, 0.0)),
            None => plan.restart_threshold.map(|rate| (0.0, rate)),
        };
        let salt = SplitMix64::new(step ^ ((index as u64) << 48)).next_u64();
        let (count, weight, restarted) = match split_below {
            Some(below) => EmaCodebook::split_codes(
                old_count.clone(),
                old_weight.clone(),
                level.epsilon,
                below,
                salt,
            ),
            None => (old_count.clone(), old_weight.clone(), 0),
        };
        let codebook = codebook_from_statistics(count.clone(), weight.clone(), level.epsilon);
        let assignment = EmaCodebook::assign(&codebook, residual.clone(), search);
        let (count, weight) = match plan.replace {
            Some(_) => EmaCodebook::replace_step(residual.clone(), &assignment, search),
            None => EmaCodebook::ema_step(
                count,
                weight,
                residual.clone(),
                &assignment,
                self.ema_decay,
                search,
            ),
        };
        store_if_finite(level, (count, weight), (old_count, old_weight), plan);
        let next_residual = residual.sub(assignment.quantized.clone());
        LevelPass {
            assignment,
            next_residual,
            restarted,
        }
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

    /// Checks each level's `(min, max)` index against its codebook size.
    fn check_index_range(&self, bounds: impl Iterator<Item = (i64, i64)>) -> Result<(), RvqError> {
        for (level, ((min, max), codebook)) in bounds.zip(&self.levels).enumerate() {
            if min < 0 || max >= codebook.num_embeddings as i64 {
                return Err(RvqError::IndexOutOfRange {
                    level,
                    min,
                    max,
                    num_embeddings: codebook.num_embeddings,
                });
            }
        }
        Ok(())
    }
}

/// Stores a level's new statistics, or keeps the old ones when the batch held a NaN or an
/// infinity (decided on the device: no read back), so such a batch never enters the state.
fn store_if_finite(
    level: &EmaCodebook,
    (count, weight): (Tensor<1>, Tensor<2>),
    (old_count, old_weight): (Tensor<1>, Tensor<2>),
    plan: &UpdatePlan,
) {
    let [k, d] = weight.dims();
    let skip = plan.non_finite.clone();
    let count = count.mask_where(skip.clone().expand([k]), old_count);
    let weight = weight.mask_where(skip.reshape([1, 1]).expand([k, d]), old_weight);
    level.store(count, weight);
}

/// The total commitment loss on the autodiff device, with the gradient of every level's term.
///
/// `sum_l beta * mean((x - c_l)^2)` with `c_l = q_1 + ... + q_l` (constants), since
/// `r_l - q_l = x - c_l`. Its gradient `2 beta / (N D) * sum_l (x - c_l)` equals that of the
/// single term `beta * M * mean((x - mean_l c_l)^2)`, so one autodiff expression serves all
/// levels; the value is then corrected to the exact sum of the level losses with a constant.
fn commitment_loss_autodiff(
    flat: Tensor<2>,
    passes: &[LevelPass],
    total_loss: Tensor<1>,
    beta: f64,
) -> Tensor<1> {
    let num_levels = passes.len();
    // c_l = x - r_{l+1}; mean_l c_l = x - mean_l r_{l+1}
    let flat_plain = flat.clone().without_autodiff();
    let mean_residual = passes
        .iter()
        .map(|pass| pass.next_residual.clone())
        .reduce(|a, b| a.add(b))
        .expect("at least one level")
        .div_scalar(num_levels as f64);
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
