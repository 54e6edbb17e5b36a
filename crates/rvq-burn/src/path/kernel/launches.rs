//! The kernel path's ops on Burn's CubeCL backend (with fusion, Burn runs them through the
//! same code): each allocates its outputs and launches the kernels of `search.rs` and
//! `kernels.rs` on CubeCL's tensors.

use burn::backend::TensorMetadata;
use burn::backend::tensor::{BoolTensor, FloatTensor, IntTensor};
use burn::tensor::{BoolDType, DType, IntDType, Shape};
use burn_backend::cubecl::dtype_to_storage_type;
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use cubecl::prelude::{CubeCount, CubeDim, InputScalar};

use super::extension::{
    CHECK_CUBES, CHECK_UNITS, CODEBOOK_CODES, CODEBOOK_CUBES, CODEBOOK_LEVELS, CODEBOOK_UNITS,
    DECODE_UNITS, RvqKernels, SEARCH_CODES, SEARCH_ROWS, SEARCH_UNITS, SORT_BLOCK, SUMS_UNITS,
    cube_count, row_vector,
};
use super::{kernels, search};

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

    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn rvq_codebooks(
        counts_0: FloatTensor<Self>,
        sums_0: FloatTensor<Self>,
        counts_1: FloatTensor<Self>,
        sums_1: FloatTensor<Self>,
        counts_2: FloatTensor<Self>,
        sums_2: FloatTensor<Self>,
        counts_3: FloatTensor<Self>,
        sums_3: FloatTensor<Self>,
        levels: usize,
        laplace: bool,
        epsilon: f64,
        unit_rows: bool,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        debug_assert!((1..=CODEBOOK_LEVELS).contains(&levels));
        let states = [
            (counts_0, sums_0),
            (counts_1, sums_1),
            (counts_2, sums_2),
            (counts_3, sums_3),
        ]
        .map(|(counts, sums)| (into_contiguous(counts), into_contiguous(sums)));
        let (client, device, float_dtype) = {
            let sums = &states[0].1;
            (sums.client.clone(), sums.device.clone(), sums.dtype)
        };
        let d = states[0].1.shape()[1];
        let empty =
            |shape: Shape| empty_device_dtype(client.clone(), device.clone(), shape, float_dtype);
        let scalar = |value: f64| InputScalar::new(value, dtype_to_storage_type(float_dtype));
        let sizes = states.each_ref().map(|(_, sums)| sums.shape()[0]);
        // The slots past `levels` get outputs of one unwritten row.
        let outputs = std::array::from_fn::<_, CODEBOOK_LEVELS, _>(|j| {
            let k = if j < levels { sizes[j] } else { 1 };
            (empty(Shape::new([k, d])), empty(Shape::new([k])))
        });
        let largest = sizes[..levels].iter().copied().max().unwrap_or(1);
        let [
            (counts_0, sums_0),
            (counts_1, sums_1),
            (counts_2, sums_2),
            (counts_3, sums_3),
        ] = states;
        let [
            (codebook_0, norms_0),
            (codebook_1, norms_1),
            (codebook_2, norms_2),
            (codebook_3, norms_3),
        ] = outputs;
        kernels::codebook_kernel::launch(
            &client,
            CubeCount::Static(
                largest.div_ceil(CODEBOOK_CODES).clamp(1, CODEBOOK_CUBES) as u32,
                levels as u32,
                1,
            ),
            CubeDim::new_1d(CODEBOOK_UNITS),
            counts_0.into_tensor_arg(),
            sums_0.into_tensor_arg(),
            counts_1.into_tensor_arg(),
            sums_1.into_tensor_arg(),
            counts_2.into_tensor_arg(),
            sums_2.into_tensor_arg(),
            counts_3.into_tensor_arg(),
            sums_3.into_tensor_arg(),
            codebook_0.clone().into_tensor_arg(),
            norms_0.clone().into_tensor_arg(),
            codebook_1.clone().into_tensor_arg(),
            norms_1.clone().into_tensor_arg(),
            codebook_2.clone().into_tensor_arg(),
            norms_2.clone().into_tensor_arg(),
            codebook_3.clone().into_tensor_arg(),
            norms_3.clone().into_tensor_arg(),
            scalar(epsilon),
            scalar(sizes[0] as f64 * epsilon),
            scalar(sizes[1] as f64 * epsilon),
            scalar(sizes[2] as f64 * epsilon),
            scalar(sizes[3] as f64 * epsilon),
            laplace,
            unit_rows,
            dtype_to_storage_type(float_dtype),
        );
        (
            codebook_0, norms_0, codebook_1, norms_1, codebook_2, norms_2, codebook_3, norms_3,
        )
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
        // Whole tiles to a split, no more splits than tiles or than a grid's `z` holds, and
        // none empty.
        let tiles = k.div_ceil(SEARCH_CODES);
        let tiles_per_split = tiles.div_ceil(splits.clamp(1, tiles.min(65_535)));
        let splits = tiles.div_ceil(tiles_per_split);
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
                tiles_per_split * SEARCH_CODES,
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
