//! A convolution lowered on its output side: for layers with fewer output than input
//! channels ([`Patches::spreads`]), whose im2col matrix would be the largest thing they move.
//!
//! With `Wg` the weight as `[Co·kh·kw, C]` and `x` as `[C, H·W]`:
//! - forward: `T = Wg · x`, then each output position collects the rows of `T` at the image
//!   positions its kernel offsets read ([`Patches::collect`]);
//! - backward: `U` = the output gradient spread over those image positions
//!   ([`Patches::spread`]), then `dx = Wgᵀ · U` and `dWg = U · xᵀ`.

use rayon::prelude::*;

use super::{
    Gradients, Patches, View, Wanted, add, bias_gradient, block_images, channels_major,
    images_major, input_blocks, product, with_buffers,
};

/// `weight` `[Co, C, K]` as `[Co, K, C]` (`K` = kernel positions).
fn kernel_major(weight: &[f32], co: usize, c: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0.0; weight.len()];
    for o in 0..co {
        for i in 0..c {
            for j in 0..k {
                out[(o * k + j) * c + i] = weight[(o * c + i) * k + j];
            }
        }
    }
    out
}

/// The inverse of [`kernel_major`].
fn channel_major(weight: &[f32], co: usize, c: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0.0; weight.len()];
    for o in 0..co {
        for i in 0..c {
            for j in 0..k {
                out[(o * c + i) * k + j] = weight[(o * k + j) * c + i];
            }
        }
    }
    out
}

/// [`super::conv2d`] on the output side.
pub(super) fn conv2d(
    g: &Patches,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    co: usize,
) -> Vec<f32> {
    let (c, k, plane, cells) = (
        g.channels,
        g.kernel[0] * g.kernel[1],
        g.image[0] * g.image[1],
        g.cells(),
    );
    let rows = co * k;
    let wg = kernel_major(weight, co, c, k);
    let batch = x.len() / g.image_len();
    let per = block_images(rows * plane);
    let mut y = vec![0.0; batch * co * cells];
    y.par_chunks_mut(per * co * cells)
        .zip(x.par_chunks(per * g.image_len()))
        .for_each(|(y, x)| {
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
                    match bias {
                        Some(bias) => {
                            for (channel, value) in out.chunks_mut(cells).zip(bias) {
                                channel.fill(*value);
                            }
                        }
                        None => out.fill(0.0),
                    }
                    g.collect(co, t, width, b * plane, out);
                }
            });
        });
    y
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
    let (c, k, plane, cells) = (
        g.channels,
        g.kernel[0] * g.kernel[1],
        g.image[0] * g.image[1],
        g.cells(),
    );
    let rows = co * k;
    let wg = kernel_major(weight, co, c, k);
    let batch = x.len() / g.image_len();
    let per = block_images(rows * plane);
    let mut dx = vec![0.0; if wanted.input { x.len() } else { 0 }];
    let blocks = input_blocks(&mut dx, per * g.image_len(), batch.div_ceil(per));
    let dwg = blocks
        .into_par_iter()
        .zip(x.par_chunks(per * g.image_len()))
        .zip(dy.par_chunks(per * co * cells))
        .fold(
            || vec![0.0; if wanted.weight { rows * c } else { 0 }],
            |mut dwg, ((dx, x), dy)| {
                let width = x.len() / g.image_len() * plane;
                with_buffers(rows * width, c * width, |u, x_rows| {
                    for (b, grid) in dy.chunks(co * cells).enumerate() {
                        g.spread(co, grid, u, width, b * plane);
                    }
                    if wanted.weight {
                        channels_major(x, c, plane, x_rows);
                        product(
                            &mut dwg,
                            [rows, c, width],
                            View::rows(u, width),
                            View::transposed(x_rows, width),
                            true,
                        );
                    }
                    if let Some(dx) = dx {
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
                dwg
            },
        )
        .reduce(|| vec![0.0; if wanted.weight { rows * c } else { 0 }], add);
    Gradients {
        input: wanted.input.then_some(dx),
        weight: wanted.weight.then(|| channel_major(&dwg, co, c, k)),
        bias: wanted.bias.then(|| bias_gradient(dy, co, cells)),
    }
}
