//! Execution paths: how one level's pass over a batch runs on a device.
//!
//! A level's pass takes the residual rows `r` `[N, D]` and a codebook `[K, D]`, finds each
//! row's nearest code, turns the rows into the next residual `r - e_idx`, and gives back what
//! the caller asked for ([`Work`]): per-code counts and sums of the rows (the EMA update), the
//! squared error left (the level's loss) and running sums of the chosen codes and of the
//! residuals (the output and the commitment loss's gradient). There are three ways to run it,
//! each in its own file, chosen once per call by the device's backend type ([`Path::choose`]):
//!
//! - [`host`]: Burn's CPU backends (`flex`, `ndarray`, LibTorch's CPU device), whose tensors
//!   live in host memory: one pass over cache-sized tiles of rows does the whole level
//!   (`host/search.rs`).
//! - `kernel` (feature `wgpu`): Burn's CubeCL backend (WGPU): the search, the per-code
//!   statistics and `decode` as CubeCL kernels (`kernel/search.rs`, `kernel/kernels.rs`).
//! - [`tensor`]: Burn tensor operations, on any backend: the straightforward version the
//!   others are tested against, and what runs where no faster path exists.
//!
//! Every path gives the same codes (up to rows at the same distance from two codes, which
//! rounding may order differently), the same counts, and sums and losses equal to the
//! rounding of their different orders of additions.

pub(crate) mod host;
#[cfg(feature = "wgpu")]
pub(crate) mod kernel;
pub(crate) mod tensor;

use burn::tensor::{Bool, Device, Int, Tensor};

use crate::config::{EmaResidualVectorQuantizerConfig, Execution};
use crate::error::RvqError;

/// What a level's pass produces besides the codes and the next residual.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Work {
    /// The number of rows that took each code, `[K]`.
    pub counts: bool,
    /// The sum of the rows (the level's input) that took each code, `[K, D]`.
    pub sums: bool,
    /// What a forward's output needs: the sum of the squared next residuals (the level's
    /// loss), and the running sums over levels of the chosen codes and of the next residuals.
    pub output: bool,
}

impl Work {
    /// The codes alone (`encode`).
    pub const CODES: Self = Self {
        counts: false,
        sums: false,
        output: false,
    };
    /// A forward that leaves the state alone: codes, counts, losses, the output.
    pub const EVALUATION: Self = Self {
        counts: true,
        sums: false,
        output: true,
    };
    /// A training forward: everything.
    pub const TRAINING: Self = Self {
        counts: true,
        sums: true,
        output: true,
    };
    /// Counts and sums alone (a k-means step).
    pub const STATISTICS: Self = Self {
        counts: true,
        sums: true,
        output: false,
    };
}

/// What one level's pass gives back; each `Option` is there when [`Work`] asked for it, but
/// the sums of a pass that made the EMA update ([`LevelPath::level_updating`]), which went
/// into it.
#[derive(Debug, Clone)]
pub(crate) struct LevelPass {
    /// Nearest code of every row, `[N]`.
    pub indices: Tensor<1, Int>,
    /// Rows per code, `[K]` (exact integers).
    pub counts: Option<Tensor<1>>,
    /// Sum of the input rows per code, `[K, D]`.
    pub sums: Option<Tensor<2>>,
    /// `sum_rows ||r - e_idx||^2`, `[1]`.
    pub squared_error: Option<Tensor<1>>,
}

/// A training step's EMA update of a level's state, made with the level's pass
/// ([`LevelPath::level_updating`]) when it is the step's only change to the state.
#[derive(Debug, Clone)]
pub(crate) struct EmaUpdate {
    /// The state's per-code counts, `[K]`.
    pub counts: Tensor<1>,
    /// The state's per-code sums, `[K, D]`.
    pub sums: Tensor<2>,
    /// The EMA decay `g`.
    pub decay: f64,
    /// `[1]`, set when the batch holds a NaN or an infinity: the state then stays as it is.
    pub skip: Tensor<1, Bool>,
}

/// A level's pass with its state's EMA update ([`LevelPath::level_updating`]).
#[derive(Debug, Clone)]
pub(crate) struct UpdatedPass {
    /// The pass; its sums may be absent, having gone into the update.
    pub pass: LevelPass,
    /// The updated counts, `[K]`.
    pub counts: Tensor<1>,
    /// The updated sums, `[K, D]`.
    pub sums: Tensor<2>,
}

/// The EMA rule: `state g + batch (1 - g)` (the reference's `_ema_update`), for the counts
/// and the sums alike.
pub(crate) fn ema<const D: usize>(state: Tensor<D>, batch: Tensor<D>, decay: f64) -> Tensor<D> {
    state.mul_scalar(decay).add(batch.mul_scalar(1.0 - decay))
}

