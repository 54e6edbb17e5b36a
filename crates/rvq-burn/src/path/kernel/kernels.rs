//! The kernel path's CubeCL kernels (see the module docs of `path/kernel`), in CubeCL's own
//! language: its `Tensor` and `Int` are not Burn's.

use cubecl::prelude::*;

/// See the module docs of `path/kernel`. `values` (contiguous, any shape), `flags` `[C]`;
/// `C` cubes of 256 units striding over the values.
///
/// Per cube, 1 where one of the values it visits is NaN or infinite (`non_finite`), or
/// positive (a second pass over the first's flags), else 0, in the flags' type (the first
/// pass's float, the second's bool storage: an unsigned integer on CubeCL's backends).
#[cube(launch)]
pub(crate) fn any_kernel<F: Float, O: Numeric>(
    values: &Tensor<F>,
    flags: &mut Tensor<O>,
    #[comptime] non_finite: bool,
    #[define(F, O)] _dtypes: [ElemType; 2],
) {
    let len = values.len();
    let unit = UNIT_POS as usize;
    let mut found = 0u32;
    let mut position = CUBE_POS * 256 + unit;
    let stride = CUBE_COUNT * 256;
    while position < len {
        let value = values[position];
        if non_finite {
            found |= u32::cast_from(F::is_nan(value)) | u32::cast_from(F::is_inf(value));
        } else {
            found |= u32::cast_from(value > F::new(0.0));
        }
        position += stride;
    }
    let mut any = Shared::<[u32]>::new_slice(256usize);
    any[unit] = found;
    sync_cube();
    let mut width = 128usize;
    while width > 0 {
        if unit < width {
            any[unit] |= any[unit + width];
        }
        sync_cube();
        width /= 2;
    }
    if unit == 0 {
        flags[CUBE_POS] = O::cast_from(any[0]);
    }
}

/// See the module docs of `path/kernel`. Up to 4 levels' codebooks (`CODEBOOK_LEVELS`),
/// level `j`'s from its EMA statistics `counts_j` `[K_j]` and `sums_j` `[K_j, D]` into
/// `codebook_j` `[K_j, D]` and `norms_j` `[K_j]`, with `k_epsilon_j` its `K_j eps`; the cubes
/// along `y` one level each (as many as there are levels), 256 units per cube (see
/// [`level_codebook`]).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn codebook_kernel<F: Float>(
    counts_0: &Tensor<F>,
    sums_0: &Tensor<F>,
    counts_1: &Tensor<F>,
    sums_1: &Tensor<F>,
    counts_2: &Tensor<F>,
    sums_2: &Tensor<F>,
    counts_3: &Tensor<F>,
    sums_3: &Tensor<F>,
    codebook_0: &mut Tensor<F>,
    norms_0: &mut Tensor<F>,
    codebook_1: &mut Tensor<F>,
    norms_1: &mut Tensor<F>,
    codebook_2: &mut Tensor<F>,
    norms_2: &mut Tensor<F>,
    codebook_3: &mut Tensor<F>,
    norms_3: &mut Tensor<F>,
    epsilon: InputScalar,
    k_epsilon_0: InputScalar,
    k_epsilon_1: InputScalar,
    k_epsilon_2: InputScalar,
    k_epsilon_3: InputScalar,
    #[comptime] laplace: bool,
    #[comptime] unit_rows: bool,
    #[define(F)] _dtype: ElemType,
) {
    let eps = epsilon.get::<F>();
    let level = CUBE_POS_Y;
    if level == 0 {
        let k_epsilon = k_epsilon_0.get::<F>();
        level_codebook(
            counts_0, sums_0, codebook_0, norms_0, eps, k_epsilon, laplace, unit_rows,
        );
    } else if level == 1 {
        let k_epsilon = k_epsilon_1.get::<F>();
        level_codebook(
            counts_1, sums_1, codebook_1, norms_1, eps, k_epsilon, laplace, unit_rows,
        );
    } else if level == 2 {
        let k_epsilon = k_epsilon_2.get::<F>();
        level_codebook(
            counts_2, sums_2, codebook_2, norms_2, eps, k_epsilon, laplace, unit_rows,
        );
    } else {
        let k_epsilon = k_epsilon_3.get::<F>();
        level_codebook(
            counts_3, sums_3, codebook_3, norms_3, eps, k_epsilon, laplace, unit_rows,
        );
    }
}

