//! A convolution lowered on its output side: for layers with fewer output than input
//! channels ([`Patches::spreads`]), whose im2col matrix would be the largest thing they move.
//!
//! With `Wg` the weight as `[Co·kh·kw, C]` and `x` as `[C, H·W]`:
//! - forward: `T = Wg · x`, then each output position collects the rows of `T` at the image
//!   positions its kernel offsets read ([`Patches::collect`]);
//! - backward: `U` = the output gradient spread over those image positions
//!   ([`Patches::spread`]), then `dx = Wgᵀ · U` and `dWg = U · xᵀ`.

use super::{
    Gradients, Patches, View, Wanted, backward_blocks, bias_gradient, block_images, channels_major,
    fill_bias, forward_blocks, images_major, product, with_buffers,
};

/// `weight` `[n, a, b]` as `[n, b, a]`: the weight `[Co, C, K]` as `[Co, K, C]` (`K` = kernel
/// positions) and back.
fn swap_inner(weight: &[f32], [n, a, b]: [usize; 3]) -> Vec<f32> {
    let mut out = vec![0.0; weight.len()];
    for o in 0..n {
        for i in 0..a {
            for j in 0..b {
                out[(o * b + j) * a + i] = weight[(o * a + i) * b + j];
            }
        }
    }
    out
}

/// The sizes both directions use.
struct Sizes {
    /// Input channels, kernel positions, image positions, grid positions.
    c: usize,
    k: usize,
    plane: usize,
    cells: usize,
    /// Rows of the spread matrix (`Co·K`), and images per block.
    rows: usize,
    per: usize,
}

impl Sizes {
    fn of(g: &Patches, co: usize) -> Self {
        let (k, plane) = (g.kernel[0] * g.kernel[1], g.image[0] * g.image[1]);
        Self {
            c: g.channels,
            k,
            plane,
            cells: g.cells(),
            rows: co * k,
            per: block_images(co * k * plane),
        }
    }
}

/// [`super::conv2d`] on the output side.
pub(super) fn conv2d(g: &Patches, x: &[f32], weight: &[f32], bias: &[f32], co: usize) -> Vec<f32> {
    let Sizes {
        c,
        k,
        plane,
        cells,
        rows,
        per,
    } = Sizes::of(g, co);
    let wg = swap_inner(weight, [co, c, k]);
    forward_blocks(x, [g.image_len(), co * cells], per, |x, y| {
        let width = x.len() / g.image_len() * plane;
        with_buffers(c * width, rows * width, |x_rows, t| {
            channels_major(x, c, plane, x_rows);
            product(
                t,
                [rows, width, c],
                View::rows(&wg, c),
                View::rows(x_rows, width),
                false,
            );
            for (b, out) in y.chunks_mut(co * cells).enumerate() {
                fill_bias(out, cells, bias);
                g.collect(co, t, width, b * plane, out);
            }
        });
    })
}

/// [`super::conv2d_backward`] on the output side.
pub(super) fn conv2d_backward(
    g: &Patches,
    x: &[f32],
    weight: &[f32],
    dy: &[f32],
    co: usize,
    wanted: Wanted,
) -> Gradients {
    let Sizes {
        c,
        k,
        plane,
        cells,
        rows,
        per,
    } = Sizes::of(g, co);
    let wg = swap_inner(weight, [co, c, k]);
    let sizes = [g.image_len(), co * cells];
    let (dx, dwg) = backward_blocks((x, dy), sizes, per, wanted, rows * c, |block| {
        let width = block.x.len() / g.image_len() * plane;
        with_buffers(rows * width, c * width, |u, x_rows| {
            for (b, grid) in block.dy.chunks(co * cells).enumerate() {
                g.spread(co, grid, u, width, b * plane);
            }
            if wanted.weight {
                channels_major(block.x, c, plane, x_rows);
                product(
                    block.dw,
                    [rows, c, width],
                    View::rows(u, width),
                    View::transposed(x_rows, width),
                    true,
                );
            }
            if let Some(dx) = block.dx {
                product(
                    x_rows,
                    [c, width, rows],
                    View::transposed(&wg, c),
                    View::rows(u, width),
                    false,
                );
                images_major(x_rows, c, plane, None, dx);
            }
        });
    });
    Gradients {
        input: wanted.input.then_some(dx),
        weight: wanted.weight.then(|| swap_inner(&dwg, [co, k, c])),
        bias: wanted.bias.then(|| bias_gradient(dy, co, cells)),
    }
}