/// A state tensor after a step: `new`, or `old` where `skip` `[1]` is set (the batch held a
/// NaN or an infinity, and the state stays as it was).
pub(crate) fn unless_skipped<const D: usize>(
    new: Tensor<D>,
    old: Tensor<D>,
    skip: &Tensor<1, Bool>,
) -> Tensor<D> {
    let shape = new.dims();
    new.mask_where(skip.clone().reshape([1; D]).expand(shape), old)
}

impl EmaUpdate {
    /// The update by a training `pass`'s counts and sums: [`ema`], or the state itself where
    /// `skip` is set.
    pub(crate) fn apply(self, pass: LevelPass) -> UpdatedPass {
        let counts = pass.counts.clone().expect("a training pass counts");
        let sums = pass.sums.clone().expect("a training pass sums");
        let counts = ema(self.counts.clone(), counts, self.decay);
        let sums = ema(self.sums.clone(), sums, self.decay);
        UpdatedPass {
            pass,
            counts: unless_skipped(counts, self.counts, &self.skip),
            sums: unless_skipped(sums, self.sums, &self.skip),
        }
    }
}

/// What a level of a beam search chose: for each vector `i` and rank `j < B` (at `i B + j`),
/// the candidate it continues (`0..B`) and the code it adds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Expansion {
    /// The candidate each new one continues, `[N B]`.
    pub parents: Vec<u32>,
    /// The code each new one adds, `[N B]`.
    pub codes: Vec<u32>,
}

/// What a search adds to `-2 r.e_c` for each code `c`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Pricing {
    /// Leave out `||e_c||^2`: the search maximizes the dot product (cosine codebooks, whose
    /// codes have unit length; vector-quantize-pytorch's `einsum` then `argmax`).
    pub dot_product: bool,
    /// `[K]`, added to each code's cost (the rate term of an entropy-constrained search).
    pub penalty: Option<Tensor<1>>,
    /// `||e_c||^2` `[K]` where the path derived them with the codebook
    /// ([`LevelPath::codebook`]), else computed for the search.
    pub norms: Option<Tensor<1>>,
}

impl Pricing {
    /// Squared distances plus `penalty`.
    pub(crate) fn penalized(penalty: Option<Tensor<1>>) -> Self {
        Self {
            dot_product: false,
            penalty,
            norms: None,
        }
    }

    /// Squared distances, with the codes' squared norms `norms` `[K]` where they are known.
    pub(crate) fn with_norms(norms: Option<Tensor<1>>) -> Self {
        Self {
            dot_product: false,
            penalty: None,
            norms,
        }
    }

    /// The dot product alone.
    pub(crate) const DOT_PRODUCT: Self = Self {
        dot_product: true,
        penalty: None,
        norms: None,
    };
}

/// The sums a forward's levels leave behind.
#[derive(Debug, Clone)]
pub(crate) struct RunningSums {
    /// `sum_l q_l`, the chosen codes summed over the levels, level by level, `[N, D]`.
    pub quantized: Tensor<2>,
    /// `sum_l r_{l+1}`, the residuals each level left, summed level by level, `[N, D]`.
    pub residuals: Tensor<2>,
}

impl RunningSums {
    /// The sums after one more level, which chose `quantized` and left `residual` (the
    /// first level's are the sums).
    pub(crate) fn add(sums: Option<Self>, quantized: Tensor<2>, residual: Tensor<2>) -> Self {
        match sums {
            None => Self {
                quantized,
                residuals: residual,
            },
            Some(sums) => Self {
                quantized: sums.quantized.add(quantized),
                residuals: sums.residuals.add(residual),
            },
        }
    }
}

/// The residual rows of a call as a path holds them between levels, with the running sums.
pub(crate) trait Rows: Sized {
    /// Takes the input `x` `[N, D]` (no autodiff) as the first level's residual; with
    /// `work.output`, the running sums start at zero.
    fn start(x: Tensor<2>, work: Work) -> Self;

    /// The current residual `[N, D]` as a tensor (a copy on paths that hold it elsewhere).
    fn residual(&self) -> Tensor<2>;

    /// The running sums, if the rows were started with `work.output`.
    fn finish(self) -> Option<RunningSums>;

    /// Subtracts a level's codes `quantized` `[N, D]`, chosen by a search on other rows
    /// (a cosine level searches the normalized residual), from the residual, and adds them
    /// and the new residual to the running sums.
    fn subtract(&mut self, quantized: Tensor<2>);
}

/// A level's codebook as a path derived it from the EMA statistics.
pub(crate) struct Codebook {
    /// The codes, `[K, D]` (unit rows for a cosine codebook).
    pub vectors: Tensor<2>,
    /// The codes' squared norms `[K]` (before the normalization of a cosine codebook), where
    /// the path derived them in the same pass.
    pub norms: Option<Tensor<1>>,
}

