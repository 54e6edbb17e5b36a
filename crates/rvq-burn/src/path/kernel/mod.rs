//! The kernel path: a level's search and statistics, and `decode`, as CubeCL kernels (Burn's
//! kernel language) on Burn's CubeCL backend (WGPU today; the same code serves CUDA).
//!
//! - **Non-finite check** (`any_kernel`, twice): whether a training batch holds a NaN or an
//!   infinity (the step then leaves the state alone), a flag per cube of a strided pass, then
//!   one cube over the flags: two launches where Burn's `is_finite().all()` takes eight.
//! - **Codebook** (`codebook_kernel`): a level's codes from its EMA counts and sums by the
//!   configuration's rule (unit rows for cosine codebooks) and the codes' squared norms the
//!   search adds, in one launch where Burn's tensor operations take five (the total count's
//!   reduction, the rule's two elementwise passes, the norms' square and reduction).
//! - **Nearest code** (`nearest_kernel`): distances and argmin fused, the `[N, K]` matrix
//!   never written. A cube takes 64 rows; 64-code by 16-dimension tiles of the codebook and of
//!   the rows pass through shared memory; each of the 256 units keeps a 4 x 4 block of
//!   products in registers and, per row, its least `||e||^2 - 2 r.e` and code; the 16 units of
//!   a row then agree on the least distance, the lowest code among equals (the first minimum,
//!   as on every path). Its epilogue, in the same launch, gathers each row's code and writes
//!   the next residual, the running sums of codes and residuals (the same f32 operations as
//!   the tensor path's, row by row) and the cube's sum of the residual's squares; one more
//!   launch (`total_kernel`) sums those into the level's squared error.
//! - **Per-code counts and sums**: a stable counting sort of the rows by code, then each code's
//!   rows summed in row order, in `O(N D + K D + N K / 256)` work: no atomics, deterministic,
//!   and the same floats as a sequential scatter-add (the host path's and Burn's CPU
//!   backends'). Four launches:
//!   1. `block_counts_kernel`: per block of 256 rows, each row's rank among the block's rows
//!      of its code (256 shared-memory compares per row), and the block's count of each code
//!      `[N / 256, K]`;
//!   2. `offsets_kernel` (one cube): each code's count, its first place in the sorted order,
//!      and each block's first place among the code's rows (prefix sums);
//!   3. `scatter_kernel`: every row's index at its place;
//!   4. `code_sums_kernel`: one cube per code, its units over the dimensions, adding the
//!      code's rows in that order.
//!
//!   A pass that wants the counts alone (an evaluation forward) stops after the second.
//! - **Decode** (`decode_kernel`): every level's code gathered and summed per element, in
//!   level order, in one launch.
//!
//! The EMA update stays Burn tensor operations (elementwise, which Burn's fusion merges). The
//! kernels run on tensors without autodiff: the codes and the statistics carry no gradient.

use burn::backend::fusion::custom::TensorSpec;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, Dispatch, TensorMetadata, backend_extension};
use burn::tensor::{Bool, DType, Int, IntDType, Shape, Tensor};
use burn_backend::cubecl::dtype_to_storage_type;
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use cubecl::prelude::{CubeCount, CubeDim, InputScalar};

use super::tensor::{self, TensorRows, check_indices};
use super::{Codebook, Expansion, LevelPass, LevelPath, Pricing, Rows, RunningSums, Work};
use crate::config::{CodebookRule, EmaResidualVectorQuantizerConfig};
use crate::error::RvqError;
use crate::util::int_tensor;

/// Units per cube of the non-finite check.
const CHECK_UNITS: u32 = 256;
/// Most cubes of the non-finite check (each a flag the second launch reads).
const CHECK_CUBES: usize = 1024;
/// Codes per cube of the codebook's derivation at a time (64 units each).
const CODEBOOK_CODES: usize = 4;
/// Units per cube of the codebook's derivation.
const CODEBOOK_UNITS: u32 = 256;
/// Most cubes of the codebook's derivation: each sums all `K` counts first, so past this
/// many a cube takes several groups of codes instead.
const CODEBOOK_CUBES: usize = 1024;
/// Rows per cube of the search.
const SEARCH_ROWS: usize = 64;
/// Units per cube of the search (16 x 16, each 4 rows x 4 codes).
const SEARCH_UNITS: u32 = 256;
/// Rows per block of the statistics' counting sort, and units per cube of its kernels but the
/// sums'.
const SORT_BLOCK: usize = 256;
/// Units per cube of the per-code sums: each takes every 64th dimension.
const SUMS_UNITS: usize = 64;
/// Largest `[vectors, B K]` cost block of a beam search level.
const BEAM_ELEMENTS: usize = 1 << 24;
/// Units per cube of the decode.
const DECODE_UNITS: u32 = 256;

/// The kernel path ([`LevelPath`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct KernelPath;

impl LevelPath for KernelPath {
    type Rows = TensorRows;

    fn non_finite(&self, x: Tensor<2>) -> Tensor<1, Bool> {
        let flag = <Dispatch as RvqKernels>::rvq_non_finite(x.into_dispatch());
        Tensor::<1>::from_dispatch(flag).greater_elem(0.0)
    }

