//! The kernel path's launches: the kernels of `search.rs` and `kernels.rs` as a Burn backend extension
//! ([`RvqKernels`]) on Burn's CubeCL backend, with and without fusion, each op allocating its
//! outputs and launching its kernels on CubeCL's tensors.

use burn::backend::fusion::custom::TensorSpec;
use burn::backend::tensor::{BoolTensor, FloatTensor, IntTensor};
use burn::backend::{Backend, TensorMetadata, backend_extension};
use burn::tensor::{BoolDType, DType, IntDType, Shape};
use burn_backend::cubecl::dtype_to_storage_type;
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use cubecl::prelude::{CubeCount, CubeDim, InputScalar};

use super::{kernels, search};

/// Units per cube of the non-finite check.
const CHECK_UNITS: u32 = 256;
// The kernels that sum over a cube (`any_kernel`, `total_kernel`, `offsets_kernel`'s
// `cube_sum`) are written for cubes of 256 units.
const _: () = assert!(CHECK_UNITS == 256 && SORT_BLOCK == 256);
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
/// Codes per tile of the search: a split search's splits are whole tiles.
const SEARCH_CODES: usize = 64;
/// Cubes of the search below which its codes are split: about two per multiprocessor of a
/// 132-multiprocessor GPU (WGPU does not say how many a device has). A guess until the GPU
/// check times it.
const SPLIT_BELOW_CUBES: usize = 256;
/// Fewest codes a split takes: smaller splits would not pay for the merge's launch.
const SPLIT_CODES: usize = 256;
/// Units per cube of the search (16 x 16, each 4 rows x 4 codes).
const SEARCH_UNITS: u32 = 256;
/// Rows per block of the statistics' counting sort, and units per cube of its kernels but the
/// sums'.
const SORT_BLOCK: usize = 256;
/// Units per cube of the per-code sums: each takes every 64th dimension.
const SUMS_UNITS: usize = 64;
/// Units per cube of the decode.
const DECODE_UNITS: u32 = 256;

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

    /// Whether a value of `values` is NaN or infinite, `[1]`, stored as `bool_dtype`.
    #[fusion(meta = |_values, bool_dtype| TensorSpec::new(Shape::new([1]), DType::from(*bool_dtype)))]
    fn rvq_non_finite(values: FloatTensor<Self>, bool_dtype: BoolDType) -> BoolTensor<Self>;

    /// A level's search and what follows it: the nearest code of each row of `rows` `[N, D]`
    /// among `codebook` `[K, D]` with squared norms `norms` `[K]` (integers of `int_dtype`,
    /// `[N]`), the next residual `rows - codebook[code]` `[N, D]`; with `running`, the running
    /// sums `(quantized + codebook[code], residuals + next)` `[N, D]` (the terms alone at the
    /// `first` level, whose `quantized` and `residuals` are not read), else two unwritten
    /// `[1, V]` (`V` the width of the kernels' vectors); with `squared_error`, the sum of
    /// `next^2` per cube of 64 rows `[ceil(N / 64)]` (for [`RvqKernels::rvq_total`] or the
    /// statistics to sum), else an unwritten `[1]`. The codes are searched in at most `splits`
    /// parts of whole 64-code tiles (none empty), merged by a second launch, where more than
    /// one.
    #[fusion(meta = |rows, _codebook, _norms, _quantized, _residuals, int_dtype, squared_error, running, _first, _splits| {
        let sums = match *running {
            true => rows.shape.clone(),
            false => Shape::new([1, row_vector(rows.shape[1])]),
        };
        let partials = match *squared_error {
            true => rows.shape[0].div_ceil(SEARCH_ROWS),
            false => 1,
        };
        (
            TensorSpec::new(Shape::new([rows.shape[0]]), DType::from(*int_dtype)),
            TensorSpec::new(rows.shape.clone(), rows.dtype),
            TensorSpec::new(sums.clone(), rows.dtype),
            TensorSpec::new(sums, rows.dtype),
            TensorSpec::new(Shape::new([partials]), rows.dtype),
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
        splits: usize,
    ) -> (
        IntTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    );

    /// The sum of `partials` `[C]`, `[1]`.
    #[fusion(meta = |partials| TensorSpec::new(Shape::new([1]), partials.dtype))]
    fn rvq_total(partials: FloatTensor<Self>) -> FloatTensor<Self>;

    /// How many rows of `rows` `[N, D]` took each of the `num_embeddings` codes by `indices`
    /// `[N]`, and their sum, and with `total` the sum of `partials` `[C]` (else an unwritten
    /// `[1]`): `([K], [K, D], [1])`.
    #[fusion(meta = |rows, _indices, _partials, num_embeddings, _total| {
        (
            TensorSpec::new(Shape::new([*num_embeddings]), rows.dtype),
            TensorSpec::new(Shape::new([*num_embeddings, rows.shape[1]]), rows.dtype),
            TensorSpec::new(Shape::new([1]), rows.dtype),
        )
    })]
    fn rvq_statistics(
        rows: FloatTensor<Self>,
        indices: IntTensor<Self>,
        partials: FloatTensor<Self>,
        num_embeddings: usize,
        total: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// [`RvqKernels::rvq_statistics`] whose sums go into an EMA update of the state
    /// `state_counts` `[K]`, `state_sums` `[K, D]` with decay `decay` (the state itself where
    /// `skip` `[1]` is set): the batch's counts, the updated counts and sums, and the total:
    /// `([K], [K], [K, D], [1])`.
    #[fusion(meta = |rows, _indices, _partials, state_counts, state_sums, _skip, _decay, _total| {
        (
            TensorSpec::new(state_counts.shape.clone(), rows.dtype),
            TensorSpec::new(state_counts.shape.clone(), rows.dtype),
            TensorSpec::new(state_sums.shape.clone(), rows.dtype),
            TensorSpec::new(Shape::new([1]), rows.dtype),
        )
    })]
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn rvq_ema_statistics(
        rows: FloatTensor<Self>,
        indices: IntTensor<Self>,
        partials: FloatTensor<Self>,
        state_counts: FloatTensor<Self>,
        state_sums: FloatTensor<Self>,
        skip: BoolTensor<Self>,
        decay: f64,
        total: bool,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    );

    /// How many rows of `rows` `[N, D]` took each of the `num_embeddings` codes by `indices`
    /// `[N]` (the rows give the float type, the partials' own; their values are not read), and
    /// with `total` the
    /// sum of `partials` `[C]` (else an unwritten `[1]`): `([K], [1])`.
    #[fusion(meta = |rows, _indices, _partials, num_embeddings, _total| {
        (
            TensorSpec::new(Shape::new([*num_embeddings]), rows.dtype),
            TensorSpec::new(Shape::new([1]), rows.dtype),
        )
    })]
    fn rvq_code_counts(
        rows: FloatTensor<Self>,
        indices: IntTensor<Self>,
        partials: FloatTensor<Self>,
        num_embeddings: usize,
        total: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

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

/// A grid of `cubes` cubes within the 65,535 a dimension may hold along `x` and `y` (the
/// search's kernels read their block as `y * CUBE_COUNT_X + x`, keeping `z` for the splits;
/// the others read the linear `CUBE_POS`).
fn cube_count(cubes: usize) -> CubeCount {
    let x = cubes.clamp(1, 65_535);
    CubeCount::Static(x as u32, cubes.div_ceil(x) as u32, 1)
}

/// The widest vector of 4, 2 or 1 values that divides a row of `d`: the search's reads and
/// writes along rows.
fn row_vector(d: usize) -> usize {
    [4, 2]
        .into_iter()
        .find(|v| d.is_multiple_of(*v))
        .unwrap_or(1)
}

/// Into how many splits of its codes the search of `n` rows among `k` codes goes
/// ([`chosen_splits`]), or `RVQ_SEARCH_SPLITS=S` (read once) where set, for the GPU check to
/// time the search both ways (`1`: never split).
pub(super) fn search_splits(n: usize, k: usize) -> usize {
    static FORCED: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let forced = FORCED.get_or_init(|| {
        let value = std::env::var("RVQ_SEARCH_SPLITS").ok()?;
        let parsed = value.parse().ok().filter(|&splits: &usize| splits >= 1);
        if parsed.is_none() {
            eprintln!("RVQ_SEARCH_SPLITS={value:?} ignored: expected a whole number of at least 1");
        }
        parsed
    });
    forced.unwrap_or_else(|| chosen_splits(n, k))
}

/// As many splits of the codes as bring the search's cubes to [`SPLIT_BELOW_CUBES`], each of
/// at least [`SPLIT_CODES`] codes (1: no split, one launch; more: a second launch merges
/// them).
pub(super) fn chosen_splits(n: usize, k: usize) -> usize {
    let cubes = n.div_ceil(SEARCH_ROWS).max(1);
    SPLIT_BELOW_CUBES
        .div_ceil(cubes)
        .min(k / SPLIT_CODES)
        .max(1)
}

impl RvqKernels for CubeBackend {
    fn rvq_non_finite(values: FloatTensor<Self>, bool_dtype: BoolDType) -> BoolTensor<Self> {
        let values = into_contiguous(values);
        let (client, float_dtype) = (values.client.clone(), values.dtype);
        let cubes = values
            .shape()
            .num_elements()
            .div_ceil(CHECK_UNITS as usize)
            .clamp(1, CHECK_CUBES);
        let empty = |len: usize, dtype: DType| {
            empty_device_dtype(
                client.clone(),
                values.device.clone(),
                Shape::new([len]),
                dtype,
            )
        };
        let bool_dtype = DType::from(bool_dtype);
        let (flags, flag) = (empty(cubes, float_dtype), empty(1, bool_dtype));
        // A flag per cube of a strided pass over the values, then one cube over the flags,
        // writing the answer as a bool.
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
                [
                    dtype_to_storage_type(float_dtype),
                    dtype_to_storage_type(output.dtype),
                ],
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
        splits: usize,
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
        let k = codebook.shape()[0];
        let (client, float_dtype) = (rows.client.clone(), rows.dtype);
        debug_assert_eq!((codebook.dtype, norms.dtype), (float_dtype, float_dtype));
        let int_dtype = DType::from(int_dtype);
        let cubes = n.div_ceil(SEARCH_ROWS);
        let empty = |shape: Shape, dtype: DType| {
            empty_device_dtype(client.clone(), rows.device.clone(), shape, dtype)
        };
        let indices = empty(Shape::new([n]), int_dtype);
        let next = empty(Shape::new([n, d]), float_dtype);
        let vector = row_vector(d);
        let sums = match running {
            true => Shape::new([n, d]),
            false => Shape::new([1, vector]),
        };
        let quantized_out = empty(sums.clone(), float_dtype);
        let residuals_out = empty(sums, float_dtype);
        let partials = empty(
            Shape::new([if squared_error { cubes } else { 1 }]),
            float_dtype,
        );
        // No more splits than whole tiles or than a grid's `z` holds, and none empty.
        let tiles = k.div_ceil(SEARCH_CODES);
        let splits = tiles.div_ceil(tiles.div_ceil(splits.clamp(1, tiles.min(65_535))));
        let split = splits > 1;
        let split_shape = Shape::new(if split { [splits, n] } else { [1, 1] });
        let split_distances = empty(split_shape.clone(), float_dtype);
        let split_codes = empty(split_shape, int_dtype);
        let dtypes = [
            dtype_to_storage_type(float_dtype),
            dtype_to_storage_type(int_dtype),
        ];
        let mut count = cube_count(cubes);
        if let (CubeCount::Static(_, _, z), true) = (&mut count, split) {
            *z = splits as u32;
        }
        // SAFETY: the kernels guard every global access by the tensors' shapes (the epilogue's
        // by the cube's rows, which every `[N, D]` tensor holds), their shared indices stay
        // within the tiles (their docs), and the tensors are contiguous.
        unsafe {
            search::nearest_kernel::launch_unchecked(
                &client,
                count,
                CubeDim::new_1d(SEARCH_UNITS),
                vector,
                rows.clone().into_tensor_arg(),
                codebook.clone().into_tensor_arg(),
                norms.into_tensor_arg(),
                indices.clone().into_tensor_arg(),
                next.clone().into_tensor_arg(),
                quantized.clone().into_tensor_arg(),
                residuals.clone().into_tensor_arg(),
                quantized_out.clone().into_tensor_arg(),
                residuals_out.clone().into_tensor_arg(),
                partials.clone().into_tensor_arg(),
                split_distances.clone().into_tensor_arg(),
                split_codes.clone().into_tensor_arg(),
                squared_error,
                running,
                first,
                split,
                dtypes,
            );
            if split {
                search::merge_kernel::launch_unchecked(
                    &client,
                    cube_count(cubes),
                    CubeDim::new_1d(SEARCH_UNITS),
                    vector,
                    rows.into_tensor_arg(),
                    codebook.into_tensor_arg(),
                    split_distances.into_tensor_arg(),
                    split_codes.into_tensor_arg(),
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
                    dtypes,
                );
            }
        }
        (indices, next, quantized_out, residuals_out, partials)
    }

    fn rvq_total(partials: FloatTensor<Self>) -> FloatTensor<Self> {
        let partials = into_contiguous(partials);
        let (client, float_dtype) = (partials.client.clone(), partials.dtype);
        let total = empty_device_dtype(
            client.clone(),
            partials.device.clone(),
            Shape::new([1]),
            float_dtype,
        );
        kernels::total_kernel::launch(
            &client,
            CubeCount::Static(1, 1, 1),
            CubeDim::new_1d(CHECK_UNITS),
            partials.into_tensor_arg(),
            total.clone().into_tensor_arg(),
            dtype_to_storage_type(float_dtype),
        );
        total
    }

    fn rvq_statistics(
        rows: FloatTensor<Self>,
        indices: IntTensor<Self>,
        partials: FloatTensor<Self>,
        num_embeddings: usize,
        total: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        debug_assert_eq!(rows.dtype, partials.dtype);
        let sort = CountingSort::count(into_contiguous(indices), num_embeddings, partials, total);
        let sums = sort.sums(into_contiguous(rows), None);
        (sort.counts, sums.sums, sort.total)
    }

    fn rvq_ema_statistics(
        rows: FloatTensor<Self>,
        indices: IntTensor<Self>,
        partials: FloatTensor<Self>,
        state_counts: FloatTensor<Self>,
        state_sums: FloatTensor<Self>,
        skip: BoolTensor<Self>,
        decay: f64,
        total: bool,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        debug_assert_eq!(
            (partials.dtype, state_counts.dtype, state_sums.dtype),
            (rows.dtype, rows.dtype, rows.dtype)
        );
        let num_embeddings = state_sums.shape()[0];
        let sort = CountingSort::count(into_contiguous(indices), num_embeddings, partials, total);
        let update = Update {
            counts: into_contiguous(state_counts),
            sums: into_contiguous(state_sums),
            skip: into_contiguous(skip),
            decay,
        };
        let sums = sort.sums(into_contiguous(rows), Some(update));
        let counts = sums.counts.expect("the update's counts");
        (sort.counts, counts, sums.sums, sort.total)
    }

    fn rvq_code_counts(
        rows: FloatTensor<Self>,
        indices: IntTensor<Self>,
        partials: FloatTensor<Self>,
        num_embeddings: usize,
        total: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        debug_assert_eq!(rows.dtype, partials.dtype);
        let sort = CountingSort::count(into_contiguous(indices), num_embeddings, partials, total);
        (sort.counts, sort.total)
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
/// `offsets_kernel`): the counts, and where each row goes in the rows sorted by code; and
/// the level's squared error, summed in the second.
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
    /// The sum of the search's partials, `[1]` (unwritten where not asked).
    total: FloatTensor<CubeBackend>,
}

/// An EMA update for the per-code sums' launch to make ([`RvqKernels::rvq_ema_statistics`]).
struct Update {
    counts: FloatTensor<CubeBackend>,
    sums: FloatTensor<CubeBackend>,
    skip: BoolTensor<CubeBackend>,
    decay: f64,
}

/// The per-code sums' launches' output: the batch's sums, or the updated state.
struct CodeSums {
    /// The batch's sums, or with an update the updated sums, `[K, D]`.
    sums: FloatTensor<CubeBackend>,
    /// With an update, the updated counts, `[K]`.
    counts: Option<FloatTensor<CubeBackend>>,
}

impl CountingSort {
    /// The counts of `indices` `[N]` among `num_embeddings` codes in the float type of
    /// `partials`, with `total` their sum.
    fn count(
        indices: IntTensor<CubeBackend>,
        num_embeddings: usize,
        partials: FloatTensor<CubeBackend>,
        total: bool,
    ) -> Self {
        let n = indices.shape()[0];
        let blocks = n.div_ceil(SORT_BLOCK);
        let partials = into_contiguous(partials);
        let (client, int_dtype, float_dtype) =
            (indices.client.clone(), indices.dtype, partials.dtype);
        let empty = |shape: Shape, dtype: DType| {
            empty_device_dtype(client.clone(), indices.device.clone(), shape, dtype)
        };
        let ranks = empty(Shape::new([n]), int_dtype);
        let block_starts = empty(Shape::new([blocks, num_embeddings]), int_dtype);
        let starts = empty(Shape::new([num_embeddings + 1]), int_dtype);
        let counts = empty(Shape::new([num_embeddings]), float_dtype);
        let sum = empty(Shape::new([1]), float_dtype);
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
            partials.into_tensor_arg(),
            sum.clone().into_tensor_arg(),
            total,
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
            total: sum,
        }
    }

    /// The last two steps (`scatter_kernel`, `code_sums_kernel`): each code's rows of `rows`
    /// `[N, D]` summed in row order, or with `update`, the state updated by those sums.
    fn sums(&self, rows: FloatTensor<CubeBackend>, update: Option<Update>) -> CodeSums {
        let [n, d] = [rows.shape()[0], rows.shape()[1]];
        let k = self.counts.shape()[0];
        let (client, int_dtype, float_dtype) =
            (rows.client.clone(), self.indices.dtype, rows.dtype);
        let empty = |shape: Shape, dtype: DType| {
            empty_device_dtype(client.clone(), rows.device.clone(), shape, dtype)
        };
        let order = empty(Shape::new([n]), int_dtype);
        let sums = empty(Shape::new([k, d]), float_dtype);
        kernels::scatter_kernel::launch(
            &client,
            cube_count(n.div_ceil(SORT_BLOCK)),
            CubeDim::new_1d(SORT_BLOCK as u32),
            self.indices.clone().into_tensor_arg(),
            self.ranks.clone().into_tensor_arg(),
            self.block_starts.clone().into_tensor_arg(),
            self.starts.clone().into_tensor_arg(),
            order.clone().into_tensor_arg(),
            dtype_to_storage_type(int_dtype),
        );
        let ema = update.is_some();
        // Without an update, unwritten `[1]` stand-ins the kernel does not touch (bindings of
        // their own: a buffer bound twice in one launch, read and written, is refused).
        let stand_in = |dtype: DType| empty(Shape::new([1]), dtype);
        let (state_counts, state_sums, skip, decay) = match update {
            Some(update) => (update.counts, update.sums, update.skip, update.decay),
            None => (
                stand_in(float_dtype),
                stand_in(float_dtype),
                stand_in(int_dtype),
                0.0,
            ),
        };
        let counts = match ema {
            true => empty(Shape::new([k]), float_dtype),
            false => stand_in(float_dtype),
        };
        let scalar = |value: f64| InputScalar::new(value, dtype_to_storage_type(float_dtype));
        let skip_dtype = dtype_to_storage_type(skip.dtype);
        kernels::code_sums_kernel::launch(
            &client,
            cube_count(k),
            CubeDim::new_1d(SUMS_UNITS as u32),
            rows.into_tensor_arg(),
            order.into_tensor_arg(),
            self.starts.clone().into_tensor_arg(),
            sums.clone().into_tensor_arg(),
            state_counts.into_tensor_arg(),
            state_sums.into_tensor_arg(),
            skip.into_tensor_arg(),
            counts.clone().into_tensor_arg(),
            scalar(decay),
            scalar(1.0 - decay),
            d.div_ceil(SUMS_UNITS).max(1),
            ema,
            [
                dtype_to_storage_type(float_dtype),
                dtype_to_storage_type(int_dtype),
                skip_dtype,
            ],
        );
        CodeSums {
            sums,
            counts: ema.then_some(counts),
        }
    }
}