/// One way to run a level's pass. The residual stack is generic over it, and the path is
/// picked once per call ([`Path`]).
pub(crate) trait LevelPath {
    /// The rows this path passes from level to level.
    type Rows: Rows;

    /// The codebooks that the EMA statistics of several levels give under `config`
    /// ([`EmaResidualVectorQuantizerConfig::codebook`]): level `l`'s from its `counts[l]`
    /// `[K_l]` and `sums[l]` `[K_l, D]`. The kernel path derives the codes and their squared
    /// norms of up to 4 levels in one launch.
    fn codebooks(
        &self,
        counts: Vec<Tensor<1>>,
        sums: Vec<Tensor<2>>,
        config: &EmaResidualVectorQuantizerConfig,
    ) -> Vec<Codebook> {
        counts
            .into_iter()
            .zip(sums)
            .map(|(counts, sums)| Codebook {
                vectors: config.codebook(counts, sums),
                norms: None,
            })
            .collect()
    }

    /// One level: the nearest code of every row in `codebook` `[K, D]` (the first of equal
    /// distances), what `work` asks for, and the rows replaced by their residuals.
    #[cfg(test)]
    fn level(&self, codebook: Tensor<2>, rows: &mut Self::Rows, work: Work) -> LevelPass {
        self.level_priced(codebook, Pricing::default(), rows, work)
    }

    /// Whether any value of a batch `x` `[N, D]` is NaN or infinite, `[1]`: a training step
    /// then leaves the state alone. The kernel path answers in two launches.
    fn non_finite(&self, x: Tensor<2>) -> Tensor<1, Bool> {
        x.is_finite().all().bool_not()
    }

    /// [`LevelPath::level`] with the costs `pricing` gives: the code minimizing
    /// `||r - e_c||^2 + penalty_c` (the rate term of an entropy-constrained search), or
    /// `-2 r.e_c` (cosine codebooks), in the same fused search.
    fn level_priced(
        &self,
        codebook: Tensor<2>,
        pricing: Pricing,
        rows: &mut Self::Rows,
        work: Work,
    ) -> LevelPass;

    /// [`LevelPath::level_priced`] of a training step (every output) whose only change to
    /// the state is `update`: the pass and the updated state. The kernel path makes the
    /// update in the launch that sums the codes' rows.
    fn level_updating(
        &self,
        codebook: Tensor<2>,
        pricing: Pricing,
        rows: &mut Self::Rows,
        update: EmaUpdate,
    ) -> UpdatedPass {
        update.apply(self.level_priced(codebook, pricing, rows, Work::TRAINING))
    }

    /// One level of a beam search. `candidates` `[N B, D]` holds `beam` partial residuals per
    /// vector (vector `i`'s at rows `i B..(i + 1) B`) and `base` `[N B]` their costs so far;
    /// gives, per vector, the `beam` least of `base_b + ||r_b - e_c||^2 + penalty_c` over
    /// every candidate `b` and code `c`, cheapest first, equal costs by the lower `b K + c`
    /// (a NaN or infinite cost only where nothing finite is left).
    fn expand(
        &self,
        codebook: Tensor<2>,
        pricing: Pricing,
        candidates: Tensor<2>,
        base: &[f32],
        beam: usize,
    ) -> Expansion;

    /// `sum_l codebooks[l][indices[l]]`, `[N, D]`, level by level, after checking every index
    /// against its codebook's size.
    fn decode(
        &self,
        codebooks: Vec<Tensor<2>>,
        indices: &[Tensor<1, Int>],
    ) -> Result<Tensor<2>, RvqError>;
}

/// How a call runs its levels: picked once per call by [`Path::choose`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Path {
    /// [`host`]: Burn's CPU backends, at most this many products per tile.
    #[cfg_attr(
        not(any(feature = "flex", feature = "ndarray", feature = "tch")),
        allow(dead_code)
    )]
    Host { max_elements: usize },
    /// `kernel`: CubeCL kernels on Burn's CubeCL backend.
    #[cfg(feature = "wgpu")]
    Kernel,
    /// [`tensor`]: Burn tensor operations, with these search settings.
    Tensor(tensor::Search),
}

