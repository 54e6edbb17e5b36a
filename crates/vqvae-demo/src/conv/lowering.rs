//! 2-d convolutions and their gradients as matrix products on host memory (im2col lowering),
//! for Burn's CPU backend (`conv/flex.rs`).
//!
//! Every operation is written against one regular convolution between an *image*
//! `[C, H, W]` and its *grid* of patches `[Ho, Wo]` ([`Patches`]): a convolution reads the
//! image (its input) and writes the grid, a transposed convolution reads the grid (its input)
//! and writes the image. `im2col` turns an image into the matrix `[C·kh·kw, Ho·Wo]` of its
//! patches, `col2im` adds such a matrix back into an image. With them:
//!
//! - convolution: `y = W · im2col(x)`, `dW = dy · im2col(x)ᵀ`, `dx = col2im(Wᵀ · dy)`;
//! - transposed convolution: `y = col2im(Wᵀ · x)`, `dx = W · im2col(dy)`,
//!   `dW = x · im2col(dy)ᵀ`;
//! - bias: added to `y`, its gradient the sum of `dy` over images and positions.
//!
//! A batch is cut into blocks of images, as many as keep a block's patch matrix in the core's
//! cache; each block lays its images side by side as the columns of one product (the gemm
//! crate, single-threaded), so the products are wide even where one image has 49 positions.
//! The blocks run in parallel on rayon, and each thread keeps its work buffers between calls.

use rayon::prelude::*;

mod patches;
mod spread;

pub(super) use patches::Patches;

/// A matrix view for [`product`]: values, row stride, column stride.
#[derive(Clone, Copy)]
pub(super) struct View<'a> {
    data: &'a [f32],
    row_stride: usize,
    col_stride: usize,
}

