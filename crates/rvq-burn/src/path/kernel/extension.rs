//! The kernel path's Burn backend extension ([`RvqKernels`]): its ops as the path calls them,
//! with what fusion needs to know of their outputs, and the shapes of the launches that make
//! them (units and cubes, the search's vectors and splits). `launches.rs` makes the ops on
//! Burn's CubeCL backend.

use burn::backend::fusion::custom::TensorSpec;
use burn::backend::tensor::{BoolTensor, FloatTensor, IntTensor};
use burn::backend::{Backend, backend_extension};
use burn::tensor::{BoolDType, DType, IntDType, Shape};
use cubecl::prelude::CubeCount;

/// Units per cube of the non-finite check.
pub(super) const CHECK_UNITS: u32 = 256;
// The kernels that sum over a cube (`any_kernel`, `total_kernel`, `offsets_kernel`'s
// `cube_sum`) are written for cubes of 256 units.
const _: () = assert!(CHECK_UNITS == 256 && SORT_BLOCK == 256);
/// Most cubes of the non-finite check (each a flag the second launch reads).
pub(super) const CHECK_CUBES: usize = 1024;
/// Most levels whose codebooks one launch derives: 16 tensors bound, where some devices
/// take at most 31 (Burn's fusion counts on that many).
pub(super) const CODEBOOK_LEVELS: usize = 4;
/// Codes per cube of the codebook's derivation at a time (64 units each).
pub(super) const CODEBOOK_CODES: usize = 4;
/// Units per cube of the codebook's derivation.
pub(super) const CODEBOOK_UNITS: u32 = 256;
/// Most cubes of the codebook's derivation per level: each sums the level's `K` counts
/// first, so past this many a cube takes several groups of codes instead.
pub(super) const CODEBOOK_CUBES: usize = 1024;
/// Rows per cube of the search.
pub(super) const SEARCH_ROWS: usize = 64;
/// Codes per tile of the search: a split search's splits are whole tiles.
pub(super) const SEARCH_CODES: usize = 64;
/// Cubes of the search below which its codes are split: about two per multiprocessor of a
/// 132-multiprocessor GPU (WGPU does not say how many a device has). A guess until the GPU
/// check times it.
pub(super) const SPLIT_BELOW_CUBES: usize = 256;
/// Fewest codes a split takes: smaller splits would not pay for the merge's launch.
pub(super) const SPLIT_CODES: usize = 256;
/// Units per cube of the search (16 x 16, each 4 rows x 4 codes).
pub(super) const SEARCH_UNITS: u32 = 256;
/// Rows per block of the statistics' counting sort, and units per cube of its kernels but the
/// sums'.
pub(super) const SORT_BLOCK: usize = 256;
/// Units per cube of the per-code sums: each takes every 64th dimension.
pub(super) const SUMS_UNITS: usize = 64;
/// Units per cube of the decode.
pub(super) const DECODE_UNITS: u32 = 256;

/// The quantizer's kernels as a Burn backend extension, for the CubeCL backend with and
/// without fusion.
#[backend_extension(Cube, Fusion)]
pub(crate) trait RvqKernels: Backend {
    /// The codebooks of up to [`CODEBOOK_LEVELS`] levels in one launch: level `j`'s from its
    /// EMA `counts_j` `[K_j]` and `sums_j` `[K_j, D]`, for `j < levels` (the slots past them
    /// hold any of these tensors, unread), by the Laplace rule (`laplace`) or the clamp rule,
    /// the rows over their lengths with `unit_rows`, and the codes' squared norms (before
    /// that normalization): `([K_j, D], [K_j])` for each level in turn (`[1, D]` and `[1]`,
    /// unwritten, past them).
    #[fusion(meta = |counts_0, sums_0, counts_1, sums_1, counts_2, sums_2, counts_3, sums_3, levels, _laplace, _epsilon, _unit_rows| {
        let d = sums_0.shape[1];
        let spec = |j: usize, counts: &TensorSpec, sums: &TensorSpec| match j < *levels {
            true => (
                TensorSpec::new(sums.shape.clone(), sums.dtype),
                TensorSpec::new(counts.shape.clone(), counts.dtype),
            ),
            false => (
                TensorSpec::new(Shape::new([1, d]), sums.dtype),
                TensorSpec::new(Shape::new([1]), counts.dtype),
            ),
        };
        let (codebook_0, norms_0) = spec(0, counts_0, sums_0);
        let (codebook_1, norms_1) = spec(1, counts_1, sums_1);
        let (codebook_2, norms_2) = spec(2, counts_2, sums_2);
        let (codebook_3, norms_3) = spec(3, counts_3, sums_3);
        (codebook_0, norms_0, codebook_1, norms_1, codebook_2, norms_2, codebook_3, norms_3)
    })]
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
    );

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
pub(super) fn cube_count(cubes: usize) -> CubeCount {
    let x = cubes.clamp(1, 65_535);
    CubeCount::Static(x as u32, cubes.div_ceil(x) as u32, 1)
}

/// The widest vector of 4, 2 or 1 values that divides a row of `d`: the search's reads and
/// writes along rows.
pub(super) fn row_vector(d: usize) -> usize {
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
