//! The kernel path's CubeCL kernels (see the module docs of `path/kernel`), in CubeCL's own
//! language: its `Tensor` and `Int` are not Burn's.

use cubecl::prelude::*;

/// See the module docs of `path/kernel`. `rows` `[N, D]`, `codebook` `[K, D]`, `norms` `[K]`, `indices` `[N]`;
/// 256 units per cube, 64 rows per cube.
#[cube(launch)]
pub(crate) fn nearest_kernel<F: Float, I: Int>(
    rows: &Tensor<F>,
    codebook: &Tensor<F>,
    norms: &Tensor<F>,
    indices: &mut Tensor<I>,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let n = rows.shape(0);
    let d = rows.shape(1);
    let k = codebook.shape(0);
    let unit = UNIT_POS as usize;
    // This unit's 4 rows (of the cube's 64) and 4 codes (of each tile's 64).
    let row_lane = unit / 16;
    let code_lane = unit % 16;
    let first_row = CUBE_POS * 64;
    // Tiles of 64 rows (codes) x 16 dimensions, row-major with a stride of 17: the 16
    // units reading 16 codes' values of one dimension hit 16 different banks.
    let mut row_tile = Shared::<[F]>::new_slice(1088usize);
    let mut code_tile = Shared::<[F]>::new_slice(1088usize);
    let mut best = Array::<F>::new(4usize);
    let mut best_code = Array::<u32>::new(4usize);
    #[unroll]
    for i in 0..4usize {
        best[i] = F::max_value();
        best_code[i] = 0u32;
    }
    let mut first_code = 0usize;
    while first_code < k {
        let mut products = Array::<F>::new(16usize);
        #[unroll]
        for p in 0..16usize {
            products[p] = F::new(0.0);
        }
        let mut first_dim = 0usize;
        while first_dim < d {
            #[unroll]
            for s in 0..4usize {
                let e = unit + s * 256;
                let (r, c) = (e / 16, e % 16);
                let dim = first_dim + c;
                let mut value = F::new(0.0);
                if first_row + r < n && dim < d {
                    value = rows[(first_row + r) * d + dim];
                }
                row_tile[r * 17 + c] = value;
                let mut code_value = F::new(0.0);
                if first_code + r < k && dim < d {
                    code_value = codebook[(first_code + r) * d + dim];
                }
                code_tile[r * 17 + c] = code_value;
            }
            sync_cube();
            #[unroll]
            for c in 0..16usize {
                let mut a = Array::<F>::new(4usize);
                let mut b = Array::<F>::new(4usize);
                #[unroll]
                for i in 0..4usize {
                    a[i] = row_tile[(row_lane * 4 + i) * 17 + c];
                    b[i] = code_tile[(code_lane * 4 + i) * 17 + c];
                }
                #[unroll]
                for i in 0..4usize {
                    #[unroll]
                    for j in 0..4usize {
                        products[i * 4 + j] += a[i] * b[j];
                    }
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
                    let distance = norm + F::new(-2.0) * products[i * 4 + j];
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
    let mut lane_codes = Shared::<[u32]>::new_slice(1024usize);
    #[unroll]
    for i in 0..4usize {
        let slot = (row_lane * 4 + i) * 16 + code_lane;
        row_tile[slot] = best[i];
        lane_codes[slot] = best_code[i];
    }
    sync_cube();
    if unit < 64 {
        let row = first_row + unit;
        if row < n {
            let mut distance = row_tile[unit * 16];
            let mut code = lane_codes[unit * 16];
            for lane in 1..16usize {
                let other = row_tile[unit * 16 + lane];
                let other_code = lane_codes[unit * 16 + lane];
                if other < distance || (other == distance && other_code < code) {
                    distance = other;
                    code = other_code;
                }
            }
            indices[row] = I::cast_from(code);
        }
    }
}

/// See the module docs of `path/kernel`. `rows` `[N, D]`, `indices` `[N]`, `counts` `[K]`, `sums` `[K, D]`;
/// one cube per code, 64 units, each summing `dims_per_unit` dimensions.
#[cube(launch)]
pub(crate) fn statistics_kernel<F: Float, I: Int>(
    rows: &Tensor<F>,
    indices: &Tensor<I>,
    counts: &mut Tensor<F>,
    sums: &mut Tensor<F>,
    #[comptime] dims_per_unit: usize,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let n = rows.shape(0);
    let d = rows.shape(1);
    let k = counts.shape(0);
    let code = CUBE_POS;
    let unit = UNIT_POS as usize;
    let mut chunk = Shared::<[I]>::new_slice(64usize);
    let mut acc = Array::<F>::new(dims_per_unit);
    #[unroll]
    for t in 0..dims_per_unit {
        acc[t] = F::new(0.0);
    }
    let mut count = 0u32;
    let target = I::cast_from(code);
    let mut start = 0usize;
    while start < n {
        // Index K (no code) pads the last chunk.
        let mut index = I::cast_from(k);
        if start + unit < n {
            index = indices[start + unit];
        }
        chunk[unit] = index;
        sync_cube();
        let mut len = n - start;
        if len > 64 {
            len = 64usize;
        }
        for e in 0..len {
            if chunk[e] == target {
                count += 1u32;
                #[unroll]
                for t in 0..dims_per_unit {
                    let dim = unit + t * 64;
                    if dim < d {
                        acc[t] += rows[(start + e) * d + dim];
                    }
                }
            }
        }
        sync_cube();
        start += 64;
    }
    if code < k {
        #[unroll]
        for t in 0..dims_per_unit {
            let dim = unit + t * 64;
            if dim < d {
                sums[code * d + dim] = acc[t];
            }
        }
        if unit == 0 {
            counts[code] = F::cast_from(count);
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
