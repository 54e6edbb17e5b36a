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
//! ## Map of the crate
//!
//! [`EmaResidualVectorQuantizerConfig`] (`config.rs`) holds every setting and its
//! validation, and the [`CodebookRule`] that derives a codebook from EMA statistics, for the
//! layer, the entropy models and the import alike. `init` turns it into the module,
//! [`EmaResidualVectorQuantizer`] (`quantizer/`), which keeps that configuration as its one
//! copy: the entry points (`forward.rs`: forward, encode, decode) check their input and run
//! the levels in a short loop; `estimator.rs` turns what the levels gave into the output (the
//! commitment loss, the straight-through estimator, the rotation trick); `projection.rs` holds
//! the `codebook_dim` projections in and out of the codebooks' space; `bitrate.rs` prices
//! the codes. A level (`level/`) is an EMA codebook with its own state ([`Statistics`]) and
//! step: read the state, assign, update, store; what a training step does to it (EMA, k-means
//! init, dead-code restarts, data-parallel replacement) is the schedule (`schedule.rs`) the
//! configuration sets, with `kmeans.rs` and `restart.rs` beside it. How a level's pass over the rows runs is
//! the execution path (`path/`), chosen once per call by the device's backend type. Codes
//! become bytes in [`coding`]; PyTorch codecs' state comes in and goes out through
//! `interop` (feature `pytorch`); [`metrics`] and [`RvqOutput`] are what a
//! forward reports; [`error`] has every error. `util.rs` holds the fixed hashes and the
//! tensor-to-host conversions.
//!
//! ## Execution paths
//!
//! Each call runs its levels on one of three paths, chosen by the device's backend type
//! ([`Execution::Auto`]) and each in its own file:
//!
//! - the host path (`path/host/`) on Burn's CPU backends (`flex`, `ndarray`, LibTorch's CPU
//!   device): one pass over cache-sized tiles of rows does a level's search, residual, losses
//!   and statistics;
//! - the kernel path (`path/kernel/`, feature `wgpu`) on Burn's CubeCL backend: CubeCL
//!   kernels for the search, the per-code statistics and `decode`;
//! - the tensor path (`path/tensor.rs`): Burn tensor operations on any backend, the plain
//!   version the others are tested equal to ([`Execution::TensorOps`] forces it).
//!
//! ## Features
//!
//! `flex` (default), `ndarray`, `tch` and `wgpu` bring Burn's backend of that name and this
//! crate's path for it; `pytorch` brings the `interop` module (PyTorch codecs' quantizer
//! state in and out).
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod coding;
pub mod config;
pub mod error;
#[cfg(feature = "pytorch")]
#[cfg_attr(docsrs, doc(cfg(feature = "pytorch")))]
pub mod interop;
mod level;
pub mod metrics;
mod options;
mod output;
mod path;
mod quantizer;
mod util;

pub use coding::{CodeStream, EntropyModels, LevelModel};
pub use config::{
    CodebookRule, CodebookSizes, DeadCodeRule, EmaResidualVectorQuantizerConfig, Execution,
};
pub use error::{RvqError, StreamError};
#[cfg(feature = "pytorch")]
pub use interop::{ImportReport, KeyStyle, Layout, PytorchState};
pub use level::Statistics;
pub use metrics::{CodebookHealth, LevelMetrics, RvqMetrics};
pub use options::{EncodeOptions, ForwardOptions, Mask};
pub use output::RvqOutput;
pub use quantizer::{EmaResidualVectorQuantizer, Projection};

/// The crate README's example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
