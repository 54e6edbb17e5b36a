//! The kernel path: a level's search and statistics, and `decode`, as CubeCL kernels (Burn's
//! kernel language) on Burn's CubeCL backend (WGPU today; the same code serves CUDA).
//!
//! - **Non-finite check** (`any_kernel`, twice): whether a training batch holds a NaN or an
//!   infinity (the step then leaves the state alone), a flag per cube of a strided pass, then
//!   one cube over the flags writing the answer as the device's bool: two launches where
//!   Burn's `is_finite().all()` takes eight.
//! - **Codebooks** (`codebook_kernel`): each level's codes from its EMA counts and sums by
//!   the configuration's rule (unit rows for cosine codebooks) and the codes' squared norms
//!   the search adds, up to 4 levels in one launch (`CODEBOOK_LEVELS`), before the first
//!   level runs, where Burn's tensor operations take five per level (the total count's
//!   reduction, the rule's two elementwise passes, the norms' square and reduction). A fixed
//!   number of levels per launch, because an op of a Burn backend extension takes a fixed
//!   number of tensors under fusion; stacking the levels' state with Burn's `cat` instead
//!   left Burn's fusion unable to fuse the operations after the levels.
//! - **Nearest code** (`nearest_kernel`): distances and argmin fused, the `[N, K]` matrix
//!   never written. A cube takes 64 rows; 64-code by 16-dimension tiles of the codebook and of
//!   the rows pass through shared memory (read from global memory in vectors of up to 4
//!   values along a row, stored as vectors of 4 rows or codes along a dimension); each of the
//!   256 units keeps a 4 x 4 block of products in registers, two vector loads for its 16
//!   multiply-adds of a dimension, and, per row, its least `||e||^2 - 2 r.e` and code; the 16 units of
//!   a row then agree on the least distance, the lowest code among equals (the first minimum,
//!   as on every path). Its epilogue, in the same launch, gathers each row's code and writes
//!   the next residual, the running sums of codes and residuals (the same f32 operations as
//!   the tensor path's, row by row) and the cube's sum of the residual's squares. The
//!   counting sort's one-cube launch below sums those into the level's squared error; a pass
//!   without counts sums them in a launch of its own (`total_kernel`). Where the rows fill
//!   few cubes for a GPU and the codes are many (`extension::search_splits`: the codec shape,
//!   not the others of the bench), the cubes also split the codes into runs of whole tiles,
//!   each writing its run's least distance and first code at it per row, and a second launch
//!   (`merge_kernel`) takes the first least over the splits and makes the epilogue: the same
//!   codes as the whole search, to the bit.
//! - **Per-code counts and sums**: a stable counting sort of the rows by code, then each code's
//!   rows summed in row order, in `O(N D + K D + N K / 256)` work: no atomics, deterministic,
//!   and the same floats as a sequential scatter-add (the host path's and Burn's CPU
//!   backends'). Four launches:
//!   1. `block_counts_kernel`: per block of 256 rows, each row's rank among the block's rows
//!      of its code (256 shared-memory compares per row), and the block's count of each code
//!      `[N / 256, K]`;
//!   2. `offsets_kernel` (one cube): each code's count, its first place in the sorted order,
//!      and each block's first place among the code's rows (prefix sums); and the level's
//!      squared error from the search's partial sums;
//!   3. `scatter_kernel`: every row's index at its place;
//!   4. `code_sums_kernel`: one cube per code, its units over the dimensions, adding the
//!      code's rows in that order. In a training step whose only change to the state is the
//!      EMA update (the default), it makes the update too: it writes `g m + (1 - g) S` and
//!      `g c + (1 - g) N` (the state as it was where the batch held a NaN), where Burn's
//!      operations took two more launches.
//!
//!   A pass that wants the counts alone (an evaluation forward) stops after the second.
//! - **Decode** (`decode_kernel`): every level's code gathered and summed per element, in
//!   level order, in one launch.
//!
//! Steps with restarts, a k-means init or the data-parallel replacement update the state by
//! Burn's tensor operations. The kernels run on tensors without autodiff: the codes and the
//! statistics carry no gradient.

use burn::backend::Dispatch;
use burn::backend::tensor::FloatTensor;
use burn::tensor::{Bool, Int, Tensor};

