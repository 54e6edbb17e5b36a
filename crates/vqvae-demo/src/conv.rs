//! The model's convolutions, with the execution path chosen once per call by the device.
//!
//! - On Burn's CPU backend (`flex`, with or without autodiff), the forward and every gradient
//!   are this crate's matrix products (`conv/flex.rs`, `conv/lowering.rs`): flex's own
//!   convolution is slower, and it leaves the gradients to Burn's generic formulas (each a
//!   further convolution).
//! - With the `tch` feature, on an autodiff LibTorch device, the gradients come from
//!   LibTorch's autograd (`conv/libtorch.rs`): burn-tch 0.22.1 has no weight gradient of its
//!   own either.
//! - Everywhere else, and for layers a path does not cover (groups, dtypes other than f32 on
//!   flex; no bias or one-sided padding on LibTorch), Burn's module runs as it is.
//!
//! Each path gives Burn's module's values (tested here). [`use_burns_module`] sends every
//! convolution to Burn's module, for measurements against it.

use std::sync::atomic::{AtomicBool, Ordering};

use burn::nn::conv::{Conv2d, ConvTranspose2d};
use burn::tensor::Tensor;

mod flex;
#[cfg(feature = "tch")]
mod libtorch;
mod lowering;

pub use flex::take_timings;

static BURNS_MODULE_ONLY: AtomicBool = AtomicBool::new(false);

/// Sends every convolution of this process to Burn's module (`true`) or back to the
/// per-device paths (`false`, the default): for the step profile's and the benchmarks'
/// comparisons.
pub fn use_burns_module(only: bool) {
    BURNS_MODULE_ONLY.store(only, Ordering::Relaxed);
}

/// The path a convolution on `x` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// This crate's products on flex.
    Own,
    /// LibTorch's autograd on an autodiff LibTorch device.
    #[cfg(feature = "tch")]
    LibTorch,
    /// Burn's module.
    Burn,
}

impl Path {
    fn of(x: &Tensor<4>) -> Self {
        if BURNS_MODULE_ONLY.load(Ordering::Relaxed) {
            return Self::Burn;
        }
        if flex::applies(x) {
            return Self::Own;
        }
        #[cfg(feature = "tch")]
        if libtorch::tracks_gradients(x) {
            return Self::LibTorch;
        }
        Self::Burn
    }
}

/// `layer.forward(x)`, on the path `x`'s device takes.
pub fn conv2d(layer: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    match Path::of(&x) {
        Path::Own => flex::conv2d(layer, &x).unwrap_or_else(|| layer.forward(x)),
        #[cfg(feature = "tch")]
        Path::LibTorch => libtorch::conv2d(layer, x),
        Path::Burn => layer.forward(x),
    }
}

/// `layer.forward(x)`, on the path `x`'s device takes.
pub fn conv_transpose2d(layer: &ConvTranspose2d, x: Tensor<4>) -> Tensor<4> {
    match Path::of(&x) {
        Path::Own => flex::conv_transpose2d(layer, &x).unwrap_or_else(|| layer.forward(x)),
        #[cfg(feature = "tch")]
        Path::LibTorch => libtorch::conv_transpose2d(layer, x),
        Path::Burn => layer.forward(x),
    }
}

#[cfg(test)]
mod tests {
    use burn::module::Param;
    use burn::nn::PaddingConfig2d;
    use burn::nn::conv::{Conv2dConfig, ConvTranspose2dConfig};
    use burn::tensor::activation::relu;
    use burn::tensor::{Device, Distribution};

    use super::*;

    /// Where `got` differs from `want` by more than 1e-4 relative, the first such value.
    fn mismatch(got: &Tensor<4>, want: &Tensor<4>) -> Option<String> {
        let (got, want) = (
            got.to_data().try_to_vec::<f32>().unwrap(),
            want.to_data().try_to_vec::<f32>().unwrap(),
        );
        if got.len() != want.len() {
            return Some(format!("{} values, want {}", got.len(), want.len()));
        }
        got.iter()
            .zip(&want)
            .enumerate()
            .find(|(_, (g, w))| (*g - *w).abs() > 1e-4 * w.abs().max(1.0))
            .map(|(i, (g, w))| format!("[{i}]: got {g}, want {w}"))
    }

