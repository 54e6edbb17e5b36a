//! Convolutions on an autodiff LibTorch device whose gradients come from LibTorch's autograd
//! (its `convolution_backward`, one call for input, weight and bias) instead of Burn's generic
//! weight-gradient formula, which burn-tch 0.22.1 leaves in place. tch 0.22 does not bind
//! `convolution_backward` itself, so the forward runs under LibTorch's autograd on detached
//! leaves and the backward step replays that small graph.
//!
//! The graph keeps the convolution's input and weight alive until the backward step, as Burn's
//! own convolution does. Were Burn to write into one of them in place before then, LibTorch's
//! version check would stop the backward with an error rather than give a wrong gradient.
#![allow(deprecated)] // Burn 0.22 deprecates its LibTorch backend but still offers it.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::backend::libtorch::TchTensor;
use burn::backend::ops::ModuleOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, DispatchDevice, LibTorch, backend_extension};
use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, ConvTranspose2d};
use burn::tensor::Tensor;
use burn::tensor::ops::{ConvOptions, ConvTransposeOptions};

/// Whether `x` lives on an autodiff LibTorch device, where this path applies.
pub(super) fn tracks_gradients(x: &Tensor<4>) -> bool {
    let device = x.device();
    device.is_autodiff()
        && matches!(
            device.without_autodiff().as_dispatch(),
            DispatchDevice::LibTorch(_)
        )
}

/// `layer.forward(x)` with LibTorch's gradients; Burn's module where this path does not
/// cover the layer (no bias, or padding that is `Same` or one-sided).
pub(super) fn conv2d(layer: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    let (Some(padding), Some(bias)) = (symmetric_padding(&layer.padding), &layer.bias) else {
        return layer.forward(x);
    };
    let options = ConvOptions::new(layer.stride, padding, layer.dilation, layer.groups);
    Tensor::from_dispatch(<Dispatch as NativeConvolution>::native_conv2d(
        x.into_dispatch(),
        layer.weight.val().into_dispatch(),
        bias.val().into_dispatch(),
        options,
    ))
}

/// `layer.forward(x)` with LibTorch's gradients; Burn's module for a layer without bias.
pub(super) fn conv_transpose2d(layer: &ConvTranspose2d, x: Tensor<4>) -> Tensor<4> {
    let Some(bias) = &layer.bias else {
        return layer.forward(x);
    };
    let options = ConvTransposeOptions::new(
        layer.stride,
        layer.padding,
        layer.padding_out,
        layer.dilation,
        layer.groups,
    );
    Tensor::from_dispatch(<Dispatch as NativeConvolution>::native_conv_transpose2d(
        x.into_dispatch(),
        layer.weight.val().into_dispatch(),
        bias.val().into_dispatch(),
        options,
    ))
}

/// `[height, width]` padding when it is the same on both sides of each axis. `Same` padding
/// depends on the input's size, and LibTorch's convolution pads both sides alike.
pub(super) fn symmetric_padding(padding: &PaddingConfig2d) -> Option<[usize; 2]> {
    match *padding {
        PaddingConfig2d::Valid => Some([0, 0]),
        PaddingConfig2d::Explicit(top, left, bottom, right) if top == bottom && left == right => {
            Some([top, left])
        }
        _ => None,
    }
}

/// The two convolutions with their bias, as a backend extension: on LibTorch they are its
/// own, and on Autodiff<LibTorch> they also record LibTorch's backward step.
#[backend_extension(LibTorch, Autodiff)]
pub trait NativeConvolution: Backend {
    /// A 2-d convolution with bias (symmetric padding).
    fn native_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self>;

    /// A 2-d transposed convolution with bias.
    fn native_conv_transpose2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        options: ConvTransposeOptions<2>,
    ) -> FloatTensor<Self>;
}

impl NativeConvolution for LibTorch {
    fn native_conv2d(
        x: TchTensor,
        weight: TchTensor,
        bias: TchTensor,
        options: ConvOptions<2>,
    ) -> TchTensor {
        LibTorch::conv2d(x, weight, Some(bias), options)
    }