/// One level's codebook in [`codebook_kernel`]: `counts` `[K]` and `sums` `[K, D]` (its EMA
/// statistics), `codebook` `[K, D]`, `norms` `[K]`; each cube along `x` a few groups of 4
/// codes (a grid-stride loop), 64 units per code over the dimensions.
///
/// The codebook `e_k = m_k / c^_k` by the Laplace rule (`laplace`, `c^_k = (c_k + eps) /
/// (n + K eps) n`, `k_epsilon` = `K eps`) or the clamp rule (`c^_k = max(c_k, eps)`), in the
/// order of operations of `CodebookRule::codebook`, and `norms` its squared norms
/// `||e_k||^2`; with `unit_rows`, each code then over its L2 norm (norms below 1e-6 taken as
/// 1e-6, as `util::unit_rows`; `norms` stay those before). Every cube sums the counts itself,
/// in the same order, so all agree on `n`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn level_codebook<F: Float>(
    counts: &Tensor<F>,
    sums: &Tensor<F>,
    codebook: &mut Tensor<F>,
    norms: &mut Tensor<F>,
    eps: F,
    k_epsilon: F,
    #[comptime] laplace: bool,
    #[comptime] unit_rows: bool,
) {
    let k = sums.shape(0);
    let d = sums.shape(1);
    let unit = UNIT_POS as usize;
    let mut partial = Shared::<[F]>::new_slice(256usize);
    let mut total = F::new(0.0);
    if laplace {
        let mut sum = F::new(0.0);
        let mut code = unit;
        while code < k {
            sum += counts[code];
            code += 256;
        }
        partial[unit] = sum;
        sync_cube();
        tree_sum(&mut partial, unit, unit, 128usize);
        total = partial[0];
        sync_cube();
    }
    let denominator = total + k_epsilon;
    let lane = unit / 64;
    let dim_unit = unit % 64;
    let groups = k.div_ceil(4usize);
    let mut group = CUBE_POS_X as usize;
    while group < groups {
        let code = group * 4 + lane;
        let mut divisor = F::new(1.0);
        let mut squares = F::new(0.0);
        if code < k {
            if laplace {
                divisor = (counts[code] + eps) / denominator * total;
            } else {
                divisor = counts[code].max(eps);
            }
            let mut dim = dim_unit;
            while dim < d {
                let value = sums[code * d + dim] / divisor;
                codebook[code * d + dim] = value;
                squares += value * value;
                dim += 64;
            }
        }
        partial[unit] = squares;
        sync_cube();
        tree_sum(&mut partial, unit, dim_unit, 32usize);
        let norm2 = partial[lane * 64];
        if code < k {
            if dim_unit == 0 {
                norms[code] = norm2;
            }
            if unit_rows {
                let length = norm2.sqrt().max(F::new(1e-6));
                let mut dim = dim_unit;
                while dim < d {
                    codebook[code * d + dim] = sums[code * d + dim] / divisor / length;
                    dim += 64;
                }
            }
        }
        // Every unit has read the norms before the next group writes `partial`.
        sync_cube();
        group += CUBE_COUNT_X as usize;
    }
}

/// See the module docs of `path/kernel`. `values` `[C]`, `total` `[1]`; one cube of 256
/// units.
///
/// The sum of the values ([`cube_sum`]).
#[cube(launch)]
pub(crate) fn total_kernel<F: Float>(
    values: &Tensor<F>,
    total: &mut Tensor<F>,
    #[define(F)] _dtype: ElemType,
) {
    let sum = cube_sum(values, UNIT_POS as usize);
    if UNIT_POS == 0 {
        total[0] = sum;
    }
}

/// See the module docs of `path/kernel`. `indices` `[N]`, `ranks` `[N]`, `block_counts`
/// `[B, K]` with `B = ceil(N / 256)`; one cube of 256 units per block of 256 rows.
///
/// Each row's rank among the rows of its block that took the same code, and the block's count
/// of every code (zero for the codes it does not hold).
#[cube(launch)]
pub(crate) fn block_counts_kernel<I: Int>(
    indices: &Tensor<I>,
    ranks: &mut Tensor<I>,
    block_counts: &mut Tensor<I>,
    #[define(I)] _dtype: ElemType,
) {
    let n = indices.shape(0);
    let blocks = block_counts.shape(0);
    let k = block_counts.shape(1);
    let block = CUBE_POS;
    let unit = UNIT_POS as usize;
    let row = block * 256 + unit;
    // Code K (none) pads the last block (and the grid's spare cubes).
    let mut code = k;
    if row < n {
        code = usize::cast_from(indices[row]);
    }
    let mut codes = Shared::<[u32]>::new_slice(256usize);
    let mine = u32::cast_from(code);
    codes[unit] = mine;
    if block < blocks {
        let mut zeroed = unit;
        while zeroed < k {
            block_counts[block * k + zeroed] = I::cast_from(0u32);
            zeroed += 256;
        }
    }
    // The zeros above land before any unit writes a count below.
    sync_storage();
    let mut rank = 0u32;
    let mut count = 0u32;
    for other in 0..256usize {
        if codes[other] == mine {
            count += 1u32;
            if other < unit {
                rank += 1u32;
            }
        }
    }
    if row < n {
        ranks[row] = I::cast_from(rank);
        // The code's last row in the block writes the block's count.
        if rank + 1u32 == count {
            block_counts[block * k + code] = I::cast_from(count);
        }
    }
}