    /// Runs `forward` on `x` (tracked or not) and the layer's parameters, through ReLU into a
    /// sum weighted by `mixing`, and returns the output and the gradients of the weight, the
    /// bias (as `[1, 1, 1, n]`, if any) and `x` (if tracked).
    fn output_and_gradients(
        x: Tensor<4>,
        track_x: bool,
        (weight, bias): (&Param<Tensor<4>>, Option<&Param<Tensor<1>>>),
        mixing: &Tensor<4>,
        forward: &dyn Fn(Tensor<4>) -> Tensor<4>,
    ) -> Vec<(&'static str, Tensor<4>)> {
        let x = if track_x { x.require_grad() } else { x };
        let y = relu(forward(x.clone()));
        let grads = (y.clone() * mixing.clone()).sum().backward();
        let mut out = vec![
            ("output", y),
            ("weight grad", weight.val().grad(&grads).unwrap()),
        ];
        if let Some(bias) = bias {
            let grad = bias.val().grad(&grads).unwrap().reshape([1, 1, 1, -1]);
            out.push(("bias grad", grad));
        }
        out.extend(x.grad(&grads).map(|g| ("input grad", g)));
        out
    }

    /// Checks that `fast` (this module's function) and `plain` (Burn's module) give the same
    /// output and gradients for `x`, with `x` tracked and not, and that each comparison would
    /// catch a value scaled by 1.001.
    fn assert_paths_agree(
        case: &str,
        x: Tensor<4>,
        params: (&Param<Tensor<4>>, Option<&Param<Tensor<1>>>),
        fast: &dyn Fn(Tensor<4>) -> Tensor<4>,
        plain: &dyn Fn(Tensor<4>) -> Tensor<4>,
    ) {
        let device = x.device();
        let mixing = Tensor::<4>::random(
            plain(x.clone()).dims(),
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        for track_x in [true, false] {
            let got = output_and_gradients(x.clone(), track_x, params, &mixing, fast);
            let want = output_and_gradients(x.clone(), track_x, params, &mixing, plain);
            assert_eq!(got.len(), want.len(), "{case}: gradients");
            assert_eq!(
                got.len(),
                2 + params.1.is_some() as usize + track_x as usize
            );
            for ((what, got), (_, want)) in got.into_iter().zip(want) {
                let context = format!("{case}, tracked input {track_x}: {what}");
                if let Some(error) = mismatch(&got, &want) {
                    panic!("{context}: {error}");
                }
                assert!(
                    mismatch(&(got * 1.001), &want).is_some(),
                    "{context}: a value scaled by 1.001 passes the comparison"
                );
            }
        }
    }

    /// Convolutions the flex and LibTorch paths cover: the demo's layers, then dilation,
    /// one-sided and no padding, no bias.
    fn conv_cases() -> Vec<Conv2dConfig> {
        vec![
            Conv2dConfig::new([1, 8], [4, 4])
                .with_stride([2, 2])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1)),
            Conv2dConfig::new([3, 8], [4, 4])
                .with_stride([2, 2])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1)),
            Conv2dConfig::new([8, 4], [3, 3]).with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1)),
            Conv2dConfig::new([4, 6], [3, 2])
                .with_dilation([2, 1])
                .with_stride([1, 2])
                .with_padding(PaddingConfig2d::Explicit(2, 1, 2, 1)),
            Conv2dConfig::new([4, 6], [3, 3]).with_padding(PaddingConfig2d::Valid),
            Conv2dConfig::new([4, 5], [2, 3])
                .with_padding(PaddingConfig2d::Explicit(0, 2, 1, 0))
                .with_bias(false),
            // Fewer output than input channels: lowered on the output side on flex.
            Conv2dConfig::new([16, 2], [3, 3])
                .with_stride([2, 2])
                .with_dilation([2, 1])
                .with_padding(PaddingConfig2d::Explicit(2, 1, 0, 1)),
            Conv2dConfig::new([12, 3], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 0, 1, 2))
                .with_bias(false),
        ]
    }

    /// The cases reach both of the flex path's lowerings (im2col and the output side).
    #[test]
    fn the_cases_cover_both_flex_lowerings() {
        let device = Device::flex();
        let spreads: Vec<bool> = conv_cases()
            .iter()
            .map(|config| {
                let layer = config.init(&device);
                let patches = flex::conv_patches(&layer, [5, config.channels[0], 11, 9]).unwrap();
                patches.spreads(config.channels[1])
            })
            .collect();
        assert!(
            spreads.contains(&true) && spreads.contains(&false),
            "{spreads:?}"
        );
        assert!(spreads.iter().filter(|&&s| s).count() >= 3, "{spreads:?}");
    }

    /// Transposed convolutions: the demo's layers, then output padding, dilation, no bias.
    fn transposed_cases() -> Vec<ConvTranspose2dConfig> {
        vec![
            ConvTranspose2dConfig::new([8, 4], [4, 4])
                .with_stride([2, 2])
                .with_padding([1, 1]),
            ConvTranspose2dConfig::new([4, 1], [4, 4])
                .with_stride([2, 2])
                .with_padding([1, 1]),
            ConvTranspose2dConfig::new([4, 6], [3, 3])
                .with_stride([2, 2])
                .with_padding_out([1, 1])
                .with_dilation([1, 2]),
            ConvTranspose2dConfig::new([3, 2], [2, 3])
                .with_stride([3, 1])
                .with_padding([1, 0])
                .with_bias(false),
        ]
    }

    /// Runs every case on `device` through this module and through Burn's module, checking
    /// first that `path` is the one taken.
    fn check_cases(device: &Device, path: Path, extra_conv: Vec<Conv2dConfig>) {
        let random = |dims| Tensor::<4>::random(dims, Distribution::Normal(0.0, 1.0), device);
        let mut convs = conv_cases();
        convs.extend(extra_conv);
        for (case, config) in convs.iter().enumerate() {
            device.seed(case as u64);
            let layer = config.init(device);
            let x = random([5, config.channels[0], 11, 9]);
            assert_eq!(Path::of(&x), path);
            assert_paths_agree(
                &format!("conv case {case}"),
                x,
                (&layer.weight, layer.bias.as_ref()),
                &|x| conv2d(&layer, x),
                &|x| layer.forward(x),
            );
        }
        for (case, config) in transposed_cases().iter().enumerate() {
            device.seed(case as u64);
            let layer = config.init(device);
            assert_paths_agree(
                &format!("transposed case {case}"),
                random([5, config.channels[0], 7, 6]),
                (&layer.weight, layer.bias.as_ref()),
                &|x| conv_transpose2d(&layer, x),
                &|x| layer.forward(x),
            );
        }
    }

    #[test]
    fn flex_products_equal_burns_own() {
        let device = Device::flex().autodiff();
        check_cases(&device, Path::Own, vec![]);
        // A channels-last view (as the decoder's input is), and a plain (non-autodiff) device.
        let layer = conv_cases()[2].init(&device);
        let x =
            Tensor::<4>::random([3, 7, 7, 8], Distribution::Default, &device).permute([0, 3, 1, 2]);
        assert_paths_agree(
            "permuted input",
            x,
            (&layer.weight, layer.bias.as_ref()),
            &|x| conv2d(&layer, x),
            &|x| layer.forward(x),
        );
        let plain = Device::flex();
        let layer = transposed_cases()[0].init(&plain);
        let x = Tensor::<4>::random([2, 8, 7, 7], Distribution::Default, &plain);
        let (got, want) = (conv_transpose2d(&layer, x.clone()), layer.forward(x));
        assert_eq!(mismatch(&got, &want), None, "plain device");
    }

    /// The flex path's gradients are the same floats whatever the number of threads: a seeded
    /// run trains the same weights on any machine, and resumes bit-exactly.
    #[test]
    fn flex_gradients_do_not_depend_on_the_thread_count() {
        let device = Device::flex().autodiff();
        device.seed(3);
        let padding = PaddingConfig2d::Explicit(1, 1, 1, 1);
        let layers = [
            Conv2dConfig::new([32, 64], [4, 4])
                .with_stride([2, 2])
                .with_padding(padding.clone())
                .init(&device),
            Conv2dConfig::new([64, 16], [3, 3])
                .with_padding(padding)
                .init(&device),
        ];
        let x = Tensor::<4>::random([64, 32, 14, 14], Distribution::Default, &device);
        let gradients = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let x = x.clone().require_grad();
                let y = conv2d(&layers[1], conv2d(&layers[0], x.clone()));
                let grads = (y.clone() * y).sum().backward();
                let mut bits: Vec<u32> = Vec::new();
                for g in [
                    layers[0].weight.val().grad(&grads).unwrap(),
                    layers[1].weight.val().grad(&grads).unwrap(),
                    x.grad(&grads).unwrap(),
                ] {
                    bits.extend(g.into_data().iter::<f32>().map(f32::to_bits));
                }
                bits
            })
        };
        let one = gradients(1);
        assert!(one == gradients(2), "2 threads");
        assert!(one == gradients(5), "5 threads");
    }

    /// What the flex path leaves to Burn's module: groups, `Same` padding, other dtypes, and
    /// inputs whose channels do not match the weight's (Burn's module reports those).
    #[test]
    fn flex_leaves_groups_same_padding_and_half_precision_to_burn() {
        let device = Device::flex().autodiff();
        let grouped = Conv2dConfig::new([4, 6], [3, 3])
            .with_groups(2)
            .init(&device);
        let same = Conv2dConfig::new([4, 6], [3, 3])
            .with_padding(PaddingConfig2d::Same)
            .init(&device);
        let transposed = ConvTranspose2dConfig::new([4, 6], [3, 3])
            .with_groups(2)
            .init(&device);
        let x = Tensor::<4>::random([2, 4, 8, 8], Distribution::Default, &device);
        assert!(flex::conv2d(&grouped, &x).is_none(), "groups");
        assert!(flex::conv2d(&same, &x).is_none(), "same padding");
        assert!(flex::conv_transpose2d(&transposed, &x).is_none(), "groups");
        // An input with other channels than the weight's is Burn's module's to report.
        let plain = Conv2dConfig::new([3, 6], [3, 3]).init(&device);
        let deconv = ConvTranspose2dConfig::new([3, 6], [3, 3]).init(&device);
        assert!(
            flex::conv2d(&plain, &x).is_none(),
            "4 channels into a 3-channel conv"
        );
        assert!(
            flex::conv_transpose2d(&deconv, &x).is_none(),
            "4 channels into a 3-channel transposed conv"
        );
        for (layer, what) in [(&grouped, "groups"), (&same, "same padding")] {
            let (got, want) = (conv2d(layer, x.clone()), layer.forward(x.clone()));
            assert_eq!(mismatch(&got, &want), None, "{what} through Burn's module");
        }
        let half = x.clone().cast(burn::tensor::DType::F16);
        assert_eq!(Path::of(&half), Path::Burn, "f16 input");
        // The switch for measurements sends everything to Burn's module.
        use_burns_module(true);
        let path = Path::of(&x);
        use_burns_module(false);
        assert_eq!(path, Path::Burn);
    }

    #[cfg(feature = "tch")]
    #[test]
    #[allow(deprecated)] // Burn 0.22 deprecates its LibTorch backend but still offers it.
    fn libtorch_gradients_equal_burns_own() {
        let grouped = Conv2dConfig::new([4, 6], [3, 2])
            .with_dilation([2, 1])
            .with_groups(2)
            .with_padding(PaddingConfig2d::Explicit(2, 1, 2, 1));
        check_cases(
            &Device::libtorch().autodiff(),
            Path::LibTorch,
            vec![grouped],
        );
    }

    #[cfg(feature = "tch")]
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
