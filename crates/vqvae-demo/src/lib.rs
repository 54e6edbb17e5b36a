//! # vqvae-demo
//!
//! A small VQ-VAE trained on real MNIST digits with [`rvq_burn`]'s residual quantizer:
//! `cargo run --release --example train` from the repository root.
//!
//! - [`data`]: the embedded 10,000 digits and the IDX loader for the full set.
//! - [`model`]: encoder, quantizer, decoder.
//! - [`training`]: [`TrainingConfig`](training::TrainingConfig), the loop, checkpoints.
//! - [`evaluation`]: validation PSNR and codebook health.
//! - [`report`]: the PNG pictures; [`progress`]: the progress bar.
//! - [`cli`], [`backend`]: command line and device.
#![warn(missing_docs)]

pub mod backend;
pub mod cli;
pub mod data;
pub mod error;
pub mod evaluation;
pub mod model;
pub mod progress;
pub mod report;
pub mod training;

use data::Mnist;
use error::DemoError;
use training::{RunOptions, TrainingSummary};

/// Runs the demo for the command-line `args` (without the program name).
pub fn run(args: impl IntoIterator<Item = String>) -> Result<Option<TrainingSummary>, DemoError> {
    let cli = cli::parse(args)?;
    if cli.help {
        print!("{}", cli::USAGE);
        return Ok(None);
    }
    let data = match &cli.data_dir {
        Some(dir) => Mnist::from_dir(dir)?,
        None => Mnist::embedded(),
    };
    let device = cli.backend.device();
    if cli.verbose {
        println!(
            "device: {} ({device:?}) | train {} / validation {} digits | {} levels x {:?} codes, D = {}",
            cli.backend.name(),
            data.train
                .len()
                .min(cli.config.train_limit.unwrap_or(usize::MAX)),
            data.valid
                .len()
                .min(cli.config.valid_limit.unwrap_or(usize::MAX)),
            cli.config.model.quantizer.num_levels,
            cli.config.model.quantizer.sizes(),
            cli.config.model.quantizer.embedding_dim,
        );
    }
    let options = RunOptions {
        out: cli.out.clone(),
        resume: cli.resume,
        device,
        verbose: cli.verbose,
    };
    let summary = training::train(&cli.config, &data, &options)?;
    if cli.verbose {
        println!("outputs in {}", cli.out.display());
    }
    Ok(Some(summary))
}