/// See the module docs of `path/kernel`. `block_counts` `[B, K]` (turned into each block's
/// first place among its code's rows), `starts` `[K + 1]` (each code's first place in the
/// sorted order, then `N`), `counts` `[K]`; one cube of 256 units. With `with_total`, also
/// the sum of the search's per-cube squared errors `partials` `[C]` into `total` `[1]`, as
/// [`total_kernel`] sums them: the level's loss rides on this one-cube launch instead of
/// taking its own.
#[cube(launch)]
pub(crate) fn offsets_kernel<F: Float, I: Int>(
    block_counts: &mut Tensor<I>,
    starts: &mut Tensor<I>,
    counts: &mut Tensor<F>,
    partials: &Tensor<F>,
    total: &mut Tensor<F>,
    #[comptime] with_total: bool,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let blocks = block_counts.shape(0);
    let k = block_counts.shape(1);
    let unit = UNIT_POS as usize;
    if with_total {
        let sum = cube_sum(partials, unit);
        if unit == 0 {
            total[0] = sum;
        }
    }
    // Per code: an exclusive prefix sum over the blocks, and the total (kept in `starts`).
    let mut code = unit;
    while code < k {
        let mut running = 0u32;
        for block in 0..blocks {
            let count = u32::cast_from(block_counts[block * k + code]);
            block_counts[block * k + code] = I::cast_from(running);
            running += count;
        }
        starts[code] = I::cast_from(running);
        counts[code] = F::cast_from(running);
        code += 256;
    }
    sync_storage();
    // An exclusive prefix sum over the codes: each unit sums a run of codes, one unit scans
    // the 256 runs' sums, then each unit writes its run's places.
    let run = k.div_ceil(256usize);
    let first = unit * run;
    let mut end = first + run;
    if end > k {
        end = k;
    }
    let mut sum = 0u32;
    let mut code = first;
    while code < end {
        sum += u32::cast_from(starts[code]);
        code += 1;
    }
    let mut run_starts = Shared::<[u32]>::new_slice(256usize);
    run_starts[unit] = sum;
    sync_cube();
    if unit == 0 {
        let mut running = 0u32;
        for other in 0..256usize {
            let sum = run_starts[other];
            run_starts[other] = running;
            running += sum;
        }
        starts[k] = I::cast_from(running);
    }
    sync_cube();
    let mut running = run_starts[unit];
    let mut code = first;
    while code < end {
        let total = u32::cast_from(starts[code]);
        starts[code] = I::cast_from(running);
        running += total;
        code += 1;
    }
}

/// See the module docs of `path/kernel`. `indices`, `ranks` `[N]`, `block_counts` `[B, K]` and
/// `starts` `[K + 1]` as [`offsets_kernel`] left them, `order` `[N]`; one unit per row.
///
/// Every row's index at its place in the rows sorted by code, stably (row order within a
/// code).
#[cube(launch)]
pub(crate) fn scatter_kernel<I: Int>(
    indices: &Tensor<I>,
    ranks: &Tensor<I>,
    block_counts: &Tensor<I>,
    starts: &Tensor<I>,
    order: &mut Tensor<I>,
    #[define(I)] _dtype: ElemType,
) {
    let n = indices.shape(0);
    let k = block_counts.shape(1);
    let row = ABSOLUTE_POS;
    if row < n {
        let code = usize::cast_from(indices[row]);
        let place = usize::cast_from(starts[code])
            + usize::cast_from(block_counts[(row / 256) * k + code])
            + usize::cast_from(ranks[row]);
        order[place] = I::cast_from(row);
    }
}

