//! # vqvae-demo
//!
//! A small VQ-VAE trained on real MNIST digits with [`rvq_burn`]'s residual quantizer:
//! `cargo run --release --example train` from the repository root.
//!
//! - [`data`]: the embedded 10,000 digits and the IDX loader for the full set.
//! - [`model`]: encoder, quantizer, decoder; [`conv`]: its convolutions (LibTorch's own
//!   gradients on the `tch` backend).
//! - [`training`]: [`TrainingConfig`](training::TrainingConfig) and the loop, on one device
//!   or several (data-parallel).
//! - [`checkpoint`]: checkpoints committed so that a killed run resumes; [`metrics`]: the
//!   per-epoch records of `metrics.jsonl`.
//! - [`evaluation`]: validation PSNR and codebook health.
//! - [`profile`]: the parts of a training step, for the step profile.
//! - [`report`]: the pictures (digits, codebook usage, training curves); [`progress`]: the
//!   progress bar.
//! - [`codec`]: the trained model as an image codec (`compress`, `decompress`);
//!   [`rd_curve`]: its rate-distortion curve (`rd-curve`).
//! - [`cli`], [`backend`]: command line and device.
#![warn(missing_docs)]

pub mod backend;
pub mod checkpoint;
pub mod cli;
pub mod codec;
pub mod conv;
pub mod data;
pub mod error;
pub mod evaluation;
pub mod metrics;
pub mod model;
pub mod profile;
pub mod progress;
pub mod rd_curve;
pub mod report;
pub mod training;

use data::Mnist;
use error::DemoError;
use training::RunOptions;

/// Runs the demo for the command-line `args` (without the program name): training (on one
/// device, or on several with `--devices N`), or the `compress`/`decompress`/`rd-curve`
/// commands.
pub fn run(args: impl IntoIterator<Item = String>) -> Result<(), DemoError> {
    let mut args: Vec<String> = args.into_iter().collect();
    if let Some(command @ ("compress" | "decompress" | "rd-curve")) =
        args.first().map(String::as_str)
    {
        let command = command.to_string();
        args.remove(0);
        return run_codec(&command, args);
    }
    let cli = cli::parse(args)?;
    if cli.help {
        print!("{}", cli::USAGE);
        return Ok(());
    }
    let data = match &cli.data_dir {
        Some(dir) => Mnist::from_dir(dir)?,
        None => Mnist::embedded(),
    };
    // One choice of devices for the whole run; the first also codes.
    let devices = cli.backend.devices(cli.devices)?;
    if cli.verbose {
        println!(
            "device: {} ({:?}{}) | train {} / validation {} digits | {} levels x {:?} codes, D = {}",
            cli.backend.name(),
            devices[0],
            match cli.devices {
                1 => String::new(),
                n => format!(", {n} devices"),
            },
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
        devices,
        verbose: cli.verbose,
    };
    training::train(&cli.config, &data, &options)?;
    if cli.verbose {
        println!("outputs in {}", cli.out.display());
    }
    Ok(())
}

fn run_codec(command: &str, args: Vec<String>) -> Result<(), DemoError> {
    let cli = cli::parse_codec(command, args)?;
    if cli.help {
        print!("{}", cli::CODEC_USAGE);
        return Ok(());
    }
    let device = cli.backend.device()?;
    match cli.command {
        cli::CodecCommand::Compress(options) => {
            let report = codec::compress(&options, &device)?;
            println!("{}", report.summary());
            println!(
                "wrote {} and {}",
                options.output.display(),
                options.picture.display()
            );
        }
        cli::CodecCommand::Decompress {
            run,
            input,
            picture,
        } => {
            let (images, bits) = codec::decompress(&run, &input, &picture, &device)?;
            println!(
                "{images} digits from {} ({bits:.1} bits per digit); wrote {}",
                input.display(),
                picture.display()
            );
        }
        cli::CodecCommand::RdCurve(options) => {
            let curve = rd_curve::rd_curve(&options, &device)?;
            println!("{}", curve.summary());
            println!(
                "wrote {} and {}",
                options.out.join("rd_curve.jsonl").display(),
                options.out.join("rd_curve.png").display()
            );
        }
    }
    Ok(())
}
