//! The convolutions on Burn's CPU backend (`flex`) as a backend extension: forward and every
//! gradient as matrix products (`conv/lowering.rs`), instead of flex's convolution and the
//! generic gradient formulas Burn's autodiff falls back to for it (flex implements neither
//! `conv2d_x_backward` nor `conv2d_weight_backward`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, DispatchDevice, Flex, TensorMetadata, backend_extension};
use burn::module::Param;
use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, ConvTranspose2d};
use burn::tensor::{DType, Tensor, TensorData};

use super::lowering::{self, Patches, Wanted};

/// Nanoseconds spent in this path's forward and backward steps since the last
/// [`take_timings`] (the step profile's split).
static FORWARD_NANOS: AtomicU64 = AtomicU64::new(0);
static BACKWARD_NANOS: AtomicU64 = AtomicU64::new(0);

/// Milliseconds spent in this path's convolutions, `(forward, backward)`, since the last call.
pub fn take_timings() -> (f64, f64) {
    let ms = |n: &AtomicU64| n.swap(0, Ordering::Relaxed) as f64 / 1e6;
    (ms(&FORWARD_NANOS), ms(&BACKWARD_NANOS))
}

fn timed<T>(clock: &AtomicU64, work: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let out = work();
    clock.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    out
}

/// Whether `x` (f32) lives on the flex backend, with or without autodiff.
pub(super) fn applies(x: &Tensor<4>) -> bool {
    let device = x.device();
    matches!(
        device.without_autodiff().as_dispatch(),
        DispatchDevice::Flex(_)
    ) && x.dtype() == DType::F32
}

/// `layer.forward(x)` with this path's products, or `None` where it does not cover the layer
/// (groups, another dtype, an empty dimension, an input whose channels do not match the
/// weight's): the caller then runs Burn's module.
pub(super) fn conv2d(layer: &Conv2d, x: &Tensor<4>) -> Option<Tensor<4>> {
    let patches = conv_patches(layer, x.dims())?;
    let [co, ci, _, _] = layer.weight.dims();
    covered(layer.groups, x, &layer.weight.val(), [ci, co]).then(|| {
        run(
            x,
            &layer.weight,
            layer.bias.as_ref(),
            Geometry::Conv(patches),
        )
    })
}

/// The geometry of `layer` on an input of shape `dims`; `None` for `Same` padding (Burn's
/// module works out its sizes) or a kernel larger than the padded input.
pub(super) fn conv_patches(layer: &Conv2d, dims: [usize; 4]) -> Option<Patches> {
    let [_, channels, height, width] = dims;
    let [_, _, kh, kw] = layer.weight.dims();
    let (top, left, bottom, right) = match layer.padding {
        PaddingConfig2d::Valid => (0, 0, 0, 0),
        PaddingConfig2d::Explicit(top, left, bottom, right) => (top, left, bottom, right),
        PaddingConfig2d::Same => return None,
    };
    let out = |size: usize, begin: usize, end: usize, k: usize, axis: usize| {
        (size + begin + end)
            .checked_sub(layer.dilation[axis] * (k - 1) + 1)
            .map(|span| span / layer.stride[axis] + 1)
    };
    Some(Patches {
        channels,
        image: [height, width],
        grid: [
            out(height, top, bottom, kh, 0)?,
            out(width, left, right, kw, 1)?,
        ],
        kernel: [kh, kw],
        stride: layer.stride,
        padding: [top, left],
        dilation: layer.dilation,
    })
}

/// `layer.forward(x)` with this path's products, or `None` where it does not cover the layer.
pub(super) fn conv_transpose2d(layer: &ConvTranspose2d, x: &Tensor<4>) -> Option<Tensor<4>> {
    let [_, _, height, width] = x.dims();
    let [_, co, kh, kw] = layer.weight.dims();
    let out = |size: usize, k: usize, axis: usize| {
        ((size.checked_sub(1)? * layer.stride[axis]
            + layer.dilation[axis] * (k - 1)
            + layer.padding_out[axis]
            + 1)
        .checked_sub(2 * layer.padding[axis]))
        .filter(|&n| n > 0)
    };
    let patches = Patches {
        channels: co,
        image: [out(height, kh, 0)?, out(width, kw, 1)?],
        grid: [height, width],
        kernel: [kh, kw],
        stride: layer.stride,
        padding: layer.padding,
        dilation: layer.dilation,
    };
    covered(
        layer.groups,
        x,
        &layer.weight.val(),
        [layer.weight.dims()[0], co],
    )
    .then(|| {
        run(
            x,
            &layer.weight,
            layer.bias.as_ref(),
            Geometry::Transposed(patches),
        )
    })
}

/// The extension's call; a layer without bias adds constant zeros (no gradient is asked of
/// them).
fn run(
    x: &Tensor<4>,
    weight: &Param<Tensor<4>>,
    bias: Option<&Param<Tensor<1>>>,
    geometry: Geometry,
) -> Tensor<4> {
    let channels = geometry.output_channels(weight.dims());
    let bias = bias.map_or_else(|| Tensor::zeros([channels], &x.device()), |b| b.val());
    Tensor::from_dispatch(<Dispatch as OwnConvolution>::own_conv2d(
        x.clone().into_dispatch(),
        weight.val().into_dispatch(),
        bias.into_dispatch(),
        geometry,
    ))
}