    fn codebook(
        &self,
        counts: Tensor<1>,
        sums: Tensor<2>,
        config: &EmaResidualVectorQuantizerConfig,
    ) -> Codebook {
        let (vectors, norms) = <Dispatch as RvqKernels>::rvq_codebook(
            counts.into_dispatch(),
            sums.into_dispatch(),
            config.codebook_rule == CodebookRule::Laplace,
            config.epsilon,
            config.cosine_similarity,
        );
        Codebook {
            vectors: Tensor::from_dispatch(vectors),
            norms: Some(Tensor::from_dispatch(norms)),
        }
    }

    fn level_priced(
        &self,
        codebook: Tensor<2>,
        pricing: Pricing,
        rows: &mut TensorRows,
        work: Work,
    ) -> LevelPass {
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
        let indices = searched.indices;
        let (counts, sums) = match (work.counts, work.sums) {
            (counts, true) => {
                let (c, sums) = statistics(residual, indices.clone(), k);
                (counts.then_some(c), Some(sums))
            }
            (true, false) => (Some(code_counts(residual, indices.clone(), k)), None),
            (false, false) => (None, None),
        };
        rows.advance(searched.next, searched.running);
        LevelPass {
            indices,
            counts,
            sums,
            squared_error: searched.squared_error,
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
        check_indices(&codebooks, indices)?;
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
        let indices = Tensor::stack::<2>(indices.to_vec(), 0); // [M, N]
        let out = <Dispatch as RvqKernels>::rvq_decode(
            stacked.into_dispatch(),
            offsets.cast(int_dtype).into_dispatch(),
            indices.cast(int_dtype).into_dispatch(),
        );
        Ok(Tensor::from_dispatch(out))
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
    /// The sum of the next residual's squares `[1]`, where asked.
    squared_error: Option<Tensor<1>>,
}

/// The nearest code of every row of `rows` `[N, D]` in `codebook` `[K, D]` by the costs
/// `pricing` gives (in the norms the kernel adds), the next residual, and as `(squared_error,
/// running)` ask: the squared error, and the running sums after `previous` (the level's
/// terms alone where there is none yet); one launch, two with the squared error.
fn search(
    rows: Tensor<2>,
    codebook: Tensor<2>,
    pricing: Pricing,
    previous: Option<&RunningSums>,
    (squared_error, running): (bool, bool),
) -> Searched {
    let [k, _] = codebook.dims();
    let norms = tensor::code_norms(&codebook, pricing).reshape([k]); // [K]
    let int_dtype = rows.device().settings().int_dtype;
    // The kernel reads the previous sums only where there are some.
    let (quantized, residuals) = match previous {
        Some(sums) => (sums.quantized.clone(), sums.residuals.clone()),
        None => (rows.clone(), rows.clone()),
    };
    let (indices, next, quantized, residuals, total) = <Dispatch as RvqKernels>::rvq_level(
        rows.into_dispatch(),
        codebook.into_dispatch(),
        norms.into_dispatch(),
        quantized.into_dispatch(),
        residuals.into_dispatch(),
        int_dtype,
        squared_error,
        running,
        previous.is_none(),
    );
    Searched {
        indices: Tensor::from_dispatch(indices),
        next: Tensor::from_dispatch(next),
        running: running.then(|| RunningSums {
            quantized: Tensor::from_dispatch(quantized),
            residuals: Tensor::from_dispatch(residuals),
        }),
        squared_error: squared_error.then(|| Tensor::from_dispatch(total)),
    }
}

/// Per-code counts `[K]` and sums `[K, D]` of `rows` `[N, D]` by `indices` `[N]`.
pub(crate) fn statistics(
    rows: Tensor<2>,
    indices: Tensor<1, Int>,
    num_embeddings: usize,
) -> (Tensor<1>, Tensor<2>) {
    let (counts, sums) = <Dispatch as RvqKernels>::rvq_statistics(
        rows.into_dispatch(),
        indices.into_dispatch(),
        num_embeddings,
    );
    (Tensor::from_dispatch(counts), Tensor::from_dispatch(sums))
}

/// How many of the rows `rows` `[N, D]` took each of the `num_embeddings` codes by `indices`
/// `[N]`, `[K]`.
pub(crate) fn code_counts(
    rows: Tensor<2>,
    indices: Tensor<1, Int>,
    num_embeddings: usize,
) -> Tensor<1> {
    let counts = <Dispatch as RvqKernels>::rvq_code_counts(
        rows.into_dispatch(),
        indices.into_dispatch(),
        num_embeddings,
    );
    Tensor::from_dispatch(counts)
}

/// The quantizer's kernels as a Burn backend extension, for the CubeCL backend with and
/// without fusion.
#[backend_extension(Cube, Fusion)]
pub(crate) trait RvqKernels: Backend {
    /// A level's codebook from its EMA `counts` `[K]` and `sums` `[K, D]` by the Laplace rule
    /// (`laplace`) or the clamp rule, its rows over their lengths with `unit_rows`, and the
    /// codes' squared norms (before that normalization): `([K, D], [K])`.
    #[fusion(meta = |counts, sums, _laplace, _epsilon, _unit_rows| {
        (
            TensorSpec::new(sums.shape.clone(), sums.dtype),
            TensorSpec::new(counts.shape.clone(), counts.dtype),
        )
    })]
    fn rvq_codebook(
        counts: FloatTensor<Self>,
        sums: FloatTensor<Self>,
        laplace: bool,
        epsilon: f64,
        unit_rows: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// 1 where a value of `values` is NaN or infinite, else 0, `[1]`.
    #[fusion(meta = |values| TensorSpec::new(Shape::new([1]), values.dtype))]
    fn rvq_non_finite(values: FloatTensor<Self>) -> FloatTensor<Self>;

    /// A level's search and what follows it: the nearest code of each row of `rows` `[N, D]`
    /// among `codebook` `[K, D]` with squared norms `norms` `[K]` (integers of `int_dtype`,
    /// `[N]`), the next residual `rows - codebook[code]` `[N, D]`; with `running`, the running
    /// sums `(quantized + codebook[code], residuals + next)` `[N, D]` (the terms alone at the
    /// `first` level, whose `quantized` and `residuals` are not read), else two unwritten
    /// `[1, 1]`; with `squared_error`, the sum of `next^2` `[1]`, else an unwritten `[1]`.
    #[fusion(meta = |rows, _codebook, _norms, _quantized, _residuals, int_dtype, squared_error, running, _first| {
        let sums = match *running {
            true => rows.shape.clone(),
            false => Shape::new([1, 1]),
        };
        let _ = squared_error;
        (
            TensorSpec::new(Shape::new([rows.shape[0]]), DType::from(*int_dtype)),
            TensorSpec::new(rows.shape.clone(), rows.dtype),
            TensorSpec::new(sums.clone(), rows.dtype),
            TensorSpec::new(sums, rows.dtype),
            TensorSpec::new(Shape::new([1]), rows.dtype),
        )
    })]
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn rvq_level(
        rows: FloatTensor<Self>,
        codebook: FloatTensor<Self>,
        norms: FloatTensor<Self>,
        quantized: FloatTensor<Self>,
        residuals: FloatTensor<Self>,
        int_dtype: IntDType,
        squared_error: bool,
        running: bool,
        first: bool,
    ) -> (
        IntTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    );

    /// How many rows of `rows` `[N, D]` took each of the `num_embeddings` codes by `indices`
    /// `[N]`, and their sum: `([K], [K, D])`.
    #[fusion(meta = |rows, _indices, num_embeddings| {
        (
            TensorSpec::new(Shape::new([*num_embeddings]), rows.dtype),
            TensorSpec::new(Shape::new([*num_embeddings, rows.shape[1]]), rows.dtype),
        )
    })]
    fn rvq_statistics(
        rows: FloatTensor<Self>,
        indices: IntTensor<Self>,
        num_embeddings: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// How many rows of `rows` `[N, D]` took each of the `num_embeddings` codes by `indices`
    /// `[N]`, `[K]` (the rows give the float type; their values are not read).
    #[fusion(meta = |rows, _indices, num_embeddings| {
        TensorSpec::new(Shape::new([*num_embeddings]), rows.dtype)
    })]
    fn rvq_code_counts(
        rows: FloatTensor<Self>,
        indices: IntTensor<Self>,
        num_embeddings: usize,
    ) -> FloatTensor<Self>;

    /// `sum_l codebooks[offsets[l] + indices[l, i]]` for every `i`: `codebooks` `[sum K, D]`
    /// (every level's codebook, stacked), `offsets` `[M]`, `indices` `[M, N]`; `[N, D]`.
    #[fusion(meta = |codebooks, _offsets, indices| {
        TensorSpec::new(
            Shape::new([indices.shape[1], codebooks.shape[1]]),
            codebooks.dtype,
        )
    })]
    fn rvq_decode(
        codebooks: FloatTensor<Self>,
        offsets: IntTensor<Self>,
        indices: IntTensor<Self>,
    ) -> FloatTensor<Self>;
}