/// See the module docs of `path/kernel`. `rows` `[N, D]`, `order` `[N]` and `starts`
/// `[K + 1]` from [`scatter_kernel`], `sums` `[K, D]`; one cube per code, 64 units, each
/// summing `dims_per_unit` dimensions of the code's rows, in row order.
///
/// With `ema`, `sums` and `counts` `[K]` receive the EMA state `state_sums` `[K, D]` and
/// `state_counts` `[K]` updated by the batch's sums and counts, `state decay + batch rest`
/// (`rest = 1 - decay`, as `path::ema`; equal within rounding, as a driver may fuse the
/// multiply and add), or the state itself
/// where `skip` `[1]` is set (a batch with a NaN or an infinity); without, the batch's sums,
/// and `state_counts`, `state_sums`, `skip` and `counts` are not touched.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn code_sums_kernel<F: Float, I: Int, B: Int>(
    rows: &Tensor<F>,
    order: &Tensor<I>,
    starts: &Tensor<I>,
    sums: &mut Tensor<F>,
    state_counts: &Tensor<F>,
    state_sums: &Tensor<F>,
    skip: &Tensor<B>,
    counts: &mut Tensor<F>,
    decay: InputScalar,
    rest: InputScalar,
    #[comptime] dims_per_unit: usize,
    #[comptime] ema: bool,
    #[define(F, I, B)] _dtypes: [ElemType; 3],
) {
    let d = rows.shape(1);
    let k = sums.shape(0);
    let code = CUBE_POS;
    let unit = UNIT_POS as usize;
    if code < k {
        let mut acc = Array::<F>::new(dims_per_unit);
        #[unroll]
        for t in 0..dims_per_unit {
            acc[t] = F::new(0.0);
        }
        let start = usize::cast_from(starts[code]);
        let end = usize::cast_from(starts[code + 1]);
        let mut place = start;
        while place < end {
            let row = usize::cast_from(order[place]);
            #[unroll]
            for t in 0..dims_per_unit {
                let dim = unit + t * 64;
                if dim < d {
                    acc[t] += rows[row * d + dim];
                }
            }
            place += 1;
        }
        if ema {
            let (g, r) = (decay.get::<F>(), rest.get::<F>());
            let keep = skip[0] != B::cast_from(0u32);
            #[unroll]
            for t in 0..dims_per_unit {
                let dim = unit + t * 64;
                if dim < d {
                    let old = state_sums[code * d + dim];
                    sums[code * d + dim] = select(keep, old, old * g + acc[t] * r);
                }
            }
            if unit == 0 {
                let old = state_counts[code];
                let batch = F::cast_from(end - start);
                counts[code] = select(keep, old, old * g + batch * r);
            }
        } else {
            #[unroll]
            for t in 0..dims_per_unit {
                let dim = unit + t * 64;
                if dim < d {
                    sums[code * d + dim] = acc[t];
                }
            }
        }
    }
}

/// See the module docs of `path/kernel`. `codebooks` `[sum K, D]`, `offsets` `[M]`, `indices` `[M, N]`,
/// `out` `[N, D]`; one unit per output value.
#[cube(launch)]
pub(crate) fn decode_kernel<F: Float, I: Int>(
    codebooks: &Tensor<F>,
    offsets: &Tensor<I>,
    indices: &Tensor<I>,
    out: &mut Tensor<F>,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let n = out.shape(0);
    let d = out.shape(1);
    let levels = indices.shape(0);
    let position = ABSOLUTE_POS;
    if position < n * d {
        let (i, j) = (position / d, position % d);
        let first = usize::cast_from(offsets[0]) + usize::cast_from(indices[i]);
        let mut sum = codebooks[first * d + j];
        for level in 1..levels {
            let row = usize::cast_from(offsets[level]) + usize::cast_from(indices[level * n + i]);
            sum += codebooks[row * d + j];
        }
        out[position] = sum;
    }
}

/// Sums each group of `2 width` values of `values` into the group's first, halving: the unit
/// at `slot`, `position` places into its group, adds `values[slot + w]` for `w = width,
/// width / 2, ..., 1` while `position < w`, with a cube barrier after each step (every unit
/// of the cube calls it).
#[cube]
pub(super) fn tree_sum<F: Float>(
    values: &mut Shared<[F]>,
    slot: usize,
    position: usize,
    width: usize,
) {
    let mut width = width;
    while width > 0 {
        if position < width {
            let other = values[slot + width];
            values[slot] += other;
        }
        sync_cube();
        width /= 2;
    }
}

/// The sum of `values` (a strided sum per unit, then a tree over the units), the same in
/// every unit of a cube of 256 units (every unit calls it; the launches assert their sizes).
#[cube]
fn cube_sum<F: Float>(values: &Tensor<F>, unit: usize) -> F {
    let len = values.len();
    let mut sum = F::new(0.0);
    let mut position = unit;
    while position < len {
        sum += values[position];
        position += 256;
    }
    let mut partial = Shared::<[F]>::new_slice(256usize);
    partial[unit] = sum;
    sync_cube();
    tree_sum(&mut partial, unit, unit, 128usize);
    partial[0]
}
