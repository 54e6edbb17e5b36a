//! The VQ-VAE: a small convolutional encoder, the residual quantizer, a mirrored decoder.
//!
//! ```text
//! [B,1,28,28] -Conv(1->32,k4,s2,p1)-ReLU-Conv(32->64,k4,s2,p1)-ReLU-Conv(64->D,k3,s1,p1)-> [B,D,7,7]
//!             -> channels last [B,7,7,D] -> EmaResidualVectorQuantizer -> [B,7,7,D] -> [B,D,7,7]
//!             -Conv(D->64,k3,s1,p1)-ReLU-ConvT(64->32,k4,s2,p1)-ReLU-ConvT(32->1,k4,s2,p1)-sigmoid-> [B,1,28,28]
//! ```

use std::sync::{Mutex, PoisonError};

use burn::config::Config;
use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig};
use burn::tensor::activation::{relu, sigmoid};
use burn::tensor::{Device, Int, Tensor};
use rvq_burn::{
    CodebookSizes, EmaResidualVectorQuantizer, EmaResidualVectorQuantizerConfig, ForwardOptions,
    RvqError, RvqOutput,
};

use crate::conv::{conv_transpose2d, conv2d};
use crate::profile::StepPart;

/// The side of the latent grid: a 28 x 28 digit is encoded as 7 x 7 latent vectors (two
/// stride-2 convolutions), each quantized on its own.
pub const LATENT_SIDE: usize = 7;

/// The model's architecture.
#[derive(Config, Debug)]
pub struct VqVaeConfig {
    /// Channels of the first encoder convolution (and the last decoder one). Default: 32.
    #[config(default = 32)]
    pub channels_1: usize,
    /// Channels of the second encoder convolution (and the first decoder one). Default: 64.
    #[config(default = 64)]
    pub channels_2: usize,
    /// The bottleneck; its `embedding_dim` is the latent dimension `D`.
    /// Default: 4 levels x 64 codes, D = 16, beta 0.25, decay 0.99.
    #[config(default = "EmaResidualVectorQuantizerConfig::new(4, CodebookSizes::Uniform(64), 16)")]
    pub quantizer: EmaResidualVectorQuantizerConfig,
}

/// Encoder, residual quantizer, decoder.
#[derive(Module, Debug)]
pub struct VqVae {
    encoder_1: Conv2d,
    encoder_2: Conv2d,
    encoder_3: Conv2d,
    /// The bottleneck.
    pub quantizer: EmaResidualVectorQuantizer,
    decoder_1: Conv2d,
    decoder_2: ConvTranspose2d,
    decoder_3: ConvTranspose2d,
}

/// What a training or evaluation forward gives.
#[derive(Debug, Clone)]
pub struct VqVaeOutput {
    /// Reconstructed images `[B, 1, 28, 28]` in `[0, 1]`.
    pub reconstruction: Tensor<4>,
    /// Pixel mean squared error, `[1]`.
    pub reconstruction_loss: Tensor<1>,
    /// The quantizer's output on the latents `[B, 7, 7, D]` (loss, indices, histograms).
    pub quantizer: RvqOutput<4>,
}

impl VqVaeOutput {
    /// Reconstruction error plus commitment loss: what training minimizes.
    pub fn loss(&self) -> Tensor<1> {
        self.reconstruction_loss
            .clone()
            .add(self.quantizer.loss.clone())
    }
}

/// Held while a model draws its initial weights: Burn keeps one random generator per backend
/// for the whole process, so two models initialized at once (tests side by side, several
/// models in one program) would otherwise draw each other's numbers, and a seeded run would
/// start from weights its seed does not give.
static INIT: Mutex<()> = Mutex::new(());

/// Draws every weight now. Burn's layers draw a weight's initial value at its first use, not
/// at `init`; left lazy, the draws would happen after [`INIT`] is released, from a generator
/// other threads may have moved on (or re-seeded) in between.
struct DrawWeights;

impl ModuleVisitor for DrawWeights {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let _ = param.val();
    }
}