    fn native_conv_transpose2d(
        x: TchTensor,
        weight: TchTensor,
        bias: TchTensor,
        options: ConvTransposeOptions<2>,
    ) -> TchTensor {
        LibTorch::conv_transpose2d(x, weight, Some(bias), options)
    }
}

impl<C: CheckpointStrategy> NativeConvolution for Autodiff<LibTorch, C> {
    fn native_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        record::<C>([x, weight, bias], move |[x, w, b]| {
            x.conv2d(
                w,
                Some(b),
                i64s(options.stride),
                i64s(options.padding.map(|(begin, _)| begin)),
                i64s(options.dilation),
                options.groups as i64,
            )
        })
    }

    fn native_conv_transpose2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        options: ConvTransposeOptions<2>,
    ) -> FloatTensor<Self> {
        record::<C>([x, weight, bias], move |[x, w, b]| {
            x.conv_transpose2d(
                w,
                Some(b),
                i64s(options.stride),
                i64s(options.padding),
                i64s(options.padding_out),
                options.groups as i64,
                i64s(options.dilation),
            )
        })
    }
}

/// Sizes as LibTorch takes them.
fn i64s(values: [usize; 2]) -> [i64; 2] {
    values.map(|v| v as i64)
}

/// Runs `op` on the three inputs; where Burn tracks gradients, under LibTorch's autograd, with
/// a backward step that replays it.
fn record<C: CheckpointStrategy>(
    inputs: [FloatTensor<Autodiff<LibTorch, C>>; 3],
    op: impl FnOnce([&tch::Tensor; 3]) -> tch::Tensor,
) -> FloatTensor<Autodiff<LibTorch, C>> {
    let nodes = [inputs[0].node(), inputs[1].node(), inputs[2].node()];
    match LibTorchBackward
        .prepare::<C>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            // Leaves of LibTorch's graph: the inputs' values, cut from anything before them.
            // All three require a gradient; the backward step asks only for those Burn tracks.
            let leaves = inputs
                .map(|t| TchTensor::new(t.primitive().tensor.detach().set_requires_grad(true)));
            let output =
                tch::with_grad(|| op([&leaves[0].tensor, &leaves[1].tensor, &leaves[2].tensor]));
            let value = TchTensor::new(output.detach());
            prep.finish(
                Graph {
                    output: TchTensor::new(output),
                    leaves,
                },
                value,
            )
        }
        OpsKind::UnTracked(prep) => {
            let [x, w, b] = inputs.map(|t| t.into_primitive());
            prep.finish(TchTensor::new(op([&x.tensor, &w.tensor, &b.tensor])))
        }
    }
}

/// LibTorch's graph of one convolution: its output and its three leaves.
#[derive(Debug, Clone)]
struct Graph {
    output: TchTensor,
    leaves: [TchTensor; 3],
}

#[derive(Debug)]
struct LibTorchBackward;

impl Backward<LibTorch, 3> for LibTorchBackward {
    type State = Graph;

    fn backward(self, ops: Ops<Graph, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<LibTorch>(&ops.node);
        let Graph { output, leaves } = ops.state;
        let (nodes, leaves): (Vec<NodeId>, Vec<tch::Tensor>) = ops
            .parents
            .into_iter()
            .zip(leaves)
            .filter_map(|(parent, leaf)| parent.map(|node| (node.id, leaf.tensor)))
            .unzip();
        if nodes.is_empty() {
            return;
        }
        // run_backward seeds the root with ones: d(sum(output * grad)) / d(output) = grad.
        let root = tch::with_grad(|| output.tensor * grad.tensor);
        let computed = tch::Tensor::run_backward(&[root], &leaves, false, false);
        for (node, gradient) in nodes.into_iter().zip(computed) {
            grads.register::<LibTorch>(node, TchTensor::new(gradient));
        }
    }
}