/// A grid of `cubes` cubes within the 65,535 a dimension may hold (kernels read the linear
/// `CUBE_POS`).
fn cube_count(cubes: usize) -> CubeCount {
    let x = cubes.clamp(1, 65_535);
    CubeCount::Static(x as u32, cubes.div_ceil(x) as u32, 1)
}

impl RvqKernels for CubeBackend {
    fn rvq_non_finite(values: FloatTensor<Self>) -> FloatTensor<Self> {
        let values = into_contiguous(values);
        let (client, float_dtype) = (values.client.clone(), values.dtype);
        let cubes = values
            .shape()
            .num_elements()
            .div_ceil(CHECK_UNITS as usize)
            .clamp(1, CHECK_CUBES);
        let empty = |len: usize| {
            empty_device_dtype(
                client.clone(),
                values.device.clone(),
                Shape::new([len]),
                float_dtype,
            )
        };
        let (flags, flag) = (empty(cubes), empty(1));
        // A flag per cube of a strided pass over the values, then one cube over the flags.
        for (input, output, cubes, non_finite) in [
            (values, &flags, cubes, true),
            (flags.clone(), &flag, 1, false),
        ] {
            kernels::any_kernel::launch(
                &client,
                cube_count(cubes),
                CubeDim::new_1d(CHECK_UNITS),
                input.into_tensor_arg(),
                output.clone().into_tensor_arg(),
                non_finite,
                dtype_to_storage_type(float_dtype),
            );
        }
        flag
    }

