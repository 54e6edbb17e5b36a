//! Where one training step of the demo's default recipe spends its time:
//! `cargo run --release -p vqvae-demo --example step_profile -- [--steps N] [--batch-size B]
//! [--backend flex|tch|ndarray] [--convolutions own|burn]`.
//!
//! Runs the training loop's own step (`training::profiled_step`) on a CPU backend, `flex`
//! unless `--backend` names another the demo was built with (all three are eager: an
//! operation's time is spent when it is called), and prints, per part, the median
//! milliseconds over `N` steps (after 5 warm-up steps) and its share of the step, then the
//! same as one JSON line: data (the batch to a tensor), encoder convolutions, quantizer,
//! decoder convolutions and loss, the host reads the training loop makes per step (losses and
//! the quantizer's metrics), backward (almost all of it the convolutions' backward: the
//! quantizer's is one straight-through identity and a squared error), optimizer (Adam).
//!
//! On flex, the convolutions run on the demo's own products (`--convolutions own`, the
//! default) or on Burn's module (`--convolutions burn`, for the comparison). On its own
//! products the profile also prints the convolutions' share of the forward parts and of the
//! backward (`conv forward`, `conv backward`, not counted again in the sum); Burn's module
//! cannot be timed apart inside the backward.

use std::time::Instant;

use vqvae_demo::backend::Backend;
use vqvae_demo::data::Mnist;
use vqvae_demo::profile::{StepPart, median};
use vqvae_demo::training::{TrainingConfig, epoch_order, profiled_step};

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
            ("--convolutions", _) if text == "own" || text == "burn" => {
                vqvae_demo::conv::use_burns_module(text == "burn");
            }
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
                eprintln!(
                    "usage: step_profile [--steps N] [--batch-size B] [--backend NAME] [--convolutions own|burn]"
                );
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
    let recipe = TrainingConfig::new();
    let mut model = recipe
        .model
        .try_init_seeded(&device, 42)
        .expect("the default model");
    let mut optimizer = recipe.optimizer.init();
    let order = epoch_order(data.train.len(), 42, 1);
    // The parts: the batch, then the step's own.
    let parts: Vec<&str> = std::iter::once("data")
        .chain(StepPart::ALL.iter().map(|part| part.name()))
        .collect();
    let mut times: Vec<Vec<f64>> = Vec::new();
    let mut conv_times: Vec<(f64, f64)> = Vec::new();
    for (step, batch) in order.chunks(batch_size).take(steps + 5).enumerate() {
        let mut t = vec![0.0; parts.len()];
        vqvae_demo::conv::take_timings();
        let mut clock = Instant::now();
        let images = data.train.batch(batch, &device);
        t[0] = clock.elapsed().as_secs_f64() * 1e3;
        clock = Instant::now();
        let mut lap = |part: StepPart| {
            let index = 1 + StepPart::ALL
                .iter()
                .position(|&p| p == part)
                .expect("a part");
            t[index] = clock.elapsed().as_secs_f64() * 1e3;
            clock = Instant::now();
        };
        model = profiled_step(
            model,
            &mut optimizer,
            recipe.learning_rate,
            images,
            &mut lap,
        )
        .expect("a training step");
        let convolutions = vqvae_demo::conv::take_timings();
        if step >= 5 {
            times.push(t);
            conv_times.push(convolutions);
        }
    }
    let medians: Vec<f64> = (0..parts.len())
        .map(|part| median(times.iter().map(|t| t[part]).collect()))
        .collect();
    let total: f64 = medians.iter().sum();
    println!(
        "{}: {} steps of {batch_size} images (medians, ms; sum {total:.1} ms = {:.0} images/s):",
        backend.name(),
        times.len(),
        batch_size as f64 / total * 1e3
    );
    for (part, ms) in parts.iter().zip(&medians) {
        println!("  {part:<13} {ms:>8.2} ms  {:>5.1} %", 100.0 * ms / total);
    }
    let conv_forward = median(conv_times.iter().map(|t| t.0).collect());
    let conv_backward = median(conv_times.iter().map(|t| t.1).collect());
    let mut fields: Vec<String> = parts
        .iter()
        .zip(&medians)
        .map(|(part, ms)| format!("\"{part}_ms\":{ms}"))
        .collect();
    if conv_forward > 0.0 {
        println!("  of which, the demo's own convolutions (counted above):");
        for (part, ms) in [
            ("conv forward", conv_forward),
            ("conv backward", conv_backward),
        ] {
            println!("  {part:<13} {ms:>8.2} ms  {:>5.1} %", 100.0 * ms / total);
        }
        fields.push(format!("\"conv_forward_ms\":{conv_forward}"));
        fields.push(format!("\"conv_backward_ms\":{conv_backward}"));
    }
    println!(
        "{{\"backend\":\"{}\",\"steps\":{},\"batch_size\":{batch_size},{},\"step_ms\":{total}}}",
        backend.name(),
        times.len(),
        fields.join(",")
    );
}