impl<'a> View<'a> {
    pub(super) fn rows(data: &'a [f32], width: usize) -> Self {
        Self {
            data,
            row_stride: width,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major matrix with `width` columns.
    pub(super) fn transposed(data: &'a [f32], width: usize) -> Self {
        Self {
            data,
            row_stride: 1,
            col_stride: width,
        }
    }

    fn check(&self, rows: usize, cols: usize) {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * self.row_stride + (cols - 1) * self.col_stride;
            assert!(last < self.data.len(), "matrix view out of bounds");
        }
    }
}

/// `dst[m × n] (row-major) = (dst if accumulate) + lhs[m × k] · rhs[k × n]`, single-threaded.
pub(super) fn product(
    dst: &mut [f32],
    [m, n, k]: [usize; 3],
    lhs: View,
    rhs: View,
    accumulate: bool,
) {
    assert!(dst.len() >= m * n, "product destination too small");
    lhs.check(m, k);
    rhs.check(k, n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    // SAFETY: the three views were checked to hold every element the product reads or
    // writes; `dst` is borrowed mutably, so it overlaps neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// `[n, C, P]` (images) into `out` `[C, n·P]` (channels, the images' positions side by side).
pub(super) fn channels_major(src: &[f32], channels: usize, cells: usize, out: &mut [f32]) {
    let images = src.len() / (channels * cells);
    for b in 0..images {
        for c in 0..channels {
            out[(c * images + b) * cells..][..cells]
                .copy_from_slice(&src[(b * channels + c) * cells..][..cells]);
        }
    }
}

/// The inverse of [`channels_major`], into `dst` `[n, C, P]`, adding `bias[c]` if given.
pub(super) fn images_major(
    src: &[f32],
    channels: usize,
    cells: usize,
    bias: Option<&[f32]>,
    dst: &mut [f32],
) {
    let images = dst.len() / (channels * cells);
    for b in 0..images {
        for c in 0..channels {
            let add = bias.map_or(0.0, |bias| bias[c]);
            let from = &src[(c * images + b) * cells..][..cells];
            for (d, s) in dst[(b * channels + c) * cells..][..cells]
                .iter_mut()
                .zip(from)
            {
                *d = s + add;
            }
        }
    }
}

/// Values of the patch matrix a block of images should fill at most: the block's patches,
/// product and output then stay in the core's cache between the steps that write and read
/// them.
const BLOCK_VALUES: usize = 1 << 16;

/// Images per block for `per_image` patch-matrix values each.
pub(super) fn block_images(per_image: usize) -> usize {
    (BLOCK_VALUES / per_image.max(1)).max(1)
}

thread_local! {
    /// Each thread's two work buffers, kept from call to call.
    static BUFFERS: std::cell::RefCell<[Vec<f32>; 2]> = const { std::cell::RefCell::new([Vec::new(), Vec::new()]) };
}

/// Runs `work` on this thread's two work buffers, `a` and `b` values long. Their contents are
/// left from earlier calls: `work` writes every value before it reads it.
pub(super) fn with_buffers<R>(
    a: usize,
    b: usize,
    work: impl FnOnce(&mut [f32], &mut [f32]) -> R,
) -> R {
    BUFFERS.with(|buffers| {
        let mut buffers = buffers.borrow_mut();
        let [first, second] = &mut *buffers;
        for (buffer, len) in [(&mut *first, a), (&mut *second, b)] {
            if buffer.len() < len {
                buffer.resize(len, 0.0);
            }
        }
        work(&mut first[..a], &mut second[..b])
    })
}

/// Sets each channel of `out` (`[C, plane]`) to its bias: where an output is summed into
/// rather than written.
pub(super) fn fill_bias(out: &mut [f32], plane: usize, bias: &[f32]) {
    for (channel, value) in out.chunks_mut(plane).zip(bias) {
        channel.fill(*value);
    }
}

/// Per-channel sums of `dy` `[B, C, P]`.
pub(super) fn bias_gradient(dy: &[f32], channels: usize, cells: usize) -> Vec<f32> {
    let mut sums = vec![0.0f64; channels];
    for (i, plane) in dy.chunks(cells).enumerate() {
        sums[i % channels] += plane.iter().map(|&v| v as f64).sum::<f64>();
    }
    sums.into_iter().map(|s| s as f32).collect()
}

/// The gradients a backward step asks for.
#[derive(Debug, Default)]
pub(super) struct Gradients {
    pub input: Option<Vec<f32>>,
    pub weight: Option<Vec<f32>>,
    pub bias: Option<Vec<f32>>,
}

/// Which gradients to compute.
#[derive(Debug, Clone, Copy)]
pub(super) struct Wanted {
    pub input: bool,
    pub weight: bool,
    pub bias: bool,
}

/// Runs `work(x, y)` over blocks of `per` images in parallel, `x` with `x_image` values per
/// image, the output with `y_image`; returns the output.
pub(super) fn forward_blocks(
    x: &[f32],
    [x_image, y_image]: [usize; 2],
    per: usize,
    work: impl Fn(&[f32], &mut [f32]) + Sync + Send,
) -> Vec<f32> {
    let mut y = vec![0.0; x.len() / x_image * y_image];
    y.par_chunks_mut(per * y_image)
        .zip(x.par_chunks(per * x_image))
        .for_each(|(y, x)| work(x, y));
    y
}

/// Groups of blocks whose weight gradients a backward pass sums separately, then in order.
const GROUPS: usize = 8;

/// Values per task of the final sum of the groups' weight gradients.
const SUM_CHUNK: usize = 4096;

/// One block of images of a backward pass.
pub(super) struct Block<'a> {
    /// The input and output gradient of the block's images.
    pub x: &'a [f32],
    pub dy: &'a [f32],
    /// The input gradient to write, when wanted.
    pub dx: Option<&'a mut [f32]>,
    /// The weight gradient to add to, when wanted (empty otherwise).
    pub dw: &'a mut Vec<f32>,
}

/// Runs `work` over blocks of `per` images in parallel (`x` with `x_image` values per image,
/// `dy` with `dy_image`) and returns the input gradient (empty unless wanted) and the sum of the
/// blocks' weight gradients (`dw_len` values, empty unless wanted).
pub(super) fn backward_blocks(
    (x, dy): (&[f32], &[f32]),
    [x_image, dy_image]: [usize; 2],
    per: usize,
    wanted: Wanted,
    dw_len: usize,
    work: impl Fn(Block) + Sync + Send,
) -> (Vec<f32>, Vec<f32>) {
    let mut dx = vec![0.0; if wanted.input { x.len() } else { 0 }];
    let blocks: Vec<Option<&mut [f32]>> = if wanted.input {
        dx.chunks_mut(per * x_image).map(Some).collect()
    } else {
        (0..x.len().div_ceil(per * x_image)).map(|_| None).collect()
    };
    let dw_len = if wanted.weight { dw_len } else { 0 };
    // A fixed grouping of the blocks, each group summed in order and the groups in order: the
    // same floats on every run and every thread count (rayon's own fold would group them by
    // how its threads happened to steal the work), so a seeded run trains the same weights.
    let per_group = blocks.len().div_ceil(GROUPS).max(1);
    let partials: Vec<Vec<f32>> = blocks
        .into_par_iter()
        .zip(x.par_chunks(per * x_image))
        .zip(dy.par_chunks(per * dy_image))
        .chunks(per_group)
        .map(|group| {
            let mut dw = vec![0.0; dw_len];
            for ((dx, x), dy) in group {
                work(Block {
                    x,
                    dy,
                    dx,
                    dw: &mut dw,
                });
            }
            dw
        })
        .collect();
    // Each value sums the groups in order; the values themselves in parallel.
    let mut dw = vec![0.0; dw_len];
    dw.par_chunks_mut(SUM_CHUNK)
        .enumerate()
        .for_each(|(i, out)| {
            for partial in &partials {
                for (total, value) in out.iter_mut().zip(&partial[i * SUM_CHUNK..]) {
                    *total += value;
                }
            }
        });
    (dx, dw)
}

/// A convolution: `x` `[B, C, H, W]` (the image side of `g`), `weight` `[Co, C, kh, kw]`,
/// `bias` `[Co]`; returns `[B, Co, Ho, Wo]`.
pub(super) fn conv2d(g: &Patches, x: &[f32], weight: &[f32], bias: &[f32], co: usize) -> Vec<f32> {
    if g.spreads(co) {
        return spread::conv2d(g, x, weight, bias, co);
    }
    let (rows, cells) = (g.rows(), g.cells());
    let per = block_images(rows * cells);
    forward_blocks(x, [g.image_len(), co * cells], per, |x, y| {
        let width = x.len() / g.image_len() * cells;
        with_buffers(rows * width, co * width, |cols, out| {
            for (b, image) in x.chunks(g.image_len()).enumerate() {
                g.im2col(image, cols, width, b * cells);
            }
            product(
                out,
                [co, width, rows],
                View::rows(weight, rows),
                View::rows(cols, width),
                false,
            );
            images_major(out, co, cells, Some(bias), y);
        });
    })
}

/// The gradients of [`conv2d`] for the output gradient `dy` `[B, Co, Ho, Wo]`.
pub(super) fn conv2d_backward(
    g: &Patches,
    x: &[f32],
    weight: &[f32],
    dy: &[f32],
    co: usize,
    wanted: Wanted,
) -> Gradients {
    if g.spreads(co) {
        return spread::conv2d_backward(g, x, weight, dy, co, wanted);
    }
    let (rows, cells) = (g.rows(), g.cells());
    let per = block_images(rows * cells);
    let sizes = [g.image_len(), co * cells];
    let (dx, dw) = backward_blocks((x, dy), sizes, per, wanted, co * rows, |block| {
        let width = block.x.len() / g.image_len() * cells;
        with_buffers(rows * width, co * width, |cols, dy_rows| {
            channels_major(block.dy, co, cells, dy_rows);
            if wanted.weight {
                for (b, image) in block.x.chunks(g.image_len()).enumerate() {
                    g.im2col(image, cols, width, b * cells);
                }
                product(
                    block.dw,
                    [co, rows, width],
                    View::rows(dy_rows, width),
                    View::transposed(cols, width),
                    true,
                );
            }
            if let Some(dx) = block.dx {
                product(
                    cols,
                    [rows, width, co],
                    View::transposed(weight, rows),
                    View::rows(dy_rows, width),
                    false,
                );
                for (b, image) in dx.chunks_mut(g.image_len()).enumerate() {
                    g.col2im(cols, width, b * cells, image);
                }
            }
        });
    });
    Gradients {
        input: wanted.input.then_some(dx),
        weight: wanted.weight.then_some(dw),
        bias: wanted.bias.then(|| bias_gradient(dy, co, cells)),
    }
}

/// A transposed convolution: `x` `[B, Ci, Hi, Wi]` (the grid side of `g`), `weight`
/// `[Ci, C, kh, kw]`, `bias` `[C]`; returns `[B, C, H, W]` (the image side).
pub(super) fn conv_transpose2d(
    g: &Patches,
    x: &[f32],
    weight: &[f32],
    bias: &[f32],
    ci: usize,
) -> Vec<f32> {
    let (rows, cells) = (g.rows(), g.cells());
    let per = block_images(rows * cells);
    let plane = g.image[0] * g.image[1];
    forward_blocks(x, [ci * cells, g.image_len()], per, |x, y| {
        let width = x.len() / (ci * cells) * cells;
        with_buffers(rows * width, ci * width, |cols, x_rows| {
            channels_major(x, ci, cells, x_rows);
            product(
                cols,
                [rows, width, ci],
                View::transposed(weight, rows),
                View::rows(x_rows, width),
                false,
            );
            for (b, image) in y.chunks_mut(g.image_len()).enumerate() {
                fill_bias(image, plane, bias);
                g.col2im(cols, width, b * cells, image);
            }
        });
    })
}

/// The gradients of [`conv_transpose2d`] for the output gradient `dy` `[B, C, H, W]`.
pub(super) fn conv_transpose2d_backward(
    g: &Patches,
    x: &[f32],
    weight: &[f32],
    dy: &[f32],
    ci: usize,
    wanted: Wanted,
) -> Gradients {
    let (rows, cells) = (g.rows(), g.cells());
    let per = block_images(rows * cells);
    let sizes = [ci * cells, g.image_len()];
    let (dx, dw) = backward_blocks((x, dy), sizes, per, wanted, ci * rows, |block| {
        let width = block.x.len() / (ci * cells) * cells;
        with_buffers(rows * width, ci * width, |cols, rows_buffer| {
            for (b, image) in block.dy.chunks(g.image_len()).enumerate() {
                g.im2col(image, cols, width, b * cells);
            }
            if let Some(dx) = block.dx {
                product(
                    rows_buffer,
                    [ci, width, rows],
                    View::rows(weight, rows),
                    View::rows(cols, width),
                    false,
                );
                images_major(rows_buffer, ci, cells, None, dx);
            }
            if wanted.weight {
                channels_major(block.x, ci, cells, rows_buffer);
                product(
                    block.dw,
                    [ci, rows, width],
                    View::rows(rows_buffer, width),
                    View::transposed(cols, width),
                    true,
                );
            }
        });
    });
    Gradients {
        input: wanted.input.then_some(dx),
        weight: wanted.weight.then_some(dw),
        bias: wanted
            .bias
            .then(|| bias_gradient(dy, g.channels, g.image[0] * g.image[1])),
    }
}
