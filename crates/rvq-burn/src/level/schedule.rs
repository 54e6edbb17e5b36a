//! The step schedule: what each training step does to the levels' state, decided from the
//! configuration and the number of steps taken ([`Schedule`]), once per forward
//! ([`StepPlan`]), and applied by every level's step: the EMA update (or, in data-parallel
//! mode, its first steps' replacement by the batch statistics), the k-means init, and the
//! restart of dead codes (from batch vectors, or by splitting busy codes in data-parallel
//! mode). The quantizer dropout depth and the step counter after an import are keyed to the
//! same count, so they are asked of it too.

use burn::tensor::{Bool, Tensor};

use super::Statistics;
use super::kmeans::kmeans;
use super::restart::{Residuals, Restarted, restart_dead_codes, split_codes};
use crate::config::{DeadCodeRule, EmaResidualVectorQuantizerConfig};
use crate::path::{LevelPass, LevelPath, Rows, ema};
use crate::util::{SplitMix64, unit_rows};

/// Below this count a code counts as empty during the data-parallel init (counts there are
/// numbers of vectors, averaged over devices: 0, or at least 1 / devices).
const EMPTY_CODE_COUNT: f64 = 1e-6;

/// The schedule a configuration sets: asked by the quantizer (does a step need the count of
/// steps taken? how deep does dropout go? where does the count stand after an import?) and
/// turned into each training step's [`StepPlan`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Schedule<'a> {
    config: &'a EmaResidualVectorQuantizerConfig,
}

impl<'a> Schedule<'a> {
    /// The schedule of `config`.
    pub(crate) fn of(config: &'a EmaResidualVectorQuantizerConfig) -> Self {
        Self { config }
    }

    /// Whether a training step needs the number of steps taken so far (a read back to the
    /// host): only when an option is keyed to it.
    pub(crate) fn reads_step(&self) -> bool {
        let c = self.config;
        c.kmeans_init
            || c.data_parallel
            || c.quantize_dropout > 0.0
            || (c.threshold_ema_dead_code > 0.0 && c.dead_code_check_every > 1)
    }

    /// The number of steps the state counts after an import: the first multiple of
    /// `dead_code_check_every` past any initialization steps (k-means init at step 0; the
    /// data-parallel replacement steps), so no init runs on an imported state and the next
    /// dead-code check comes a whole period later.
    #[cfg(feature = "pytorch")]
    pub(crate) fn steps_after_import(&self) -> u64 {
        let c = self.config;
        let init_steps = match (c.data_parallel, c.kmeans_init) {
            (true, true) => c.kmeans_iterations.max(1),
            _ => 1,
        };
        let every = c.dead_code_check_every.max(1);
        (init_steps.div_ceil(every) * every) as u64
    }

    /// The depth quantizer dropout draws for training step `step` of a stack of
    /// `num_levels`: with probability `quantize_dropout`, uniform in `min..=M` (the full
    /// depth included), else `M`. A fixed hash of the step, so it is reproducible and the
    /// same on every device.
    pub(crate) fn dropout_depth(&self, step: u64, num_levels: usize) -> usize {
        let c = self.config;
        if c.quantize_dropout <= 0.0 {
            return num_levels;
        }
        let min = c.quantize_dropout_min_levels.clamp(1, num_levels);
        // One draw: its top 53 bits decide whether to drop, its low 32 bits the depth.
        let draw = SplitMix64::new(step).next_u64();
        let uniform = (draw >> 11) as f64 / (1u64 << 53) as f64;
        if uniform >= c.quantize_dropout {
            return num_levels;
        }
        min + ((draw & 0xFFFF_FFFF) % (num_levels - min + 1) as u64) as usize
    }

    /// The plan of a training step: `step` is the number of EMA steps taken so far (`None`
    /// when [`Schedule::reads_step`] is false, so it was not read), `non_finite` whether the
    /// batch holds a NaN or an infinity.
    pub(crate) fn plan(&self, step: Option<u64>, non_finite: Tensor<1, Bool>) -> StepPlan {
        let c = self.config;
        let restart_due = c.threshold_ema_dead_code > 0.0
            && step.is_none_or(|s| (s + 1) % c.dead_code_check_every as u64 == 0);
        let rate = restart_due.then_some(c.threshold_ema_dead_code);
        let ema_merge = Merge::Ema { decay: c.ema_decay };
        if !c.data_parallel {
            return StepPlan {
                non_finite,
                kmeans_iterations: (c.kmeans_init && step == Some(0))
                    .then_some(c.kmeans_iterations),
                merge: ema_merge,
                restart: rate.map(|threshold| Restart::BatchVectors {
                    threshold,
                    before_update: match c.dead_code_rule {
                        DeadCodeRule::AfterUpdate => None,
                        DeadCodeRule::BeforeUpdate {
                            replaced_usage_ratio,
                        } => Some(replaced_usage_ratio),
                    },
                }),
            };
        }
        // Data-parallel: the first step (the first `kmeans_iterations` with k-means init)
        // replaces the state; from the second of them on, the codes left empty are split off
        // busy ones; after them, the dead codes by the restart threshold are.
        let replace_steps = match c.kmeans_init {
            true => c.kmeans_iterations as u64,
            false => 1,
        };
        let replace = step.filter(|&s| s < replace_steps);
        let split_below = match replace {
            Some(0) => None,
            Some(_) => Some((EMPTY_CODE_COUNT, 0.0)),
            None => rate.map(|rate| (0.0, rate)),
        };
        StepPlan {
            non_finite,
            kmeans_iterations: None,
            merge: match replace {
                Some(_) => Merge::Replace,
                None => ema_merge,
            },
            restart: split_below.map(|(absolute, rate)| Restart::Split {
                absolute,
                rate,
                salt: replace.unwrap_or(0),
            }),
        }
    }
}