impl VqVaeConfig {
    /// The model on `device` with the initial weights (and codebooks) that `seed` gives: the
    /// same weights for the same seed, whatever else in this process initializes models at
    /// the same time, and on every backend. They are drawn from the `flex` CPU backend's
    /// generator, seeded with `seed`, and loaded onto `device`, as a checkpoint is: each
    /// backend has a generator of its own (LibTorch's is PyTorch's), so a seed drawn on the
    /// training device would start each backend from other weights. `device`'s generator is
    /// then seeded with `seed` as well.
    pub fn try_init_seeded(&self, device: &Device, seed: u64) -> Result<VqVae, RvqError> {
        let _drawing = INIT.lock().unwrap_or_else(PoisonError::into_inner);
        let host = Device::flex();
        host.seed(seed);
        let drawn = self.init_weights(&host)?;
        drawn.visit(&mut DrawWeights);
        // The training device's own generator (dropout depths, masks) starts from the seed too.
        device.seed(seed);
        // Loaded, not moved: a loaded parameter keeps the target's autodiff tracking.
        Ok(self.init_weights(device)?.load_record(drawn.into_record()))
    }

    /// Builds the model on `device` with weights from the device's random generator; fails on
    /// an invalid quantizer configuration.
    pub fn try_init(&self, device: &Device) -> Result<VqVae, RvqError> {
        let _drawing = INIT.lock().unwrap_or_else(PoisonError::into_inner);
        let model = self.init_weights(device)?;
        model.visit(&mut DrawWeights);
        Ok(model)
    }

    fn init_weights(&self, device: &Device) -> Result<VqVae, RvqError> {
        let latent = self.quantizer.embedding_dim;
        let padding = |p| PaddingConfig2d::Explicit(p, p, p, p);
        Ok(VqVae {
            encoder_1: Conv2dConfig::new([1, self.channels_1], [4, 4])
                .with_stride([2, 2])
                .with_padding(padding(1))
                .init(device),
            encoder_2: Conv2dConfig::new([self.channels_1, self.channels_2], [4, 4])
                .with_stride([2, 2])
                .with_padding(padding(1))
                .init(device),
            encoder_3: Conv2dConfig::new([self.channels_2, latent], [3, 3])
                .with_padding(padding(1))
                .init(device),
            quantizer: self.quantizer.try_init(device)?,
            decoder_1: Conv2dConfig::new([latent, self.channels_2], [3, 3])
                .with_padding(padding(1))
                .init(device),
            decoder_2: ConvTranspose2dConfig::new([self.channels_2, self.channels_1], [4, 4])
                .with_stride([2, 2])
                .with_padding([1, 1])
                .init(device),
            decoder_3: ConvTranspose2dConfig::new([self.channels_1, 1], [4, 4])
                .with_stride([2, 2])
                .with_padding([1, 1])
                .init(device),
        })
    }
}

impl VqVae {
    /// Latents `[B, 7, 7, D]` (channels last, as the quantizer wants them) of `images`
    /// `[B, 1, 28, 28]`.
    pub fn encode(&self, images: Tensor<4>) -> Tensor<4> {
        let x = relu(conv2d(&self.encoder_1, images)); // [B, 32, 14, 14]
        let x = relu(conv2d(&self.encoder_2, x)); // [B, 64, 7, 7]
        conv2d(&self.encoder_3, x).permute([0, 2, 3, 1]) // [B, D, 7, 7] -> [B, 7, 7, D]
    }

    /// Images `[B, 1, 28, 28]` from (quantized) latents `[B, 7, 7, D]`.
    pub fn decode(&self, latents: Tensor<4>) -> Tensor<4> {
        let x = latents.permute([0, 3, 1, 2]); // [B, D, 7, 7]
        let x = relu(conv2d(&self.decoder_1, x)); // [B, 64, 7, 7]
        let x = relu(conv_transpose2d(&self.decoder_2, x)); // [B, 32, 14, 14]
        sigmoid(conv_transpose2d(&self.decoder_3, x)) // [B, 1, 28, 28]
    }

    /// Encode, quantize (updating the codebooks when training), decode.
    pub fn forward(&self, images: Tensor<4>, options: &ForwardOptions) -> VqVaeOutput {
        self.forward_reporting(images, options, &mut StepPart::ignore)
    }

