//! The model's convolutions, with the execution path chosen once per call by the device.
//!
//! Burn's autodiff takes a convolution's weight gradient from the backend's
//! `conv2d_weight_backward`. burn-tch 0.22.1 does not provide one (nor the transposed
//! convolution's), so on LibTorch Burn's generic formula runs: a convolution of the swapped
//! input and output gradient, slower than LibTorch's own `convolution_backward` (README, "The
//! demo"). With the `tch` feature, a convolution on an autodiff LibTorch device takes all its
//! gradients from LibTorch's autograd instead (`conv/libtorch.rs`); every other device, and
//! layers that path does not cover, run Burn's module as it is. Both give the same values
//! (tested here).

use burn::nn::conv::{Conv2d, ConvTranspose2d};
use burn::tensor::Tensor;

#[cfg(feature = "tch")]
mod libtorch;

/// `layer.forward(x)`, with LibTorch's own gradients on an autodiff LibTorch device.
pub fn conv2d(layer: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    #[cfg(feature = "tch")]
    if libtorch::tracks_gradients(&x) {
        return libtorch::conv2d(layer, x);
    }
    layer.forward(x)
}

/// `layer.forward(x)`, with LibTorch's own gradients on an autodiff LibTorch device.
pub fn conv_transpose2d(layer: &ConvTranspose2d, x: Tensor<4>) -> Tensor<4> {
    #[cfg(feature = "tch")]
    if libtorch::tracks_gradients(&x) {
        return libtorch::conv_transpose2d(layer, x);
    }
    layer.forward(x)
}

#[cfg(all(test, feature = "tch"))]
mod tests {
    use burn::module::Param;
    use burn::nn::PaddingConfig2d;
    use burn::nn::conv::{Conv2dConfig, ConvTranspose2dConfig};
    use burn::tensor::activation::relu;
    use burn::tensor::{Device, Distribution};

    use super::*;

    #[allow(deprecated)] // Burn 0.22 deprecates its LibTorch backend but still offers it.
    fn device() -> Device {
        Device::libtorch().autodiff()
    }

    fn assert_close(got: Tensor<4>, want: Tensor<4>, what: &str) {
        let (got, want) = (
            got.into_data().try_to_vec::<f32>().unwrap(),
            want.into_data().try_to_vec::<f32>().unwrap(),
        );
        assert_eq!(got.len(), want.len(), "{what}: sizes");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-4 * w.abs().max(1.0),
                "{what}[{i}]: got {g}, want {w}"
            );
        }
    }

    /// Runs `forward` on `x` (tracked or not) and the layer's parameters, through ReLU (which
    /// LibTorch computes in place when it may) into a sum weighted by `mixing`, and returns
    /// the output and the gradients of the weight, the bias (as `[1, 1, 1, n]`) and `x`.
    fn output_and_gradients(
        x: Tensor<4>,
        track_x: bool,
        (weight, bias): (&Param<Tensor<4>>, &Param<Tensor<1>>),
        mixing: &Tensor<4>,
        forward: &dyn Fn(Tensor<4>) -> Tensor<4>,
    ) -> Vec<Tensor<4>> {
        let x = if track_x { x.require_grad() } else { x };
        let y = relu(forward(x.clone()));
        let grads = (y.clone() * mixing.clone()).sum().backward();
        let bias_grad = bias.val().grad(&grads).unwrap().reshape([1, 1, 1, -1]);
        let mut out = vec![y, weight.val().grad(&grads).unwrap(), bias_grad];
        out.extend(x.grad(&grads));
        out
    }

    /// Checks that `fast` (this module's function) and `plain` (Burn's module) give the same
    /// output and gradients for `x`, with `x` tracked and not.
    fn assert_paths_agree(
        case: &str,
        x: Tensor<4>,
        weight: &Param<Tensor<4>>,
        bias: &Param<Tensor<1>>,
        fast: &dyn Fn(Tensor<4>) -> Tensor<4>,
        plain: &dyn Fn(Tensor<4>) -> Tensor<4>,
    ) {
        assert!(
            libtorch::tracks_gradients(&x),
            "the LibTorch path must apply here"
        );
        let device = x.device();
        let mixing = Tensor::<4>::random(
            plain(x.clone()).dims(),
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        for track_x in [true, false] {
            let params = (weight, bias);
            let got = output_and_gradients(x.clone(), track_x, params, &mixing, fast);
            let want = output_and_gradients(x.clone(), track_x, params, &mixing, plain);
            assert_eq!(got.len(), want.len());
            for (what, (got, want)) in ["output", "weight grad", "bias grad", "input grad"]
                .iter()
                .zip(got.into_iter().zip(want))
            {
                assert_close(
                    got,
                    want,
                    &format!("{case}, tracked input {track_x}: {what}"),
                );
            }
        }
    }

    #[test]
    fn libtorch_gradients_equal_burns_own() {
        let device = device();
        let random = |dims| Tensor::<4>::random(dims, Distribution::Normal(0.0, 1.0), &device);
        let cases = [
            // The demo's layers, then dilation, groups and no padding.
            Conv2dConfig::new([3, 8], [4, 4])
                .with_stride([2, 2])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1)),
            Conv2dConfig::new([8, 4], [3, 3]).with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1)),
            Conv2dConfig::new([4, 6], [3, 2])
                .with_dilation([2, 1])
                .with_groups(2)
                .with_padding(PaddingConfig2d::Explicit(2, 1, 2, 1)),
            Conv2dConfig::new([4, 6], [3, 3]).with_padding(PaddingConfig2d::Valid),
        ];
        for (case, config) in cases.iter().enumerate() {
            device.seed(case as u64);
            let layer = config.init(&device);
            assert_paths_agree(
                &format!("conv case {case}"),
                random([5, config.channels[0], 11, 9]),
                &layer.weight,
                layer.bias.as_ref().unwrap(),
                &|x| conv2d(&layer, x),
                &|x| layer.forward(x),
            );
        }
        let cases = [
            // The demo's layers, then output padding, dilation and groups.
            ConvTranspose2dConfig::new([8, 4], [4, 4])
                .with_stride([2, 2])
                .with_padding([1, 1]),
            ConvTranspose2dConfig::new([4, 1], [4, 4])
                .with_stride([2, 2])
                .with_padding([1, 1]),
            ConvTranspose2dConfig::new([4, 6], [3, 3])
                .with_stride([2, 2])
                .with_padding_out([1, 1])
                .with_dilation([1, 2])
                .with_groups(2),
        ];
        for (case, config) in cases.iter().enumerate() {
            device.seed(case as u64);
            let layer = config.init(&device);
            assert_paths_agree(
                &format!("transposed case {case}"),
                random([5, config.channels[0], 7, 6]),
                &layer.weight,
                layer.bias.as_ref().unwrap(),
                &|x| conv_transpose2d(&layer, x),
                &|x| layer.forward(x),
            );
        }
    }

    #[test]
    fn same_and_one_sided_padding_stay_on_burns_module() {
        use libtorch::symmetric_padding;
        assert_eq!(symmetric_padding(&PaddingConfig2d::Same), None);
        assert_eq!(
            symmetric_padding(&PaddingConfig2d::Explicit(1, 2, 1, 3)),
            None
        );
        assert_eq!(
            symmetric_padding(&PaddingConfig2d::Explicit(1, 2, 1, 2)),
            Some([1, 2])
        );
        assert_eq!(symmetric_padding(&PaddingConfig2d::Valid), Some([0, 0]));
    }
}
