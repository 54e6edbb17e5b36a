//! One level of the residual stack: an EMA codebook, its state and its step.
//!
//! The state is the two exponential moving averages the reference keeps per level: the EMA of
//! how many vectors each code was assigned (`ema_count_l{l}`) and the EMA of the sum of those
//! vectors (`ema_weight_l{l}`). The codebook (`codebook_l{l}`) is *derived* from them by the
//! configured [`CodebookRule`](crate::CodebookRule),
//!
//! ```text
//! n     = sum_k c_k
//! c^_k  = (c_k + eps) / (n + K*eps) * n        Laplace smoothing
//! e_k   = m_k / c^_k
//! ```
//!
//! which is exactly what the reference assigns after every update, and equals its initial
//! codebook (counts one, sums equal to the codebook, so `c^ = 1`). The rule is configuration,
//! not state: records and streams do not carry it, so load them into a layer configured with
//! the rule they were made with. Deriving the codebook instead of storing it a second time
//! keeps the three consistent by construction, and is what makes the statistics correct when
//! several devices update them at once: `RunningState` averages the pending per-thread values,
//! and averaging counts and sums scales both by the same factor, which cancels in the ratio,
//! while averaging codebooks would not.
//!
//! A level's step over a batch ([`EmaCodebook::step`]) reads the state, assigns the rows on
//! the call's execution path, and in a training step updates and stores the state as the
//! step's [`StepPlan`] says: [`schedule`] decides what each step does, [`kmeans`] and
//! [`restart`] are the changes beyond the EMA it may ask for.

pub(crate) mod kmeans;
pub(crate) mod restart;
pub(crate) mod schedule;

use burn::module::{Module, RunningState};
use burn::tensor::{Bool, Device, Distribution, FloatDType, Tensor};

pub(crate) use self::schedule::{Schedule, StepPlan};
use crate::config::EmaResidualVectorQuantizerConfig;
use crate::error::RvqError;
use crate::path::{
    Codebook, EmaUpdate, LevelPass, LevelPath, Pricing, Rows, UpdatedPass, Work, unless_skipped,
};
use crate::util::unit_rows;

/// A level's EMA statistics: per-code counts `[K]` (reference: `ema_count_l{l}`) and sums of
/// the assigned vectors `[K, D]` (reference: `ema_weight_l{l}`), in f32, without autodiff.
#[derive(Debug, Clone)]
pub struct Statistics {
    /// EMA of the number of vectors assigned to each code, `[K]`.
    pub counts: Tensor<1>,
    /// EMA of the sum of the vectors assigned to each code, `[K, D]`.
    pub sums: Tensor<2>,
}

impl Statistics {
    /// The codebook `[K, D]` these statistics derive by `config`'s rule, its rows
    /// L2-normalized for cosine codebooks (vector-quantize-pytorch's `update_ema`).
    pub(crate) fn codebook(&self, config: &EmaResidualVectorQuantizerConfig) -> Tensor<2> {
        config.codebook(self.counts.clone(), self.sums.clone())
    }

    /// [`Statistics::codebook`] as `path` derives it (with the codes' squared norms, on the
    /// kernel path).
    pub(crate) fn codebook_on<P: LevelPath>(
        &self,
        path: &P,
        config: &EmaResidualVectorQuantizerConfig,
    ) -> Codebook {
        let mut codebooks = Self::codebooks_on(std::slice::from_ref(self), path, config);
        codebooks.pop().expect("one level's codebook")
    }

    /// [`Statistics::codebook_on`] of several levels' statistics, derived together (a launch
    /// per 4 levels on the kernel path).
    pub(crate) fn codebooks_on<P: LevelPath>(
        levels: &[Self],
        path: &P,
        config: &EmaResidualVectorQuantizerConfig,
    ) -> Vec<Codebook> {
        let (counts, sums) = levels
            .iter()
            .map(|level| (level.counts.clone(), level.sums.clone()))
            .unzip();
        path.codebooks(counts, sums, config)
    }
}

/// One EMA codebook of `num_embeddings` vectors of dimension `embedding_dim`: a level of
/// the quantizer.
///
/// Its state is non-trainable: no optimizer sees a gradient for it, records save it (as
/// `levels.{l}.ema_count` and `levels.{l}.ema_weight`), and it changes only in training
/// forwards of the quantizer and through its `try_set_statistics`.
#[derive(Module, Debug)]
pub struct EmaCodebook {
    /// EMA of per-code assignment counts, shape `[K]`.
    ema_count: RunningState<Tensor<1>>,
    /// EMA of per-code sums of assigned vectors, shape `[K, D]`.
    ema_weight: RunningState<Tensor<2>>,
    /// `K`.
    num_embeddings: usize,
    /// `D`.
    embedding_dim: usize,
}