    fn rvq_codebook(
        counts: FloatTensor<Self>,
        sums: FloatTensor<Self>,
        laplace: bool,
        epsilon: f64,
        unit_rows: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (counts, sums) = (into_contiguous(counts), into_contiguous(sums));
        let [k, d] = [sums.shape()[0], sums.shape()[1]];
        let (client, float_dtype) = (sums.client.clone(), sums.dtype);
        debug_assert_eq!(counts.dtype, float_dtype);
        let empty = |shape: Shape| {
            empty_device_dtype(client.clone(), sums.device.clone(), shape, float_dtype)
        };
        let (codebook, norms) = (empty(Shape::new([k, d])), empty(Shape::new([k])));
        let scalar = |value: f64| InputScalar::new(value, dtype_to_storage_type(float_dtype));
        kernels::codebook_kernel::launch(
            &client,
            cube_count(k.div_ceil(CODEBOOK_CODES).min(CODEBOOK_CUBES)),
            CubeDim::new_1d(CODEBOOK_UNITS),
            counts.into_tensor_arg(),
            sums.into_tensor_arg(),
            codebook.clone().into_tensor_arg(),
            norms.clone().into_tensor_arg(),
            scalar(epsilon),
            scalar(k as f64 * epsilon),
            laplace,
            unit_rows,
            dtype_to_storage_type(float_dtype),
        );
        (codebook, norms)
    }

    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn rvq_level(
        rows: FloatTensor<Self>,
        codebook: FloatTensor<Self>,
        norms: FloatTensor<Self>,
        quantized: FloatTensor<Self>,
        residuals: FloatTensor<Self>,
        int_dtype: IntDType,
        squared_error: bool,
        running: bool,
        first: bool,
    ) -> (
        IntTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        let [rows, codebook, norms, quantized, residuals] =
            [rows, codebook, norms, quantized, residuals].map(into_contiguous);
        let [n, d] = [rows.shape()[0], rows.shape()[1]];
        let (client, float_dtype) = (rows.client.clone(), rows.dtype);
        debug_assert_eq!((codebook.dtype, norms.dtype), (float_dtype, float_dtype));
        let int_dtype = DType::from(int_dtype);
        let cubes = n.div_ceil(SEARCH_ROWS);
        let empty = |shape: Shape, dtype: DType| {
            empty_device_dtype(client.clone(), rows.device.clone(), shape, dtype)
        };
        let indices = empty(Shape::new([n]), int_dtype);
        let next = empty(Shape::new([n, d]), float_dtype);
        let sums = match running {
            true => Shape::new([n, d]),
            false => Shape::new([1, 1]),
        };
        let quantized_out = empty(sums.clone(), float_dtype);
        let residuals_out = empty(sums, float_dtype);
        let partials = empty(
            Shape::new([if squared_error { cubes } else { 1 }]),
            float_dtype,
        );
        let total = empty(Shape::new([1]), float_dtype);
        // SAFETY: the kernel guards every global access by the tensors' shapes (the epilogue's
        // by the cube's rows, which every `[N, D]` tensor holds), its shared indices stay
        // within the tiles (its docs), and the tensors are contiguous.
        unsafe {
            kernels::nearest_kernel::launch_unchecked(
                &client,
                cube_count(cubes),
                CubeDim::new_1d(SEARCH_UNITS),
                rows.into_tensor_arg(),
                codebook.into_tensor_arg(),
                norms.into_tensor_arg(),
                indices.clone().into_tensor_arg(),
                next.clone().into_tensor_arg(),
                quantized.into_tensor_arg(),
                residuals.into_tensor_arg(),
                quantized_out.clone().into_tensor_arg(),
                residuals_out.clone().into_tensor_arg(),
                partials.clone().into_tensor_arg(),
                squared_error,
                running,
                first,
                [
                    dtype_to_storage_type(float_dtype),
                    dtype_to_storage_type(int_dtype),
                ],
            );
        }
        if squared_error {
            kernels::total_kernel::launch(
                &client,
                CubeCount::Static(1, 1, 1),
                CubeDim::new_1d(CHECK_UNITS),
                partials.into_tensor_arg(),
                total.clone().into_tensor_arg(),
                dtype_to_storage_type(float_dtype),
            );
        }
        (indices, next, quantized_out, residuals_out, total)
    }