    /// The reconstruction of `images` `[B, 1, 28, 28]` through the quantizer (in eval mode on
    /// a plain device), without the losses.
    pub fn reconstruct(&self, images: Tensor<4>) -> Tensor<4> {
        let latents = self.encode(images);
        self.decode(self.quantizer.forward(latents).quantized)
    }

    /// [`VqVae::forward`], telling `lap` as each of its parts ends (the step profile's clock).
    pub fn forward_reporting(
        &self,
        images: Tensor<4>,
        options: &ForwardOptions,
        lap: &mut dyn FnMut(StepPart),
    ) -> VqVaeOutput {
        let latents = self.encode(images.clone());
        lap(StepPart::Encoder);
        let quantizer = self.quantizer.forward_with(latents, options);
        lap(StepPart::Quantizer);
        let reconstruction = self.decode(quantizer.quantized.clone());
        let reconstruction_loss = reconstruction.clone().sub(images).powi_scalar(2).mean();
        lap(StepPart::DecoderAndLoss);
        VqVaeOutput {
            reconstruction,
            reconstruction_loss,
            quantizer,
        }
    }

    /// Images decoded from the first `codes.len()` levels of `codes` (`[B*49]` each), for
    /// images `[batch, 1, 28, 28]`.
    pub fn decode_codes(&self, codes: &[Tensor<1, Int>], batch: usize) -> Tensor<4> {
        let latent = self.quantizer.embedding_dim();
        // Codes past a latent's depth (a rate-distortion stream) are -1.
        let latents = self
            .quantizer
            .try_decode_partial(codes, [batch, LATENT_SIDE, LATENT_SIDE, latent])
            .unwrap_or_else(|error| panic!("{error}"));
        self.decode(latents)
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Distribution;

    use super::*;

    fn weights(model: &VqVae) -> Vec<f32> {
        let latents = Tensor::<4>::ones([1, 7, 7, 16], &Device::flex());
        let images = Tensor::<4>::ones([1, 1, 28, 28], &Device::flex());
        let mut values: Vec<f32> = model.encode(images).into_data().iter::<f32>().collect();
        values.extend(model.decode(latents).into_data().iter::<f32>());
        values
    }

    /// A seeded model has its seed's weights even when the generator is re-seeded and drawn
    /// from between its init and its first use (as other tests and threads do): its weights
    /// are drawn inside `try_init_seeded`, not at first use.
    #[test]
    fn seeded_weights_do_not_depend_on_later_draws() {
        let device = Device::flex();
        let config = VqVaeConfig::new();
        let first = config.try_init_seeded(&device, 7).unwrap();
        let second = config.try_init_seeded(&device, 7).unwrap();
        device.seed(12345);
        let _ = Tensor::<1>::random([1000], Distribution::Default, &device).into_data();
        let third = config.try_init_seeded(&device, 7).unwrap();
        // first used only now, after two more seedings and other draws
        let want = weights(&first);
        assert!(weights(&second) == want, "the same seed gave other weights");
        assert!(
            weights(&third) == want,
            "a draw in between changed the weights"
        );
        let other = config.try_init_seeded(&device, 8).unwrap();
        assert!(
            weights(&other) != want,
            "another seed gave the same weights"
        );
        // The same weights on an autodiff device (the training device), and on LibTorch.
        let trained = config
            .try_init_seeded(&device.clone().autodiff(), 7)
            .unwrap();
        assert!(weights(&trained.valid()) == want, "autodiff device");
        let images = Tensor::<4>::ones([1, 1, 28, 28], &device.clone().autodiff());
        let grads = trained.encode(images).sum().backward();
        let weight = trained.encoder_1.weight.val();
        assert!(weight.grad(&grads).is_some(), "the weights are not tracked");
        // Burn 0.22 deprecates its LibTorch backend but still offers it.
        #[cfg(feature = "tch")]
        #[allow(deprecated)]
        {
            let libtorch = config.try_init_seeded(&Device::libtorch(), 7).unwrap();
            let codebook = |model: &VqVae| model.quantizer.codebook(0, &Device::flex()).into_data();
            codebook(&libtorch).assert_eq(&codebook(&first), true);
            assert!(
                weights(&libtorch.to_device(&Device::flex())) == want,
                "LibTorch"
            );
        }
    }
}