/// What a call asks of every level.
pub(crate) enum Mode {
    /// A pass that leaves the state alone, doing `Work`.
    Pass(Work),
    /// A training step: everything, and the state updated as the plan says (boxed: a plan
    /// holds a tensor, and a call makes one).
    Train(Box<StepPlan>),
}

/// What every level's step of one call shares: the configuration, the device the call runs
/// on, and what it asks.
pub(crate) struct Task<'a> {
    /// The quantizer's configuration (codebook rule, epsilon, schedule).
    pub config: &'a EmaResidualVectorQuantizerConfig,
    /// The call's device, without autodiff.
    pub device: Device,
    /// Evaluation or training.
    pub mode: Mode,
}

impl Task<'_> {
    /// Every one of `levels`' codebooks for their steps in this task, derived together
    /// ([`Statistics::codebooks_on`]) where the levels derive them from their state as it is
    /// before the first level runs: in a pass, and in a training step whose only change to
    /// the state is the EMA update. `None` for each level otherwise: its step derives its
    /// own, after its k-means init or restarts.
    pub(crate) fn codebooks<P: LevelPath>(
        &self,
        levels: &[EmaCodebook],
        path: &P,
    ) -> Vec<Option<Codebook>> {
        let from_state = match &self.mode {
            Mode::Pass(_) => true,
            Mode::Train(plan) => plan.ema_alone().is_some(),
        };
        if !from_state {
            return levels.iter().map(|_| None).collect();
        }
        let states: Vec<Statistics> = levels
            .iter()
            .map(|level| level.statistics(&self.device))
            .collect();
        Statistics::codebooks_on(&states, path, self.config)
            .into_iter()
            .map(Some)
            .collect()
    }
}

/// What a level's step gives back.
pub(crate) struct LevelStep {
    /// The level's pass over the batch.
    pub pass: LevelPass,
    /// Codes restarted (or split off busy codes) by this step.
    pub restarted: usize,
    /// A cosine level's chosen codes, `[N, D]`: what the commitment loss of a forward needs
    /// (`None` for Euclidean levels).
    pub unit_codes: Option<Tensor<2>>,
}

/// A level's assignment of the rows: its pass, what restarts and cosine outputs need, and
/// the state, where the pass updated it.
struct Assigned {
    pass: LevelPass,
    residuals: Option<restart::Residuals>,
    unit_codes: Option<Tensor<2>>,
    updated: Option<Statistics>,
}

/// `path`'s pass of `rows` over `codebook`, priced by `pricing`, doing `work`, or, with
/// `update`, a training pass that makes it.
fn pass<P: LevelPath>(
    path: &P,
    codebook: Tensor<2>,
    pricing: Pricing,
    rows: &mut P::Rows,
    (work, update): (Work, Option<EmaUpdate>),
) -> (LevelPass, Option<Statistics>) {
    match update {
        None => (path.level_priced(codebook, pricing, rows, work), None),
        Some(update) => {
            debug_assert_eq!(work, Work::TRAINING, "an update is made by a training pass");
            let UpdatedPass { pass, counts, sums } =
                path.level_updating(codebook, pricing, rows, update);
            (pass, Some(Statistics { counts, sums }))
        }
    }
}

/// Assigns `rows` to `codebook` on `path` and turns them into the next residual. Euclidean:
/// the path's level. Cosine: the path's level on the L2-normalized residual, searched by dot
/// product (its counts, sums and squared error are the normalized rows'), then its codes
/// subtracted from the residual itself, as vector-quantize-pytorch's `ResidualVQ` does.
/// With `keep`, the rows searched and the residual their codes left (restarts); with
/// `update`, the state updated in the pass.
fn assign<P: LevelPath>(
    path: &P,
    codebook: Codebook,
    rows: &mut P::Rows,
    (work, update): (Work, Option<EmaUpdate>),
    (cosine, keep): (bool, bool),
) -> Assigned {
    if !cosine {
        let input = keep.then(|| rows.residual());
        let pricing = Pricing::with_norms(codebook.norms);
        let (pass, updated) = pass(path, codebook.vectors, pricing, rows, (work, update));
        let residuals = input.map(|input| restart::Residuals {
            input,
            next: rows.residual(),
        });
        return Assigned {
            pass,
            residuals,
            unit_codes: None,
            updated,
        };
    }
    let unit = unit_rows(rows.residual());
    let work = Work {
        output: true,
        ..work
    };
    let mut unit_rows = P::Rows::start(unit.clone(), work);
    let pricing = Pricing::DOT_PRODUCT;
    let (pass, updated) = pass(
        path,
        codebook.vectors,
        pricing,
        &mut unit_rows,
        (work, update),
    );
    let next = unit_rows.residual();
    let codes = unit_rows
        .finish()
        .expect("started with the running sums")
        .quantized;
    rows.subtract(codes.clone());
    Assigned {
        pass,
        residuals: keep.then(|| restart::Residuals { input: unit, next }),
        unit_codes: Some(codes),
        updated,
    }
}