use self::extension::{CODEBOOK_LEVELS, RvqKernels};
use super::tensor::{self, TensorRows, check_indices};
use super::{
    Codebook, EmaUpdate, Expansion, LevelPass, LevelPath, Pricing, Rows, RunningSums, UpdatedPass,
    Work,
};
use crate::config::{CodebookRule, EmaResidualVectorQuantizerConfig};
use crate::error::RvqError;
use crate::util::int_tensor;

/// Largest `[vectors, B K]` cost block of a beam search level.
const BEAM_ELEMENTS: usize = 1 << 24;

/// The kernel path ([`LevelPath`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct KernelPath;

impl LevelPath for KernelPath {
    type Rows = TensorRows;

    fn non_finite(&self, x: Tensor<2>) -> Tensor<1, Bool> {
        let bool_dtype = x.device().settings().bool_dtype;
        let flag = <Dispatch as RvqKernels>::rvq_non_finite(x.into_dispatch(), bool_dtype);
        Tensor::from_dispatch(flag)
    }

    fn codebooks(
        &self,
        counts: Vec<Tensor<1>>,
        sums: Vec<Tensor<2>>,
        config: &EmaResidualVectorQuantizerConfig,
    ) -> Vec<Codebook> {
        let levels: Vec<(Tensor<1>, Tensor<2>)> = counts.into_iter().zip(sums).collect();
        levels
            .chunks(CODEBOOK_LEVELS)
            .flat_map(|chunk| {
                // The slots past the chunk's levels take its first level's state, unread.
                let state = |j: usize| chunk.get(j).unwrap_or(&chunk[0]).clone();
                let [(c0, s0), (c1, s1), (c2, s2), (c3, s3)] = std::array::from_fn(|j| {
                    let (counts, sums) = state(j);
                    (counts.into_dispatch(), sums.into_dispatch())
                });
                let (v0, n0, v1, n1, v2, n2, v3, n3) = <Dispatch as RvqKernels>::rvq_codebooks(
                    c0,
                    s0,
                    c1,
                    s1,
                    c2,
                    s2,
                    c3,
                    s3,
                    chunk.len(),
                    config.codebook_rule == CodebookRule::Laplace,
                    config.epsilon,
                    config.cosine_similarity,
                );
                [(v0, n0), (v1, n1), (v2, n2), (v3, n3)]
                    .into_iter()
                    .take(chunk.len())
                    .map(|(vectors, norms)| Codebook {
                        vectors: Tensor::from_dispatch(vectors),
                        norms: Some(Tensor::from_dispatch(norms)),
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn level_priced(
        &self,
        codebook: Tensor<2>,
        pricing: Pricing,
        rows: &mut TensorRows,
        work: Work,
    ) -> LevelPass {
        level(codebook, pricing, rows, work, None).pass
    }

    fn level_updating(
        &self,
        codebook: Tensor<2>,
        pricing: Pricing,
        rows: &mut TensorRows,
        update: EmaUpdate,
    ) -> UpdatedPass {
        let level = level(codebook, pricing, rows, Work::TRAINING, Some(update));
        let (counts, sums) = level.updated.expect("asked for the update");
        UpdatedPass {
            pass: level.pass,
            counts,
            sums,
        }
    }

    /// Beam searches run as the tensor path's operations.
    fn expand(
        &self,
        codebook: Tensor<2>,
        pricing: Pricing,
        candidates: Tensor<2>,
        base: &[f32],
        beam: usize,
    ) -> Expansion {
        tensor::expand(&codebook, pricing, candidates, base, beam, BEAM_ELEMENTS)
    }

    fn decode(
        &self,
        codebooks: Vec<Tensor<2>>,
        indices: &[Tensor<1, Int>],
    ) -> Result<Tensor<2>, RvqError> {
        let indices = Tensor::stack::<2>(indices.to_vec(), 0); // [M, N]
        check_indices(&codebooks, &indices)?;
        let device = codebooks[0].device();
        let int_dtype = device.settings().int_dtype;
        // Each level's first row in the stacked codebooks.
        let offsets: Vec<i64> = codebooks
            .iter()
            .scan(0i64, |first, codebook| {
                let offset = *first;
                *first += codebook.dims()[0] as i64;
                Some(offset)
            })
            .collect();
        let offsets = int_tensor(offsets, &device);
        let stacked = Tensor::cat(codebooks, 0); // [sum K, D]
        let out = <Dispatch as RvqKernels>::rvq_decode(
            stacked.into_dispatch(),
            offsets.cast(int_dtype).into_dispatch(),
            indices.cast(int_dtype).into_dispatch(),
        );
        Ok(Tensor::from_dispatch(out))
    }
}

/// A level's pass on the kernel path, and with `update`, the state it updated.
struct Level {
    pass: LevelPass,
    updated: Option<(Tensor<1>, Tensor<2>)>,
}

/// The search (one launch, two where its codes are split), then what `work` asks: the counting sort's launches for the
/// counts and sums (the level's squared error summed in its one-cube launch, and `update`
/// made in its last), or the squared error alone (one launch).
fn level(
    codebook: Tensor<2>,
    pricing: Pricing,
    rows: &mut TensorRows,
    work: Work,
    update: Option<EmaUpdate>,
) -> Level {
    let [k, _] = codebook.dims();
    let residual = rows.residual();
    let running = rows.keeps_sums() && work.output;
    let previous = rows.running().filter(|_| running);
    let searched = search(
        residual.clone(),
        codebook,
        pricing,
        previous,
        (work.output, running),
    );
    rows.advance(searched.next, searched.running);
    let (indices, partials) = (searched.indices, searched.partials);
    let total = work.output;
    let tallied = match (work.counts, work.sums) {
        (_, true) => statistics(residual, indices.clone(), partials, k, update, total),
        (true, false) => code_counts(residual, indices.clone(), partials, k, total),
        (false, false) => Tallied {
            counts: None,
            sums: None,
            updated: None,
            squared_error: total.then(|| squared_error(partials)),
        },
    };
    Level {
        pass: LevelPass {
            indices,
            counts: tallied.counts.filter(|_| work.counts),
            sums: tallied.sums,
            squared_error: tallied.squared_error,
        },
        updated: tallied.updated,
    }
}

/// Nearest code of every row of `rows` `[N, D]` in `codebook` `[K, D]`, `[N]`.
#[cfg(test)]
pub(crate) fn nearest(rows: Tensor<2>, codebook: Tensor<2>) -> Tensor<1, Int> {
    search(rows, codebook, Pricing::default(), None, (false, false)).indices
}

/// What a level's search kernel gives.
struct Searched {
    /// The nearest codes, `[N]`.
    indices: Tensor<1, Int>,
    /// The next residual, `[N, D]`.
    next: Tensor<2>,
    /// The running sums after the level, where kept.
    running: Option<RunningSums>,
    /// Per cube of the search, the sum of the next residual's squares `[C]` where asked
    /// (else an unwritten `[1]`).
    partials: Tensor<1>,
}

/// The nearest code of every row of `rows` `[N, D]` in `codebook` `[K, D]` by the costs
/// `pricing` gives (in the norms the kernel adds), the next residual, and as `(squared_error,
/// running)` ask: the squared error's per-cube partial sums, and the running sums after
/// `previous` (the level's terms alone where there is none yet); one launch, or two where
/// the codes are split.
fn search(
    rows: Tensor<2>,
    codebook: Tensor<2>,
    pricing: Pricing,
    previous: Option<&RunningSums>,
    asks: (bool, bool),
) -> Searched {
    let splits = extension::search_splits(rows.dims()[0], codebook.dims()[0]);
    search_in_splits(rows, codebook, pricing, previous, asks, splits)
}

/// [`search`] with its codes in `splits` parts (a second launch merges them, where more than
/// one): the same answer for any number.
fn search_in_splits(
    rows: Tensor<2>,
    codebook: Tensor<2>,
    pricing: Pricing,
    previous: Option<&RunningSums>,
    (squared_error, running): (bool, bool),
    splits: usize,
) -> Searched {
    let [k, _] = codebook.dims();
    let norms = tensor::code_norms(&codebook, pricing).reshape([k]); // [K]
    let int_dtype = rows.device().settings().int_dtype;
    // The kernel reads the previous sums only where there are some.
    let (quantized, residuals) = match previous {
        Some(sums) => (sums.quantized.clone(), sums.residuals.clone()),
        None => (rows.clone(), rows.clone()),
    };
    let (indices, next, quantized, residuals, partials) = <Dispatch as RvqKernels>::rvq_level(
        rows.into_dispatch(),
        codebook.into_dispatch(),
        norms.into_dispatch(),
        quantized.into_dispatch(),
        residuals.into_dispatch(),
        int_dtype,
        squared_error,
        running,
        previous.is_none(),
        splits,
    );
    Searched {
        indices: Tensor::from_dispatch(indices),
        next: Tensor::from_dispatch(next),
        running: running.then(|| RunningSums {
            quantized: Tensor::from_dispatch(quantized),
            residuals: Tensor::from_dispatch(residuals),
        }),
        partials: Tensor::from_dispatch(partials),
    }
}

/// What the launches after a level's search give: each is there where it was asked.
struct Tallied {
    /// Rows per code, `[K]`.
    counts: Option<Tensor<1>>,
    /// The batch's per-code sums, `[K, D]` (absent where they went into an update).
    sums: Option<Tensor<2>>,
    /// The updated state's counts `[K]` and sums `[K, D]`.
    updated: Option<(Tensor<1>, Tensor<2>)>,
    /// The level's squared error, `[1]`.
    squared_error: Option<Tensor<1>>,
}

/// The sum of the search's per-cube `partials`, `[1]`.
fn squared_error(partials: Tensor<1>) -> Tensor<1> {
    Tensor::from_dispatch(<Dispatch as RvqKernels>::rvq_total(
        partials.into_dispatch(),
    ))
}

/// Per-code counts `[K]` and sums `[K, D]` of `rows` `[N, D]` by `indices` `[N]`, with
/// `total`, the sum of `partials` (the level's squared error); with `update`, the sums go
/// into the updated state instead.
fn statistics(
    rows: Tensor<2>,
    indices: Tensor<1, Int>,
    partials: Tensor<1>,
    num_embeddings: usize,
    update: Option<EmaUpdate>,
    total: bool,
) -> Tallied {
    let total_of = |t: FloatTensor<Dispatch>| total.then(|| Tensor::from_dispatch(t));
    match update {
        None => {
            let (counts, sums, t) = <Dispatch as RvqKernels>::rvq_statistics(
                rows.into_dispatch(),
                indices.into_dispatch(),
                partials.into_dispatch(),
                num_embeddings,
                total,
            );
            Tallied {
                counts: Some(Tensor::from_dispatch(counts)),
                sums: Some(Tensor::from_dispatch(sums)),
                updated: None,
                squared_error: total_of(t),
            }
        }
        Some(update) => {
            let (counts, state_counts, state_sums, t) =
                <Dispatch as RvqKernels>::rvq_ema_statistics(
                    rows.into_dispatch(),
                    indices.into_dispatch(),
                    partials.into_dispatch(),
                    update.counts.into_dispatch(),
                    update.sums.into_dispatch(),
                    update.skip.into_dispatch(),
                    update.decay,
                    total,
                );
            Tallied {
                counts: Some(Tensor::from_dispatch(counts)),
                sums: None,
                updated: Some((
                    Tensor::from_dispatch(state_counts),
                    Tensor::from_dispatch(state_sums),
                )),
                squared_error: total_of(t),
            }
        }
    }
}

/// How many of the rows `rows` `[N, D]` took each of the `num_embeddings` codes by `indices`
/// `[N]`, `[K]`; with `total`, the sum of `partials` (the level's squared error).
fn code_counts(
    rows: Tensor<2>,
    indices: Tensor<1, Int>,
    partials: Tensor<1>,
    num_embeddings: usize,
    total: bool,
) -> Tallied {
    let (counts, t) = <Dispatch as RvqKernels>::rvq_code_counts(
        rows.into_dispatch(),
        indices.into_dispatch(),
        partials.into_dispatch(),
        num_embeddings,
        total,
    );
    Tallied {
        counts: Some(Tensor::from_dispatch(counts)),
        sums: None,
        updated: None,
        squared_error: total.then(|| Tensor::from_dispatch(t)),
    }
}

/// The ops as a Burn backend extension, and the shapes of their launches.
mod extension;
/// The kernels but the search's, in CubeCL (whose `Tensor` and `Int` are not Burn's).
mod kernels;
/// The ops' launches on Burn's CubeCL backend.
mod launches;
/// The search's kernels.
mod search;
#[cfg(test)]
mod tests;