/// One group, f32 weights, no empty dimension, and an input with the `[input, output]`
/// channels the weight expects (a mismatch goes to Burn's module, which reports it).
fn covered(groups: usize, x: &Tensor<4>, weight: &Tensor<4>, [ci, co]: [usize; 2]) -> bool {
    groups == 1
        && weight.dtype() == DType::F32
        && x.dims()[1] == ci
        && co > 0
        && x.dims().iter().chain(&weight.dims()).all(|&n| n > 0)
}

/// Which convolution, and its geometry.
#[derive(Debug, Clone, Copy)]
pub enum Geometry {
    /// A convolution: its input is the image side.
    Conv(Patches),
    /// A transposed convolution: its input is the grid side.
    Transposed(Patches),
}

impl Geometry {
    /// Output channels for a weight of shape `dims` as Burn's modules hold it.
    fn output_channels(&self, dims: [usize; 4]) -> usize {
        match self {
            Self::Conv(_) => dims[0],
            Self::Transposed(_) => dims[1],
        }
    }

    fn output_shape(&self, batch: usize, co: usize) -> [usize; 4] {
        match self {
            Self::Conv(g) => [batch, co, g.grid[0], g.grid[1]],
            Self::Transposed(g) => [batch, g.channels, g.image[0], g.image[1]],
        }
    }
}

/// A 2-d convolution or transposed convolution (weights as Burn's modules hold them), with
/// its gradients on `Autodiff<Flex>`.
#[backend_extension(Flex, Autodiff)]
pub trait OwnConvolution: Backend {
    /// The convolution that `geometry` describes, of `x` with `weight` and `bias`.
    fn own_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        geometry: Geometry,
    ) -> FloatTensor<Self>;
}

/// The values of a flex tensor, contiguous.
fn values(t: &FlexTensor) -> std::borrow::Cow<'_, [f32]> {
    match t.as_slice::<f32>() {
        Some(slice) => std::borrow::Cow::Borrowed(slice),
        None => std::borrow::Cow::Owned(t.to_contiguous().as_slice::<f32>().unwrap().to_vec()),
    }
}

fn tensor(values: Vec<f32>, shape: [usize; 4]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

fn dims(t: &FlexTensor) -> [usize; 4] {
    t.shape().dims::<4>()
}

fn forward(
    x: &FlexTensor,
    weight: &FlexTensor,
    bias: &FlexTensor,
    geometry: Geometry,
) -> FlexTensor {
    timed(&FORWARD_NANOS, || {
        let w = dims(weight);
        let (xs, ws, bs) = (values(x), values(weight), values(bias));
        let shape = geometry.output_shape(dims(x)[0], geometry.output_channels(w));
        let y = match &geometry {
            Geometry::Conv(g) => lowering::conv2d(g, &xs, &ws, &bs, w[0]),
            Geometry::Transposed(g) => lowering::conv_transpose2d(g, &xs, &ws, &bs, w[0]),
        };
        tensor(y, shape)
    })
}

impl OwnConvolution for Flex {
    fn own_conv2d(
        x: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
        geometry: Geometry,
    ) -> FlexTensor {
        forward(&x, &weight, &bias, geometry)
    }
}

/// What the backward step keeps: the forward's input and weight, and the geometry.
#[derive(Debug, Clone)]
struct Saved {
    x: FlexTensor,
    weight: FlexTensor,
    geometry: Geometry,
}

#[derive(Debug)]
struct OwnBackward;

impl Backward<Flex, 3> for OwnBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<Flex>(&ops.node);
        let [px, pw, pb] = ops.parents;
        let Saved {
            x,
            weight,
            geometry,
        } = ops.state;
        let wanted = Wanted {
            input: px.is_some(),
            weight: pw.is_some(),
            bias: pb.is_some(),
        };
        let found = timed(&BACKWARD_NANOS, || {
            let (xs, ws, dys) = (values(&x), values(&weight), values(&dy));
            match &geometry {
                Geometry::Conv(g) => {
                    lowering::conv2d_backward(g, &xs, &ws, &dys, dims(&weight)[0], wanted)
                }
                Geometry::Transposed(g) => {
                    lowering::conv_transpose2d_backward(g, &xs, &ws, &dys, dims(&weight)[0], wanted)
                }
            }
        });
        if let (Some(node), Some(dx)) = (px, found.input) {
            grads.register::<Flex>(node.id, tensor(dx, dims(&x)));
        }
        if let (Some(node), Some(dw)) = (pw, found.weight) {
            grads.register::<Flex>(node.id, tensor(dw, dims(&weight)));
        }
        if let (Some(node), Some(db)) = (pb, found.bias) {
            let len = db.len();
            grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(db, [len])));
        }
    }
}

impl<C: CheckpointStrategy> OwnConvolution for Autodiff<Flex, C> {
    fn own_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        geometry: Geometry,
    ) -> FloatTensor<Self> {
        let nodes = [x.node(), weight.node(), bias.node()];
        let y = forward(
            x.primitive(),
            weight.primitive(),
            bias.primitive(),
            geometry,
        );
        match OwnBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(
                Saved {
                    x: x.into_primitive(),
                    weight: weight.into_primitive(),
                    geometry,
                },
                y,
            ),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }
}