impl EmaCodebook {
    /// A codebook drawn uniformly from `[-1/K, 1/K]` (the reference's initializer), with
    /// counts one and sums equal to the codebook.
    pub(crate) fn init(num_embeddings: usize, embedding_dim: usize, device: &Device) -> Self {
        let device = device.clone().without_autodiff();
        let limit = 1.0 / num_embeddings.max(1) as f64;
        // f32 whatever the device's default float type (see `statistics`).
        let codebook = Tensor::<2>::random(
            [num_embeddings, embedding_dim],
            Distribution::Uniform(-limit, limit),
            &device,
        )
        .cast(FloatDType::F32);
        let count = Tensor::<1>::ones([num_embeddings], &device).cast(FloatDType::F32);
        Self {
            ema_count: RunningState::new(count),
            ema_weight: RunningState::new(codebook),
            num_embeddings,
            embedding_dim,
        }
    }

    /// `K`.
    pub(crate) fn num_embeddings(&self) -> usize {
        self.num_embeddings
    }

    /// The current EMA statistics on `device`, without autodiff, in f32.
    ///
    /// Reads with `value_sync`, so an update made earlier on this thread is seen, and moves the
    /// tensors to `device` (under `fork`/`to_device` the shared state may live elsewhere). The
    /// state is kept in f32 (sums of thousands of vectors lose their low bits in half
    /// precision); a record saved in another float type (Burn's loaders keep the file's) is
    /// read as f32 here, so every path computes in f32.
    pub(crate) fn statistics(&self, device: &Device) -> Statistics {
        Statistics {
            counts: read(&self.ema_count, device),
            sums: read(&self.ema_weight, device),
        }
    }

    /// The counts of [`EmaCodebook::statistics`] alone (the entropy models, codebook health).
    pub(crate) fn counts(&self, device: &Device) -> Tensor<1> {
        read(&self.ema_count, device)
    }

    /// The device the state lives on.
    pub(crate) fn state_device(&self) -> Device {
        self.ema_count.value().device()
    }

    /// Applies every pending (deferred) update of the statistics, from every thread.
    pub(crate) fn sync(&self) {
        let _ = self.ema_count.valid();
        let _ = self.ema_weight.valid();
    }

    /// Replaces the statistics (e.g. to import a trained codebook), applied at once.
    ///
    /// Counts must be finite and >= 0 with a positive total, sums finite; shapes `[K]` and
    /// `[K, D]`. `level` only names the tensors in errors. On error the state is unchanged.
    pub(crate) fn try_set_statistics(
        &self,
        level: usize,
        statistics: Statistics,
    ) -> Result<(), RvqError> {
        let Statistics { counts, sums } = statistics;
        let (k, d) = (self.num_embeddings, self.embedding_dim);
        check_shape(level, "ema_count", &[k], &counts.dims())?;
        check_shape(level, "ema_weight", &[k, d], &sums.dims())?;
        let host_counts: Vec<f32> = counts.to_data().iter::<f32>().collect();
        let host_sums: Vec<f32> = sums.to_data().iter::<f32>().collect();
        if let Err(problem) = check_statistics(&host_counts, &host_sums) {
            let (field, reason) = match problem {
                BadStatistics::Count { .. } => ("ema_count", "must hold finite values >= 0"),
                BadStatistics::ZeroTotal => ("ema_count", "must have a positive total"),
                BadStatistics::Sum { .. } => ("ema_weight", "must hold finite values"),
            };
            return Err(RvqError::InvalidState {
                field: format!("levels.{level}.{field}"),
                reason: reason.into(),
            });
        }
        // Kept in f32, whatever float type the statistics came in.
        self.store(Statistics {
            counts: counts.without_autodiff().cast(FloatDType::F32),
            sums: sums.without_autodiff().cast(FloatDType::F32),
        });
        // Apply it now: left pending under this thread, it would be averaged with the first
        // updates of other threads (Burn's multi-device workers) instead of replacing the state.
        self.sync();
        Ok(())
    }

    /// Makes `statistics` the level's state (applied when next read; see `RunningState`).
    fn store(&self, statistics: Statistics) {
        self.ema_count.update(statistics.counts);
        self.ema_weight.update(statistics.sums);
    }

