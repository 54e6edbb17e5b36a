//! # rvq-burn
//!
//! A residual vector quantizer with EMA codebook updates for [Burn](https://burn.dev): the
//! bottleneck of VQ-VAEs, neural audio codecs and image tokenizers.
//!
//! [`EmaResidualVectorQuantizer`] behaves as the Keras layer `EmaResidualVectorQuantizer` of
//! helia-edge 0.6.2 (its recorded outputs, indices, losses, metrics, input gradients and EMA
//! state are replayed by this crate's tests to 1e-5): per level, the nearest code by squared
//! distance; exponential moving averages of the per-code counts and sums of assigned vectors;
//! Laplace-smoothed counts (or Mimi's clamp, [`CodebookRule`]); codebook = sums / smoothed
//! counts; only the commitment loss `beta * mean((sg(q) - r)^2)` is back-propagated; one
//! straight-through estimator on the summed output.
//!
//! ```
//! use burn::module::Module;
//! use burn::tensor::{Device, Distribution, Tensor};
//! use rvq_burn::EmaResidualVectorQuantizerConfig;
//!
//! let device = Device::flex().autodiff();
//! let rvq = EmaResidualVectorQuantizerConfig::new(4, 64.into(), 16).init(&device);
//!
//! // Training: the input lives on an autodiff device, so the EMA statistics are updated.
//! let z = Tensor::<3>::random([8, 49, 16], Distribution::Normal(0.0, 1.0), &device).require_grad();
//! let out = rvq.forward(z.clone());
//! assert_eq!(out.quantized.dims(), [8, 49, 16]);
//! let grads = (out.quantized.clone().sum() + out.loss.clone()).backward();
//! assert!(z.grad(&grads).is_some());
//! let metrics = out.metrics().named(); // rvq_l1_perplexity, ..., rvq_bits_per_index_sum
//! assert!(metrics["rvq_usage_mean"] > 0.0);
//!
//! // Evaluation: `valid()` never updates; decode(encode(x)) is the quantized output.
//! let eval = rvq.valid();
//! let x = z.without_autodiff();
//! let codes = eval.encode(x.clone());
//! let decoded = eval.decode(&codes, [8, 49, 16]);
//! let quantized = eval.forward(x).quantized;
//! assert!(decoded.sub(quantized).abs().max().into_scalar::<f32>() < 1e-5);
//! ```
//!
//! ## Layout
//!
//! - [`config`]: [`EmaResidualVectorQuantizerConfig`] and its validation.
//! - [`codebook`]: one level, [`EmaCodebook`]: its EMA statistics, the codebook derived from
//!   them, and its step over a batch (read the state, assign, update, store).
//! - `update` (internal): what a training step does to a level's state (EMA, the
//!   data-parallel init, k-means init, dead-code restarts), chosen once per forward.
//! - `path` (internal): how a level's pass runs, chosen once per call by the device's backend
//!   type ([`Execution`]): `path/host.rs` on Burn's CPU backends (one pass over cache-sized
//!   tiles of rows), `path/kernel.rs` on Burn's CubeCL backend (CubeCL kernels, feature
//!   `wgpu`), `path/tensor.rs` as Burn tensor operations on any backend.
//! - [`residual`]: the stack, [`EmaResidualVectorQuantizer`]: forward, encode, decode, a
//!   short loop over the levels.
//! - [`options`], [`output`], [`metrics`]: what a forward takes and returns.
//! - [`entropy`], [`stream`]: codes to bytes. [`EntropyModels`] built from the EMA counts,
//!   and the self-describing, checksummed ANS stream ([`EmaResidualVectorQuantizer::try_compress`],
//!   [`EmaResidualVectorQuantizer::try_decompress`]).
//! - `interop` (feature `pytorch`): the quantizer state of PyTorch codecs (EnCodec, Mimi,
//!   vector-quantize-pytorch) in and out, through burn-store.
//! - [`error`]: [`RvqError`], returned by every `try_*` call.
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod codebook;
pub mod config;
pub mod entropy;
pub mod error;
mod hash;
#[cfg(feature = "pytorch")]
#[cfg_attr(docsrs, doc(cfg(feature = "pytorch")))]
pub mod interop;
pub mod metrics;
pub mod options;
pub mod output;
mod path;
pub mod residual;
pub mod stream;
mod update;

pub use codebook::EmaCodebook;
pub use config::{
    CodebookRule, CodebookSizes, DeadCodeRule, EmaResidualVectorQuantizerConfig, Execution,
};
pub use entropy::{EntropyModels, LevelModel};
pub use error::RvqError;
#[cfg(feature = "pytorch")]
pub use interop::{ImportReport, KeyStyle, Layout, PytorchState};
pub use metrics::{CodebookHealth, LevelMetrics, RvqMetrics};
pub use options::{ForwardOptions, Mask};
pub use output::RvqOutput;
pub use residual::EmaResidualVectorQuantizer;
pub use stream::{CodeStream, StreamError};

/// The crate README's example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
