//! Where one training step of the demo's default recipe spends its time:
//! `cargo run --release -p vqvae-demo --example step_profile -- [--steps N] [--batch-size B]
//! [--backend flex|tch|ndarray]`.
//!
//! Runs the demo's step piece by piece on a CPU backend, `flex` unless `--backend` names
//! another the demo was built with (all three are eager: an operation's time is spent when it
//! is called), and prints, per piece, the median milliseconds over `N` steps
//! (after 5 warm-up steps) and its share of the step, then the same as one JSON line:
//! data (the batch to a tensor), encoder convolutions, quantizer, decoder convolutions and
//! loss, backward (almost all of it the convolutions' backward: the quantizer's is one
//! straight-through identity and a squared error), optimizer (Adam), and the host reads the
//! training loop makes per step (losses and the quantizer's metrics).

use std::time::Instant;

use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::Tensor;
use rvq_burn::ForwardOptions;
use vqvae_demo::backend::Backend;
use vqvae_demo::data::Mnist;
use vqvae_demo::model::VqVaeConfig;
use vqvae_demo::training::epoch_order;

const PARTS: [&str; 7] = [
    "data",
    "encoder",
    "quantizer",
    "decoder+loss",
    "backward",
    "optimizer",
    "reads",
];

fn main() {
    let mut steps = 60;
    let mut batch_size = 64;
    let mut backend = Backend::Flex;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let text = args.next().unwrap_or_default();
        let value = text.parse().ok();
        match (flag.as_str(), value) {
            ("--steps", Some(v)) => steps = v,
            ("--batch-size", Some(v)) => batch_size = v,
            ("--backend", _) => match text.parse::<Backend>() {
                Ok(Backend::Wgpu) => {
                    eprintln!("step_profile times eager CPU backends; wgpu runs asynchronously");
                    std::process::exit(2);
                }
                Ok(named) => backend = named,
                Err(error) => {
                    eprintln!("{error}");
                    std::process::exit(2);
                }
            },
            _ => {
                eprintln!("usage: step_profile [--steps N] [--batch-size B] [--backend NAME]");
                std::process::exit(2);
            }
        }
    }
    let device = match backend.device() {
        Ok(device) => device.autodiff(),
        Err(error) => {
            eprintln!("{error}");
            std::process::exit(2);
        }
    };
    let data = Mnist::embedded();
    let mut model = VqVaeConfig::new()
        .try_init_seeded(&device, 42)
        .expect("the default model");
    let mut optimizer = AdamConfig::new().init();
    let order = epoch_order(data.train.len(), 42, 1);
    let mut times: Vec<[f64; 7]> = Vec::new();
    for (step, batch) in order.chunks(batch_size).take(steps + 5).enumerate() {
        let mut t = [0.0; 7];
        let mut clock = Instant::now();
        let mut lap = |part: usize, t: &mut [f64; 7]| {
            t[part] = clock.elapsed().as_secs_f64() * 1e3;
            clock = Instant::now();
        };
        let images = data.train.batch(batch, &device);
        lap(0, &mut t);
        let latents = model.encode(images.clone());
        lap(1, &mut t);
        let quantized = model
            .quantizer
            .forward_with(latents, &ForwardOptions::default());
        lap(2, &mut t);
        let reconstruction = model.decode(quantized.quantized.clone());
        let mse = reconstruction.sub(images).powi_scalar(2).mean();
        let loss = mse.clone().add(quantized.loss.clone());
        lap(3, &mut t);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        lap(4, &mut t);
        model = optimizer.step(1e-3, model, grads);
        lap(5, &mut t);
        let values: Vec<f64> = Tensor::cat(
            vec![
                mse.without_autodiff(),
                quantized.loss.clone().without_autodiff(),
            ],
            0,
        )
        .into_data()
        .iter::<f64>()
        .collect();
        let perplexity = quantized.metrics().perplexity_mean();
        std::hint::black_box((values, perplexity));
        lap(6, &mut t);
        if step >= 5 {
            times.push(t);
        }
    }
    let median = |part: usize| {
        let mut v: Vec<f64> = times.iter().map(|t| t[part]).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let medians: Vec<f64> = (0..PARTS.len()).map(median).collect();
    let total: f64 = medians.iter().sum();
    println!(
        "{}: {} steps of {batch_size} images (medians, ms; sum {total:.1} ms = {:.0} images/s):",
        backend.name(),
        times.len(),
        batch_size as f64 / total * 1e3
    );
    for (part, ms) in PARTS.iter().zip(&medians) {
        println!("  {part:<13} {ms:>8.2} ms  {:>5.1} %", 100.0 * ms / total);
    }
    let fields: Vec<String> = PARTS
        .iter()
        .zip(&medians)
        .map(|(part, ms)| format!("\"{part}_ms\":{ms}"))
        .collect();
    println!(
        "{{\"backend\":\"{}\",\"steps\":{},\"batch_size\":{batch_size},{},\"step_ms\":{total}}}",
        backend.name(),
        times.len(),
        fields.join(",")
    );
}