impl Path {
    /// The path for a call on `device`, by its backend type (`Device::as_dispatch`): the host
    /// path on `flex`, `ndarray` and LibTorch's CPU device (with this crate's features
    /// `flex`, `ndarray` and `tch`), the kernel path on WGPU (feature `wgpu`), else the
    /// tensor path; always the tensor path when the configuration's `execution` asks for it.
    pub(crate) fn choose(device: &Device, config: &EmaResidualVectorQuantizerConfig) -> Self {
        let search = tensor::Search {
            max_elements: config.max_distance_elements,
            dense: config.dense_statistics,
        };
        if config.execution == Execution::TensorOps {
            return Self::Tensor(search);
        }
        #[cfg(any(
            feature = "flex",
            feature = "ndarray",
            feature = "tch",
            feature = "wgpu"
        ))]
        {
            use burn::backend::DispatchDevice;
            let plain = device.clone().without_autodiff();
            match plain.as_dispatch() {
                #[cfg(feature = "flex")]
                DispatchDevice::Flex(_) => return Self::host(config),
                #[cfg(feature = "ndarray")]
                DispatchDevice::NdArray(_) => return Self::host(config),
                // LibTorch's CPU device: its tensors are host memory as well. (Burn 0.22
                // deprecates its LibTorch backend but still offers it.)
                #[cfg(feature = "tch")]
                #[allow(deprecated)]
                DispatchDevice::LibTorch(burn::backend::LibTorchDevice::Cpu) => {
                    return Self::host(config);
                }
                #[cfg(feature = "wgpu")]
                DispatchDevice::Cube(_) => return Self::Kernel,
                // The backends other crates compiled in; none where these are all there is.
                #[allow(unreachable_patterns)]
                _ => {}
            }
        }
        #[cfg(not(any(
            feature = "flex",
            feature = "ndarray",
            feature = "tch",
            feature = "wgpu"
        )))]
        let _ = device;
        Self::Tensor(search)
    }

    #[cfg(any(feature = "flex", feature = "ndarray", feature = "tch"))]
    fn host(config: &EmaResidualVectorQuantizerConfig) -> Self {
        Self::Host {
            max_elements: config.max_distance_elements,
        }
    }
}

/// Runs `$body` with `$p` bound to the [`LevelPath`] that `$path` names: the one place where
/// the path picked at run time becomes a type.
macro_rules! with_path {
    ($path:expr, $p:ident => $body:expr) => {
        match $path {
            $crate::path::Path::Host { max_elements } => {
                let $p = &$crate::path::host::HostPath { max_elements };
                $body
            }
            $crate::path::Path::Tensor(search) => {
                let $p = &$crate::path::tensor::TensorPath(search);
                $body
            }
            #[cfg(feature = "wgpu")]
            $crate::path::Path::Kernel => {
                let $p = &$crate::path::kernel::KernelPath;
                $body
            }
        }
    };
}
pub(crate) use with_path;

/// Checks each level's `(min, max)` index against its codebook size.
pub(crate) fn check_index_range(
    bounds: impl Iterator<Item = (i64, i64)>,
    sizes: impl Iterator<Item = usize>,
) -> Result<(), RvqError> {
    for (level, ((min, max), num_embeddings)) in bounds.zip(sizes).enumerate() {
        if min < 0 || max >= num_embeddings as i64 {
            return Err(RvqError::IndexOutOfRange {
                level,
                min,
                max,
                num_embeddings,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The path follows the device's backend type, autodiff or not, and the configuration
    /// can force the tensor path.
    #[test]
    #[allow(deprecated)] // ndarray and LibTorch are deprecated in Burn 0.22 but still offered.
    fn the_path_follows_the_backend_type() {
        let search = tensor::Search {
            max_elements: 1000,
            dense: false,
        };
        let host = Path::Host { max_elements: 1000 };
        let choose = |device: &Device, execution| {
            let config = EmaResidualVectorQuantizerConfig::new(1, 4.into(), 2)
                .with_max_distance_elements(1000)
                .with_execution(execution);
            Path::choose(device, &config)
        };
        #[cfg(feature = "flex")]
        {
            assert_eq!(choose(&Device::flex(), Execution::Auto), host);
            assert_eq!(choose(&Device::flex().autodiff(), Execution::Auto), host);
            let forced = choose(&Device::flex(), Execution::TensorOps);
            assert_eq!(forced, Path::Tensor(search));
        }
        #[cfg(feature = "ndarray")]
        assert_eq!(choose(&Device::ndarray(), Execution::Auto), host);
        #[cfg(feature = "tch")]
        {
            assert_eq!(choose(&Device::libtorch(), Execution::Auto), host);
            assert_eq!(
                choose(&Device::libtorch().autodiff(), Execution::Auto),
                host
            );
            let forced = choose(&Device::libtorch(), Execution::TensorOps);
            assert_eq!(forced, Path::Tensor(search));
        }
        #[cfg(feature = "wgpu")]
        {
            let gpu = Device::wgpu(burn::tensor::DeviceKind::DefaultDevice);
            assert_eq!(choose(&gpu, Execution::Auto), Path::Kernel);
            assert_eq!(choose(&gpu, Execution::TensorOps), Path::Tensor(search));
        }
        let _ = (host, choose);
    }
}