    fn rvq_statistics(
        rows: FloatTensor<Self>,
        indices: IntTensor<Self>,
        num_embeddings: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (rows, indices) = (into_contiguous(rows), into_contiguous(indices));
        let [n, d] = [rows.shape()[0], rows.shape()[1]];
        let float_dtype = rows.dtype;
        let sort = CountingSort::count(indices, num_embeddings, float_dtype);
        let (client, int_dtype) = (sort.indices.client.clone(), sort.indices.dtype);
        let empty = |shape: Shape, dtype: DType| {
            empty_device_dtype(client.clone(), rows.device.clone(), shape, dtype)
        };
        let order = empty(Shape::new([n]), int_dtype);
        let sums = empty(Shape::new([num_embeddings, d]), float_dtype);
        kernels::scatter_kernel::launch(
            &client,
            cube_count(n.div_ceil(SORT_BLOCK)),
            CubeDim::new_1d(SORT_BLOCK as u32),
            sort.indices.into_tensor_arg(),
            sort.ranks.into_tensor_arg(),
            sort.block_starts.into_tensor_arg(),
            sort.starts.clone().into_tensor_arg(),
            order.clone().into_tensor_arg(),
            dtype_to_storage_type(int_dtype),
        );
        kernels::code_sums_kernel::launch(
            &client,
            cube_count(num_embeddings),
            CubeDim::new_1d(SUMS_UNITS as u32),
            rows.into_tensor_arg(),
            order.into_tensor_arg(),
            sort.starts.into_tensor_arg(),
            sums.clone().into_tensor_arg(),
            d.div_ceil(SUMS_UNITS).max(1),
            [
                dtype_to_storage_type(float_dtype),
                dtype_to_storage_type(int_dtype),
            ],
        );
        (sort.counts, sums)
    }

    fn rvq_code_counts(
        rows: FloatTensor<Self>,
        indices: IntTensor<Self>,
        num_embeddings: usize,
    ) -> FloatTensor<Self> {
        CountingSort::count(into_contiguous(indices), num_embeddings, rows.dtype).counts
    }

    fn rvq_decode(
        codebooks: FloatTensor<Self>,
        offsets: IntTensor<Self>,
        indices: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        let (codebooks, offsets, indices) = (
            into_contiguous(codebooks),
            into_contiguous(offsets),
            into_contiguous(indices),
        );
        let (n, d) = (indices.shape()[1], codebooks.shape()[1]);
        let (client, float_dtype, int_dtype) =
            (codebooks.client.clone(), codebooks.dtype, indices.dtype);
        let out = empty_device_dtype(
            client.clone(),
            codebooks.device.clone(),
            Shape::new([n, d]),
            float_dtype,
        );
        kernels::decode_kernel::launch(
            &client,
            cube_count((n * d).div_ceil(DECODE_UNITS as usize)),
            CubeDim::new_1d(DECODE_UNITS),
            codebooks.into_tensor_arg(),
            offsets.into_tensor_arg(),
            indices.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            [
                dtype_to_storage_type(float_dtype),
                dtype_to_storage_type(int_dtype),
            ],
        );
        out
    }
}

/// The first two steps of the statistics' counting sort (`block_counts_kernel`,
/// `offsets_kernel`): the counts, and where each row goes in the rows sorted by code.
struct CountingSort {
    /// The codes, `[N]`.
    indices: IntTensor<CubeBackend>,
    /// Each row's rank among its block's rows of the same code, `[N]`.
    ranks: IntTensor<CubeBackend>,
    /// Each block's first place among its code's rows, `[N / 256, K]`.
    block_starts: IntTensor<CubeBackend>,
    /// Each code's first place in the sorted order, then `N`, `[K + 1]`.
    starts: IntTensor<CubeBackend>,
    /// Rows per code, `[K]`.
    counts: FloatTensor<CubeBackend>,
}

impl CountingSort {
    fn count(indices: IntTensor<CubeBackend>, num_embeddings: usize, float_dtype: DType) -> Self {
        let n = indices.shape()[0];
        let blocks = n.div_ceil(SORT_BLOCK);
        let (client, int_dtype) = (indices.client.clone(), indices.dtype);
        let empty = |shape: Shape, dtype: DType| {
            empty_device_dtype(client.clone(), indices.device.clone(), shape, dtype)
        };
        let ranks = empty(Shape::new([n]), int_dtype);
        let block_starts = empty(Shape::new([blocks, num_embeddings]), int_dtype);
        let starts = empty(Shape::new([num_embeddings + 1]), int_dtype);
        let counts = empty(Shape::new([num_embeddings]), float_dtype);
        kernels::block_counts_kernel::launch(
            &client,
            cube_count(blocks),
            CubeDim::new_1d(SORT_BLOCK as u32),
            indices.clone().into_tensor_arg(),
            ranks.clone().into_tensor_arg(),
            block_starts.clone().into_tensor_arg(),
            dtype_to_storage_type(int_dtype),
        );
        kernels::offsets_kernel::launch(
            &client,
            CubeCount::Static(1, 1, 1),
            CubeDim::new_1d(SORT_BLOCK as u32),
            block_starts.clone().into_tensor_arg(),
            starts.clone().into_tensor_arg(),
            counts.clone().into_tensor_arg(),
            [
                dtype_to_storage_type(float_dtype),
                dtype_to_storage_type(int_dtype),
            ],
        );
        Self {
            indices,
            ranks,
            block_starts,
            starts,
            counts,
        }
    }
}