/// What one training step does to every level's state besides the assignment.
pub(crate) struct StepPlan {
    /// `[1]`, true when the batch holds a NaN or an infinity: then every state change of the
    /// step is discarded on the device (no read back), and the output reports it.
    pub non_finite: Tensor<1, Bool>,
    /// Initialize each level by k-means (this many Lloyd iterations) on its input first.
    kmeans_iterations: Option<usize>,
    /// How the batch statistics enter the state.
    merge: Merge,
    /// Which codes are restarted, and how.
    restart: Option<Restart>,
}

/// How a step's per-code counts and sums enter the state.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Merge {
    /// `c <- g c + (1 - g) N_k`, `m <- g m + (1 - g) S_k` (the reference's `_ema_update`:
    /// [`ema`]).
    Ema { decay: f64 },
    /// The batch's counts and sums replace the state: a Lloyd step from the codebook the
    /// assignment was made with (the data-parallel init). Averaged over devices, a code
    /// becomes exactly the mean of the vectors that chose it on any device; a code no vector
    /// chose gets count 0 and the zero vector, split off a busy code at the next init step
    /// (k-means init) or by the dead-code restarts, if either is on.
    Replace,
}

/// Which codes a step restarts.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Restart {
    /// The codes whose EMA count is below `threshold` times the uniform rate take the batch
    /// vectors represented worst: after the update (`before_update: None`), or before it with
    /// count `ratio` times the uniform rate (`Some(ratio)`, Mimi's rule).
    BatchVectors {
        threshold: f64,
        before_update: Option<f64>,
    },
    /// Before the assignment, the codes whose synchronized count is below
    /// `absolute + rate * n / K` are split off the busiest codes (data-parallel mode, where
    /// every device must make the same change); `salt` varies the offsets.
    Split { absolute: f64, rate: f64, salt: u64 },
}

impl StepPlan {
    /// The EMA decay, when the step's only change to a level's state is the EMA update (no
    /// k-means init, no restart, no replacement): the level's pass can then make the update
    /// ([`LevelPath::level_updating`]).
    pub(crate) fn ema_alone(&self) -> Option<f64> {
        match (self.kmeans_iterations, self.restart, self.merge) {
            (None, None, Merge::Ema { decay }) => Some(decay),
            _ => None,
        }
    }

    /// Whether a level's step must keep its input rows for [`StepPlan::update`] (restarts
    /// from batch vectors).
    pub(crate) fn restarts_from_batch(&self) -> bool {
        matches!(self.restart, Some(Restart::BatchVectors { .. }))
    }

    /// The statistics level `level` starts its step from: its `state`, its k-means init on
    /// the level's input `rows`, or the state with busy codes split into dead ones; with how
    /// many codes were split.
    pub(crate) fn prepare<P: LevelPath>(
        &self,
        path: &P,
        rows: &P::Rows,
        level: usize,
        state: Statistics,
        config: &EmaResidualVectorQuantizerConfig,
    ) -> Restarted {
        let [k, _] = state.sums.dims();
        if let Some(iterations) = self.kmeans_iterations {
            // Level by level: this level's input comes from the initialized levels before it.
            let cosine = config.cosine_similarity;
            let data = match cosine {
                true => unit_rows(rows.residual()),
                false => rows.residual(),
            };
            return Restarted {
                statistics: kmeans(path, data, k, iterations, cosine),
                restarted: 0,
            };
        }
        match self.restart {
            Some(Restart::Split {
                absolute,
                rate,
                salt,
            }) => {
                let salt = SplitMix64::new(salt ^ ((level as u64) << 48)).next_u64();
                split_codes(state, config, (absolute, rate), salt)
            }
            _ => Restarted {
                statistics: state,
                restarted: 0,
            },
        }
    }

    /// The statistics after the step: the batch's (`pass`) merged into `statistics` (what
    /// the assignment was made with), then, if the plan says so, dead codes restarted from
    /// the level's input and the residual it left (`residuals`); with how many codes were
    /// restarted.
    pub(crate) fn update(
        &self,
        statistics: Statistics,
        pass: &LevelPass,
        residuals: Option<Residuals>,
    ) -> Restarted {
        let counts = pass.counts.clone().expect("a training pass counts");
        let sums = pass.sums.clone().expect("a training pass sums");
        // Mimi's rule: restart on the state the batch was assigned with, then the EMA.
        let before = match (self.restart, &residuals) {
            (
                Some(Restart::BatchVectors {
                    threshold,
                    before_update: Some(ratio),
                }),
                Some(residuals),
            ) => restart_dead_codes(statistics, residuals, threshold, Some(ratio)),
            _ => Restarted {
                statistics,
                restarted: 0,
            },
        };
        let state = before.statistics;
        let merged = match self.merge {
            Merge::Ema { decay } => Statistics {
                counts: ema(state.counts, counts, decay),
                sums: ema(state.sums, sums, decay),
            },
            Merge::Replace => Statistics { counts, sums },
        };
        match (self.restart, residuals) {
            (
                Some(Restart::BatchVectors {
                    threshold,
                    before_update: None,
                }),
                Some(residuals),
            ) => restart_dead_codes(merged, &residuals, threshold, None),
            _ => Restarted {
                statistics: merged,
                restarted: before.restarted,
            },
        }
    }
}
