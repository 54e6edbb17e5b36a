//! The search's CubeCL kernels (see the module docs of `path/kernel`): each row's nearest
//! code by tiles in shared memory, whole or split over the codes, and the level's epilogue.

use cubecl::prelude::*;

use super::kernels::tree_sum;

/// Four values of one dimension: 4 rows' (codes') in the search's tiles, one unit's 4 rows'
/// distances in its last agreement.
type Quad<F> = Vector<F, Const<4>>;

/// See the module docs of `path/kernel`. `rows` `[N, D]`, `codebook` `[K, D]`, `norms` `[K]`,
/// `indices` `[N]`, `next` `[N, D]`; with `running`, `quantized_in`, `residuals_in` (unread
/// at the `first` level), `quantized_out` and `residuals_out` `[N, D]`; with
/// `squared_error`, `partials` `[ceil(N / 64)]`; the `[N, D]`, `[K, D]` tensors read and
/// written in vectors of `V` values (`V` divides D: 4, 2 or 1); 256 units per cube, 64 rows
/// per cube.
///
/// Each row's nearest code, then the level's epilogue on the cube's rows: `next = rows -
/// codebook[code]`, the running sums (`quantized_in + codebook[code]`, `residuals_in + next`,
/// or those terms alone at the first level), and the cube's sum of `next^2`. With `split`,
/// the cubes along `z` take the codes in `S` splits of `codes_per_split` (whole tiles; unread
/// without `split`), and each writes its
/// split's least distance and first code at it into `split_distances` and `split_codes`
/// `[S, N]` for [`merge_kernel`], which makes the epilogue. Launched unchecked: every global
/// read and write is guarded by the shapes (the epilogue's by the cube's rows), and every
/// shared index is within its tile by construction.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn nearest_kernel<F: Float, I: Int, V: Size>(
    rows: &Tensor<Vector<F, V>>,
    codebook: &Tensor<Vector<F, V>>,
    norms: &Tensor<F>,
    indices: &mut Tensor<I>,
    next: &mut Tensor<Vector<F, V>>,
    quantized_in: &Tensor<Vector<F, V>>,
    residuals_in: &Tensor<Vector<F, V>>,
    quantized_out: &mut Tensor<Vector<F, V>>,
    residuals_out: &mut Tensor<Vector<F, V>>,
    partials: &mut Tensor<F>,
    split_distances: &mut Tensor<F>,
    split_codes: &mut Tensor<I>,
    codes_per_split: usize,
    #[comptime] squared_error: bool,
    #[comptime] running: bool,
    #[comptime] first: bool,
    #[comptime] split: bool,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let n = rows.shape(0);
    let d = rows.shape(1);
    let v = rows.vector_size();
    let unit = UNIT_POS as usize;
    let row_cube = row_cube();
    let first_row = row_cube * 64;
    if first_row >= n {
        terminate!();
    }
    // The codes this cube compares: all, or its split's `codes_per_split` (whole tiles).
    let mut first_code = 0usize;
    let mut k = codebook.shape(0);
    if split {
        first_code = CUBE_POS_Z as usize * codes_per_split;
        k = select(
            first_code + codes_per_split < k,
            first_code + codes_per_split,
            k,
        );
    }
    // This unit's 4 rows (of the cube's 64: 4 row_lane + i) and 4 codes (of each tile's 64:
    // 4 code_lane + j).
    let row_lane = unit / 16;
    let code_lane = unit % 16;
    // Tiles of 16 dimensions x 64 rows (codes), dimension-major, 4 rows (codes) to a vector,
    // 17 vectors to a dimension. A unit's step reads one vector of each: the 16 code lanes of
    // a plane read 16 consecutive vectors, its two row lanes two (a broadcast); one shared
    // load for every 8 multiply-adds.
    let mut row_tile = Shared::<[Quad<F>]>::new_slice(272usize);
    let mut code_tile = Shared::<[Quad<F>]>::new_slice(272usize);
    let mut best = Array::<F>::new(4usize);
    let mut best_code = Array::<u32>::new(4usize);
    #[unroll]
    for i in 0..4usize {
        best[i] = F::max_value();
        best_code[i] = 0u32;
    }
    while first_code < k {
        let mut products = Array::<Quad<F>>::new(4usize);
        #[unroll]
        for i in 0..4usize {
            products[i] = Quad::<F>::broadcast(F::new(0.0));
        }
        let mut first_dim = 0usize;
        while first_dim < d {
            // Units 0-63 load the rows' tile, 64-127 the codes': each a block of 4 rows
            // (codes) by 4 dimensions, in vectors along the dimensions (the global reads of a
            // plane: 8 rows' 16 consecutive values), turned into 4 vectors along the rows.
            if unit < 128 {
                let block = unit % 64;
                let (item_block, dim_block) = (block / 4, block % 4);
                let dim = first_dim + dim_block * 4;
                let mut values = Array::<F>::new(16usize);
                #[unroll]
                for i in 0..4usize {
                    let item = item_block * 4 + i;
                    #[unroll]
                    for w in 0..comptime!(4 / v) {
                        let at = dim + w * v;
                        let mut value = Vector::<F, V>::broadcast(F::new(0.0));
                        if unit < 64 {
                            if first_row + item < n && at < d {
                                value = rows[((first_row + item) * d + at) / v];
                            }
                        } else if first_code + item < k && at < d {
                            value = codebook[((first_code + item) * d + at) / v];
                        }
                        #[unroll]
                        for e in 0..v {
                            values[i * 4 + w * v + e] = value.extract(e);
                        }
                    }
                }
                #[unroll]
                for t in 0..4usize {
                    let mut column = Quad::<F>::empty();
                    #[unroll]
                    for i in 0..4usize {
                        column.insert(i, values[i * 4 + t]);
                    }
                    let slot = (dim_block * 4 + t) * 17 + item_block;
                    if unit < 64 {
                        row_tile[slot] = column;
                    } else {
                        code_tile[slot] = column;
                    }
                }
            }
            sync_cube();
            #[unroll]
            for c in 0..16usize {
                let a = row_tile[c * 17 + row_lane];
                let b = code_tile[c * 17 + code_lane];
                #[unroll]
                for i in 0..4usize {
                    products[i] += Quad::<F>::broadcast(a.extract(i)) * b;
                }
            }
            sync_cube();
            first_dim += 16;
        }
        // ||e||^2 - 2 r.e, code by code in increasing order: strict < keeps the first minimum.
        #[unroll]
        for j in 0..4usize {
            let code = first_code + code_lane * 4 + j;
            if code < k {
                let norm = norms[code];
                #[unroll]
                for i in 0..4usize {
                    let distance = norm + F::new(-2.0) * products[i].extract(j);
                    if distance < best[i] {
                        best[i] = distance;
                        best_code[i] = code as u32;
                    }
                }
            }
        }
        first_code += 64;
    }
    // The 16 code lanes of each row agree: the least distance, the lowest code among equals.
    // A unit's 4 distances go in one vector of the rows' tile (`16 row_lane + code_lane`).
    let mut lane_codes = Shared::<[u32]>::new_slice(1024usize);
    let mut distances = Quad::<F>::empty();
    #[unroll]
    for i in 0..4usize {
        distances.insert(i, best[i]);
        lane_codes[(row_lane * 4 + i) * 16 + code_lane] = best_code[i];
    }
    row_tile[row_lane * 16 + code_lane] = distances;
    sync_cube();
    let mut row_codes = Shared::<[u32]>::new_slice(64usize);
    if unit < 64 {
        let (quad, place) = (unit / 4 * 16, unit % 4);
        let mut distance = row_tile[quad].extract_dynamic(place);
        let mut code = lane_codes[unit * 16];
        for lane in 1..16usize {
            let other = row_tile[quad + lane].extract_dynamic(place);
            let other_code = lane_codes[unit * 16 + lane];
            if other < distance || (other == distance && other_code < code) {
                distance = other;
                code = other_code;
            }
        }
        row_codes[unit] = code;
        let row = first_row + unit;
        if row < n {
            if split {
                let at = CUBE_POS_Z as usize * n + row;
                split_distances[at] = distance;
                split_codes[at] = I::cast_from(code);
            } else {
                indices[row] = I::cast_from(code);
            }
        }
    }
    if !split {
        sync_cube();
        epilogue(
            rows,
            codebook,
            &row_codes,
            next,
            quantized_in,
            residuals_in,
            quantized_out,
            residuals_out,
            partials,
            row_cube,
            squared_error,
            running,
            first,
        );
    }
}