/// The kernels, in CubeCL (whose `Tensor` and `Int` are not Burn's).
mod kernels;

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, TensorData};

    use super::*;
    use crate::path::tensor::{Search, TensorPath, nearest_indices, per_code_sums};
    use crate::util::{SplitMix64, host_floats, host_ints};

    fn device() -> Option<Device> {
        if std::env::var_os("RVQ_SKIP_WGPU").is_some() {
            eprintln!("RVQ_SKIP_WGPU set: kernel path test SKIPPED");
            return None;
        }
        Some(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice))
    }

    fn tensor(values: &[f32], shape: [usize; 2], device: &Device) -> Tensor<2> {
        Tensor::from_data(TensorData::new(values.to_vec(), shape), device)
    }

    fn host_bools(tensor: Tensor<1, Bool>) -> Vec<bool> {
        tensor.into_data().iter::<bool>().collect()
    }

    /// The kernel path equals the tensor path on WGPU (Mesa's lavapipe in CI): the same codes
    /// but where two codes lie at distances float rounding orders differently, the same
    /// counts, sums within 1e-5; over shapes with K below, at and past the 64-code tile, D
    /// below, at and past the 16-wide depth tile and the 64 dimensions a statistics unit
    /// covers, N = 1, N past one cube's 64 rows and past several 256-row blocks of the
    /// counting sort (with one code taking every row, and K past N); the statistics bit for
    /// bit the same on a second run, and the counts alone equal to the counts with the sums;
    /// and a decode of three levels equal to the tensor path's; exact ties resolved to the
    /// first code.
    #[test]
    fn kernel_path_equals_tensor_path() {
        let Some(device) = device() else { return };
        let mut hash = SplitMix64::new(17);
        let mut uniform = move || (hash.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        let tensor_path = TensorPath(Search {
            max_elements: 1 << 24,
            dense: false,
        });
        for (n, d, k) in [
            (1, 3, 1),
            (37, 5, 7),
            (64, 16, 64),
            (65, 17, 65),
            (300, 70, 130),
            (129, 1, 5),
            (200, 64, 300),
            (1000, 9, 3),
            (777, 4, 1),
            (513, 130, 600),
        ] {
            let what = format!("N = {n}, D = {d}, K = {k}");
            let x: Vec<f32> = (0..n * d).map(|_| uniform()).collect();
            let codes: Vec<f32> = (0..k * d).map(|_| uniform()).collect();
            let (rows, codebook) = (tensor(&x, [n, d], &device), tensor(&codes, [k, d], &device));
            let mut kernel_rows = TensorRows::start(rows.clone(), Work::TRAINING);
            let got = KernelPath.level(codebook.clone(), &mut kernel_rows, Work::TRAINING);
            let got_codes = host_ints(got.indices.clone());
            let want_codes = host_ints(nearest_indices(&codebook, rows.clone(), 1 << 24));
            let distance = |row: usize, code: i64| -> f64 {
                (0..d)
                    .map(|j| (x[row * d + j] as f64 - codes[code as usize * d + j] as f64).powi(2))
                    .sum()
            };
            for (row, (g, w)) in got_codes.iter().zip(&want_codes).enumerate() {
                assert!((0..k as i64).contains(g), "{what}: code {g} out of range");
                let (dg, dw) = (distance(row, *g), distance(row, *w));
                assert!(
                    g == w || (dg - dw).abs() <= 1e-5 * dw.max(1.0),
                    "{what}, row {row}: kernel code {g} at {dg}, tensor code {w} at {dw}"
                );
            }
            // The statistics of the kernel's codes, against the tensor operations.
            let mut want_rows = TensorRows::start(rows.clone(), Work::TRAINING);
            let counts = host_floats(got.counts.unwrap());
            let mut expected = vec![0.0f32; k];
            for &code in &got_codes {
                expected[code as usize] += 1.0;
            }
            assert_eq!(counts, expected, "{what}: counts");
            let sums = host_floats(got.sums.unwrap());
            let want_sums =
                host_floats(per_code_sums(&got.indices, rows.clone(), k, tensor_path.0));
            for (i, (a, b)) in sums.iter().zip(&want_sums).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                    "{what}: sums[{i}] {a} vs {b}"
                );
            }
            // Deterministic: the same floats again; and the counts alone.
            let (again_counts, again_sums) = statistics(rows.clone(), got.indices.clone(), k);
            assert_eq!(
                host_floats(again_counts),
                counts,
                "{what}: counts, second run"
            );
            assert_eq!(host_floats(again_sums), sums, "{what}: sums, second run");
            let alone = code_counts(rows.clone(), got.indices.clone(), k);
            assert_eq!(host_floats(alone), counts, "{what}: counts alone");
            // The rest of the level is tensor operations on both paths.
            let want = tensor_path.level(codebook.clone(), &mut want_rows, Work::TRAINING);
            if got_codes == want_codes {
                let (a, b) = (
                    host_floats(got.squared_error.unwrap()),
                    host_floats(want.squared_error.unwrap()),
                );
                assert!(
                    (a[0] - b[0]).abs() <= 1e-5 * b[0].max(1.0),
                    "{what}: {a:?} vs {b:?}"
                );
            }
        }

        // Decode: three levels of different sizes, one launch.
        let (n, d) = (257, 6);
        let sizes = [7, 64, 3];
        let codebooks: Vec<Tensor<2>> = sizes
            .iter()
            .map(|&k| {
                let values: Vec<f32> = (0..k * d).map(|_| uniform()).collect();
                tensor(&values, [k, d], &device)
            })
            .collect();
        let indices: Vec<Tensor<1, Int>> = sizes
            .iter()
            .map(|&k| {
                let values: Vec<i64> = (0..n).map(|i| ((i * 31 + k) % k) as i64).collect();
                int_tensor(values, &device)
            })
            .collect();
        let got = host_floats(KernelPath.decode(codebooks.clone(), &indices).unwrap());
        let want = host_floats(tensor_path.decode(codebooks.clone(), &indices).unwrap());
        assert_eq!(got, want, "decode");
        // Ties: codes equal to the nearest one in another lane of the same 64-code tile (2 and
        // 5) and in a later tile (67): the first wins, as on every path.
        let (n, d, k) = (70, 3, 130);
        let mut codes = vec![9.0f32; k * d];
        for code in [2, 5, 67] {
            codes[code * d..(code + 1) * d].copy_from_slice(&[0.25, -0.5, 0.125]);
        }
        let rows: Vec<f32> = (0..n * d).map(|i| (i % 7) as f32 * 0.01).collect();
        let (x, codebook) = (
            tensor(&rows, [n, d], &device),
            tensor(&codes, [k, d], &device),
        );
        assert_eq!(
            host_ints(nearest(x.clone(), codebook)),
            vec![2; n],
            "2 = 5 = 67"
        );
        codes[2 * d..3 * d].copy_from_slice(&[9.0; 3]);
        let codebook = tensor(&codes, [k, d], &device);
        assert_eq!(host_ints(nearest(x, codebook)), vec![5; n], "5 = 67");

        let mut bad = indices.clone();
        bad[1] = int_tensor(vec![64; n], &device);
        assert!(matches!(
            KernelPath.decode(codebooks, &bad),
            Err(RvqError::IndexOutOfRange { level: 1, .. })
        ));
    }

    /// The codebook kernel equals `EmaResidualVectorQuantizerConfig::codebook` (Burn's
    /// tensor operations) within 1e-5, and its norms the rows' squared norms: both rules,
    /// Euclidean and cosine, over shapes with K below, at and past the 4 codes of a cube's
    /// group and past 1024 cubes' groups (several groups per cube), D below, at and past a
    /// unit's 64 dimensions; with counts of zero and below epsilon, and a code whose sums are
    /// zero (its cosine row stays zero: the length is taken as 1e-6).
    #[test]
    fn codebook_kernel_equals_the_rule() {
        let Some(device) = device() else { return };
        let mut hash = SplitMix64::new(29);
        let mut uniform = move || (hash.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        for (k, d) in [(1, 1), (3, 5), (4, 64), (5, 65), (130, 70), (4100, 3)] {
            let counts: Vec<f32> = (0..k)
                .map(|i| match i % 5 {
                    0 => 0.0,
                    1 => 1e-7,
                    _ => 10.0 * uniform(),
                })
                .collect();
            let mut sums: Vec<f32> = (0..k * d).map(|_| uniform() - 0.5).collect();
            sums[..d].fill(0.0);
            let counts_tensor = Tensor::<1>::from_data(TensorData::new(counts, [k]), &device);
            let sums_tensor = tensor(&sums, [k, d], &device);
            for rule in [CodebookRule::Laplace, CodebookRule::Clamp] {
                for cosine in [false, true] {
                    let what = format!("K = {k}, D = {d}, {rule:?}, cosine {cosine}");
                    let config = EmaResidualVectorQuantizerConfig::new(1, k.into(), d)
                        .with_codebook_rule(rule)
                        .with_cosine_similarity(cosine);
                    let got =
                        KernelPath.codebook(counts_tensor.clone(), sums_tensor.clone(), &config);
                    let want = config.codebook(counts_tensor.clone(), sums_tensor.clone());
                    // NaN where both are (a total count of zero: 0 / 0, as Burn gives it).
                    let close = |a: f32, b: f32| {
                        a == b
                            || (a.is_nan() && b.is_nan())
                            || (a - b).abs() <= 1e-5 * b.abs().max(1.0)
                    };
                    let (vectors, want_vectors) = (host_floats(got.vectors), host_floats(want));
                    for (i, (a, b)) in vectors.iter().zip(&want_vectors).enumerate() {
                        assert!(close(*a, *b), "{what}: codebook[{i}] {a} vs {b}");
                    }
                    let plain = config
                        .with_cosine_similarity(false)
                        .codebook(counts_tensor.clone(), sums_tensor.clone());
                    let want_norms = host_floats(plain.powi_scalar(2).sum_dim(1).reshape([k]));
                    let norms = host_floats(got.norms.expect("the kernel path's norms"));
                    for (i, (a, b)) in norms.iter().zip(&want_norms).enumerate() {
                        assert!(close(*a, *b), "{what}: norms[{i}] {a} vs {b}");
                    }
                }
            }
        }
    }

    /// The kernel path's non-finite check equals Burn's `is_finite().all()`: finite batches
    /// (with the largest and the smallest floats) pass, and one NaN, infinity or negative
    /// infinity anywhere (first, last, in a later cube's stride) is found, over lengths below,
    /// at and past one cube's 256 units and past 1024 cubes' (several values per unit).
    #[test]
    fn non_finite_check_equals_burns() {
        let Some(device) = device() else { return };
        for (n, d) in [(1, 1), (255, 1), (16, 16), (257, 1), (3000, 100)] {
            let len = n * d;
            let mut values: Vec<f32> = (0..len).map(|i| (i % 13) as f32 - 6.0).collect();
            values[0] = f32::MAX;
            values[len - 1] = f32::MIN_POSITIVE / 4.0;
            let mut cases = vec![("finite", values.clone())];
            for (what, bad) in [
                ("NaN", f32::NAN),
                ("infinity", f32::INFINITY),
                ("-infinity", f32::NEG_INFINITY),
            ] {
                for at in [0, len / 2, len - 1] {
                    let mut with_bad = values.clone();
                    with_bad[at] = bad;
                    cases.push((what, with_bad));
                }
            }
            for (what, values) in cases {
                let x = tensor(&values, [n, d], &device);
                let got = host_bools(KernelPath.non_finite(x.clone()));
                let want = host_bools(x.is_finite().all().bool_not());
                assert_eq!(got, want, "[{n}, {d}], {what}");
                assert_eq!(got, vec![what != "finite"], "[{n}, {d}], {what}");
            }
        }
    }

    /// The search kernel's epilogue equals the tensor operations it replaces, over two levels
    /// (the first without running sums to add to, the second with): for every row whose codes
    /// agree on both paths (all but rows within rounding of a tie), the same next residual and
    /// running sums to the bit (the same f32 operations, row by row), and the squared errors
    /// within 1e-5 where every code agrees; without an output (encode), the residual alone.
    #[test]
    fn search_epilogue_equals_tensor_ops() {
        let Some(device) = device() else { return };
        let mut hash = SplitMix64::new(41);
        let mut uniform = move || (hash.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        let tensor_path = TensorPath(Search {
            max_elements: 1 << 24,
            dense: false,
        });
        for (n, d, k) in [
            (1, 3, 1),
            (65, 17, 65),
            (300, 70, 130),
            (129, 1, 5),
            (64, 64, 7),
        ] {
            for work in [Work::TRAINING, Work::EVALUATION, Work::CODES] {
                let what = format!("N = {n}, D = {d}, K = {k}, {work:?}");
                let x: Vec<f32> = (0..n * d).map(|_| uniform()).collect();
                let rows = tensor(&x, [n, d], &device);
                let mut kernel_rows = TensorRows::start(rows.clone(), work);
                let mut tensor_rows = TensorRows::start(rows, work);
                let mut agree = vec![true; n];
                let mut errors = Vec::new();
                for _level in 0..2 {
                    let codes: Vec<f32> = (0..k * d).map(|_| uniform()).collect();
                    let codebook = tensor(&codes, [k, d], &device);
                    let got = KernelPath.level(codebook.clone(), &mut kernel_rows, work);
                    let want = tensor_path.level(codebook, &mut tensor_rows, work);
                    let (a, b) = (host_ints(got.indices), host_ints(want.indices));
                    for (row, (a, b)) in a.iter().zip(&b).enumerate() {
                        agree[row] &= a == b;
                    }
                    errors.push((got.squared_error, want.squared_error));
                }
                let agreeing = agree.iter().filter(|&&a| a).count();
                assert!(
                    agreeing * 10 >= n * 9,
                    "{what}: {agreeing} of {n} rows agree"
                );
                let same_rows = |name: &str, a: Tensor<2>, b: Tensor<2>| {
                    let (a, b) = (host_floats(a), host_floats(b));
                    for row in (0..n).filter(|&row| agree[row]) {
                        assert_eq!(
                            a[row * d..(row + 1) * d],
                            b[row * d..(row + 1) * d],
                            "{what}: {name}, row {row}"
                        );
                    }
                };
                same_rows("residual", kernel_rows.residual(), tensor_rows.residual());
                match (kernel_rows.finish(), tensor_rows.finish()) {
                    (Some(a), Some(b)) => {
                        same_rows("quantized sum", a.quantized, b.quantized);
                        same_rows("residual sum", a.residuals, b.residuals);
                    }
                    (None, None) => assert!(!work.output, "{what}: no running sums"),
                    _ => panic!("{what}: running sums on one path only"),
                }
                for (level, (a, b)) in errors.into_iter().enumerate() {
                    match (a, b) {
                        (Some(a), Some(b)) if agreeing == n => {
                            let (a, b) = (host_floats(a)[0], host_floats(b)[0]);
                            assert!(
                                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                                "{what}: level {level} squared error {a} vs {b}"
                            );
                        }
                        (Some(_), Some(_)) => {}
                        (None, None) => assert!(!work.output, "{what}: no squared error"),
                        _ => panic!("{what}: a squared error on one path only"),
                    }
                }
            }
        }
    }
}
