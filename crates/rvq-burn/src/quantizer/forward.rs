//! The quantizer's entry points: `forward` (training and evaluation), `encode` and `decode`,
//! each a check of its input and one run of the levels on the path the device's backend
//! type chooses.

use burn::tensor::{Bool, FloatDType, Int, Tensor};

use super::{EmaResidualVectorQuantizer, estimator};
use crate::error::RvqError;
use crate::level::{LevelStep, Mode, Schedule, Statistics, Task};
use crate::options::{ForwardOptions, Mask};
use crate::output::RvqOutput;
use crate::path::{LevelPath, Path, Rows, RunningSums, Work, with_path};

impl EmaResidualVectorQuantizer {
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
            .reshape([num_vectors, self.embedding_dim()])
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
        num_levels: usize,
        options: &ForwardOptions,
    ) -> RvqOutput<2> {
        let [num_vectors, _] = flat.dims();
        if num_vectors == 0 {
            return self.empty_output(flat, num_levels);
        }
        let out = self.forward_codebook_rows(self.project_in(flat), num_levels, options);
        RvqOutput {
            quantized: self.project_out(out.quantized),
            ..out
        }
    }

    /// [`Self::forward_rows`] in the codebooks' space: rows `flat` `[N, codebook_dim]`.
    fn forward_codebook_rows(
        &self,
        flat: Tensor<2>,
        num_levels: usize,
        options: &ForwardOptions,
    ) -> RvqOutput<2> {
        let training = flat.is_autodiff() && self.training.is_enabled();
        let schedule = Schedule::of(&self.config);
        // The step counter is read back only when the schedule is keyed to it.
        let step = (training && schedule.reads_step()).then(|| self.steps_taken());
        let num_levels = match (training, options.num_levels) {
            (true, None) => schedule.dropout_depth(step.unwrap_or(0), self.num_levels()),
            _ => num_levels,
        };
        let flat_plain = flat.clone().without_autodiff(); // [N, D]
        let path = Path::choose(&flat_plain.device(), &self.config);
        // What this step does to the state: chosen once, applied by every level.
        let mode = match training && options.update_ema {
            true => {
                let non_finite = with_path!(path, p => p.non_finite(flat_plain.clone()));
                Mode::Train(Box::new(schedule.plan(step, non_finite)))
            }
            false => Mode::Pass(Work::EVALUATION),
        };
        let task = Task {
            config: &self.config,
            device: flat_plain.device(),
            mode,
        };
        let (steps, sums) = self.run_levels(path, flat_plain, num_levels, &task);
        let sums = sums.expect("a forward keeps the running sums");
        let update_skipped = match task.mode {
            Mode::Train(plan) => {
                self.count_step(&plan.non_finite);
                Some(plan.non_finite.clone())
            }
            Mode::Pass(_) => None,
        };
        estimator::output(flat, steps, sums, &self.config, update_skipped)
    }

    /// Counts a training step in the step counter, unless `skipped` (decided on the device).
    fn count_step(&self, skipped: &Tensor<1, Bool>) {
        let device = skipped.device();
        let steps = self
            .steps
            .value_sync()
            .without_autodiff()
            .to_device(&device);
        // `steps + 1 - skipped` (exact on counts): one cast, and the rest fuses with the add
        // where `bool_not` would take a launch of its own.
        self.steps
            .update(steps.add_scalar(1.0).sub(skipped.clone().float()));
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
        Ok(self.encode_rows(self.plain_rows(x, num_vectors), num_levels))
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
        let flat = self.plain_rows(x, num_vectors);
        Ok(self.encode_rows(flat.select(0, real), num_levels))
    }

    /// `x` `[..., D]` as `N` rows in the codebooks' space, `[N, codebook_dim]`, in f32,
    /// without autodiff (`N > 0`).
    pub(super) fn plain_rows<const R: usize>(&self, x: Tensor<R>, num_vectors: usize) -> Tensor<2> {
        let rows = x
            .without_autodiff()
            .reshape([num_vectors, self.embedding_dim()])
            .cast(FloatDType::F32);
        self.project_in(rows)
    }

    /// The codes of rows `[N, D]` (f32, no autodiff) with the first `num_levels` levels.
    fn encode_rows(&self, flat: Tensor<2>, num_levels: usize) -> Vec<Tensor<1, Int>> {
        let [num_vectors, _] = flat.dims();
        let device = flat.device();
        if num_vectors == 0 {
            return vec![Tensor::<1, Int>::zeros([0], &device); num_levels];
        }
        let path = Path::choose(&device, &self.config);
        let task = Task {
            config: &self.config,
            device,
            mode: Mode::Pass(Work::CODES),
        };
        let (steps, _) = self.run_levels(path, flat, num_levels, &task);
        steps.into_iter().map(|step| step.pass.indices).collect()
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
        let num_vectors = self.check_codes(indices, &shape)?;
        let device = indices[0].device().without_autodiff();
        if num_vectors == 0 {
            return Ok(Tensor::zeros(shape, &device));
        }
        let sum = with_path!(Path::choose(&device, &self.config), path => {
            let states: Vec<Statistics> = (0..indices.len())
                .map(|level| self.statistics(level, &device))
                .collect();
            let codebooks = Statistics::codebooks_on(&states, path, &self.config)
                .into_iter()
                .map(|codebook| codebook.vectors)
                .collect();
            path.decode(codebooks, indices)
        })?;
        Ok(self.project_out(sum).reshape(shape))
    }

    /// Runs the first `num_levels` levels on `x` `[N, D]` (`N > 0`, no autodiff) on `path`
    /// (the call's, [`Path::choose`]): each level's step in turn, every one passing its
    /// residual to the next. Returns each level's step and, for a forward's output, the
    /// running sums.
    fn run_levels(
        &self,
        path: Path,
        x: Tensor<2>,
        num_levels: usize,
        task: &Task<'_>,
    ) -> (Vec<LevelStep>, Option<RunningSums>) {
        fn run<P: LevelPath>(
            levels: &[crate::level::EmaCodebook],
            path: &P,
            x: Tensor<2>,
            task: &Task<'_>,
        ) -> (Vec<LevelStep>, Option<RunningSums>) {
            let work = match &task.mode {
                Mode::Pass(work) => *work,
                Mode::Train(_) => Work::TRAINING,
            };
            let mut rows = P::Rows::start(x, work);
            let codebooks = task.codebooks(levels, path);
            let steps = levels
                .iter()
                .zip(codebooks)
                .enumerate()
                .map(|(index, (level, codebook))| {
                    level.step(index, path, &mut rows, task, codebook)
                })
                .collect();
            (steps, rows.finish())
        }
        let levels = &self.levels[..num_levels];
        with_path!(path, p => run(levels, p, x, task))
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
        RvqOutput {
            quantized: x,
            indices: vec![Tensor::<1, Int>::zeros([0], &device); num_levels],
            loss,
            level_losses: vec![zero(); num_levels],
            code_counts: self.sizes()[..num_levels]
                .iter()
                .map(|&size| Tensor::zeros([size], &device))
                .collect(),
            restarted_codes: vec![0; num_levels],
            update_skipped: None,
        }
    }
}