/// See the module docs of `path/kernel`. The search split over codes: `split_distances` and
/// `split_codes` `[S, N]` (each split's least distance and first code at it, splits in code
/// order); the rest as [`nearest_kernel`]'s. One cube of 256 units per 64 rows.
///
/// Each row's code: the split with the least distance, the first among equals (so the first
/// minimum over all codes, as the whole search gives), then the search's epilogue.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn merge_kernel<F: Float, I: Int, V: Size>(
    rows: &Tensor<Vector<F, V>>,
    codebook: &Tensor<Vector<F, V>>,
    split_distances: &Tensor<F>,
    split_codes: &Tensor<I>,
    indices: &mut Tensor<I>,
    next: &mut Tensor<Vector<F, V>>,
    quantized_in: &Tensor<Vector<F, V>>,
    residuals_in: &Tensor<Vector<F, V>>,
    quantized_out: &mut Tensor<Vector<F, V>>,
    residuals_out: &mut Tensor<Vector<F, V>>,
    partials: &mut Tensor<F>,
    #[comptime] squared_error: bool,
    #[comptime] running: bool,
    #[comptime] first: bool,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let n = rows.shape(0);
    let unit = UNIT_POS as usize;
    let row_cube = row_cube();
    let first_row = row_cube * 64;
    if first_row >= n {
        terminate!();
    }
    let mut row_codes = Shared::<[u32]>::new_slice(64usize);
    let row = first_row + unit;
    if unit < 64 && row < n {
        let splits = split_codes.shape(0);
        let mut distance = split_distances[row];
        let mut code = split_codes[row];
        for split in 1..splits {
            let other = split_distances[split * n + row];
            if other < distance {
                distance = other;
                code = split_codes[split * n + row];
            }
        }
        row_codes[unit] = u32::cast_from(code);
        indices[row] = code;
    }
    sync_cube();
    epilogue(
        rows,
        codebook,
        &row_codes,
        next,
        quantized_in,
        residuals_in,
        quantized_out,
        residuals_out,
        partials,
        row_cube,
        squared_error,
        running,
        first,
    );
}