    /// This level's step over a batch on `path`: read the state, (k-means init or split
    /// codes,) assign the rows and turn them into the next residual, and, in a training step,
    /// update and store the state. `index` is the level's place in the stack; `codebook`, the
    /// one its state derives, where [`Task::codebooks`] derived it with the other levels'.
    pub(crate) fn step<P: LevelPath>(
        &self,
        index: usize,
        path: &P,
        rows: &mut P::Rows,
        task: &Task<'_>,
        codebook: Option<Codebook>,
    ) -> LevelStep {
        let state = self.statistics(&task.device);
        let cosine = task.config.cosine_similarity;
        let derived = |codebook: Option<Codebook>| {
            codebook.unwrap_or_else(|| state.codebook_on(path, task.config))
        };
        let plan = match &task.mode {
            Mode::Pass(work) => {
                let codebook = derived(codebook);
                let assigned = assign(path, codebook, rows, (*work, None), (cosine, false));
                return LevelStep {
                    pass: assigned.pass,
                    restarted: 0,
                    unit_codes: assigned.unit_codes,
                };
            }
            Mode::Train(plan) => plan,
        };
        if let Some(decay) = plan.ema_alone() {
            // The EMA update alone: made in the level's pass.
            let codebook = derived(codebook);
            let update = EmaUpdate {
                counts: state.counts,
                sums: state.sums,
                decay,
                skip: plan.non_finite.clone(),
            };
            let work = (Work::TRAINING, Some(update));
            let assigned = assign(path, codebook, rows, work, (cosine, false));
            self.store(assigned.updated.expect("the pass updated the state"));
            return LevelStep {
                pass: assigned.pass,
                restarted: 0,
                unit_codes: assigned.unit_codes,
            };
        }
        let prepared = plan.prepare(path, rows, index, state.clone(), task.config);
        let codebook = prepared.statistics.codebook_on(path, task.config);
        // Restarts from batch vectors need the level's input and the residual it leaves.
        let keep = plan.restarts_from_batch();
        let assigned = assign(path, codebook, rows, (Work::TRAINING, None), (cosine, keep));
        let updated = plan.update(prepared.statistics, &assigned.pass, assigned.residuals);
        self.store_if_finite(updated.statistics, state, &plan.non_finite);
        LevelStep {
            pass: assigned.pass,
            restarted: prepared.restarted + updated.restarted,
            unit_codes: assigned.unit_codes,
        }
    }

    /// Stores `new` statistics, or keeps `old` ones when the batch held a NaN or an infinity
    /// (`skip`, decided on the device: no read back), so such a batch never enters the state.
    fn store_if_finite(&self, new: Statistics, old: Statistics, skip: &Tensor<1, Bool>) {
        self.store(Statistics {
            counts: unless_skipped(new.counts, old.counts, skip),
            sums: unless_skipped(new.sums, old.sums, skip),
        });
    }
}

/// A state tensor as every reader takes it: after pending updates, on `device` without
/// autodiff, in f32.
fn read<const D: usize>(state: &RunningState<Tensor<D>>, device: &Device) -> Tensor<D> {
    state
        .value_sync()
        .without_autodiff()
        .to_device(&device.clone().without_autodiff())
        .cast(FloatDType::F32)
}

/// What makes EMA statistics unusable: the first offending count or sum.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum BadStatistics {
    /// A count is negative or not finite (index, value).
    Count { at: usize, value: f32 },
    /// The counts sum to zero: no codebook can be derived.
    ZeroTotal,
    /// A sum is not finite (flat index into `[K, D]`, value).
    Sum { at: usize, value: f32 },
}

/// Counts finite and >= 0 with a positive total, sums finite: what every state given to a
/// level must satisfy (`try_set_statistics`, the PyTorch import).
pub(crate) fn check_statistics(counts: &[f32], sums: &[f32]) -> Result<(), BadStatistics> {
    if let Some((at, &value)) = counts
        .iter()
        .enumerate()
        .find(|(_, c)| !c.is_finite() || **c < 0.0)
    {
        return Err(BadStatistics::Count { at, value });
    }
    if counts.iter().map(|&c| f64::from(c)).sum::<f64>() <= 0.0 {
        return Err(BadStatistics::ZeroTotal);
    }
    if let Some((at, &value)) = sums.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(BadStatistics::Sum { at, value });
    }
    Ok(())
}

fn check_shape(
    level: usize,
    name: &str,
    expected: &[usize],
    got: &[usize],
) -> Result<(), RvqError> {
    if expected == got {
        Ok(())
    } else {
        Err(RvqError::StateShape {
            field: format!("levels.{level}.{name}"),
            expected: expected.to_vec(),
            got: got.to_vec(),
        })
    }
}