/// The cube's block of 64 rows: the launches spread the blocks over `x` and `y` (`z` counts
/// a split search's splits).
#[cube]
fn row_cube() -> usize {
    CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize
}

/// The search's epilogue over the vectors of the 64 rows from `row_cube * 64` with codes
/// `row_codes`: the chosen code gathered, the next residual, the running sums, and the
/// cube's sum of the residual's squares into `partials[row_cube]` (every unit calls it).
#[cube]
#[allow(clippy::too_many_arguments)]
fn epilogue<F: Float, V: Size>(
    rows: &Tensor<Vector<F, V>>,
    codebook: &Tensor<Vector<F, V>>,
    row_codes: &Shared<[u32]>,
    next: &mut Tensor<Vector<F, V>>,
    quantized_in: &Tensor<Vector<F, V>>,
    residuals_in: &Tensor<Vector<F, V>>,
    quantized_out: &mut Tensor<Vector<F, V>>,
    residuals_out: &mut Tensor<Vector<F, V>>,
    partials: &mut Tensor<F>,
    row_cube: usize,
    #[comptime] squared_error: bool,
    #[comptime] running: bool,
    #[comptime] first: bool,
) {
    let n = rows.shape(0);
    let width = rows.shape(1) / rows.vector_size();
    let v = rows.vector_size();
    let unit = UNIT_POS as usize;
    let first_row = row_cube * 64;
    let mut squares = Vector::<F, V>::broadcast(F::new(0.0));
    let mut at = first_row * width + unit;
    let end = select(first_row + 64 < n, first_row + 64, n) * width;
    while at < end {
        let local = at / width - first_row;
        let chosen = codebook[usize::cast_from(row_codes[local]) * width + at % width];
        let left = rows[at] - chosen;
        next[at] = left;
        if squared_error {
            squares += left * left;
        }
        if running {
            if first {
                quantized_out[at] = chosen;
                residuals_out[at] = left;
            } else {
                quantized_out[at] = quantized_in[at] + chosen;
                residuals_out[at] = residuals_in[at] + left;
            }
        }
        at += 256;
    }
    if squared_error {
        let mut partial = Shared::<[F]>::new_slice(256usize);
        let mut sum = F::new(0.0);
        #[unroll]
        for e in 0..v {
            sum += squares.extract(e);
        }
        partial[unit] = sum;
        sync_cube();
        tree_sum(&mut partial, unit, unit, 128usize);
        if unit == 0 {
            partials[row_cube] = partial[0];
        }
    }
}
