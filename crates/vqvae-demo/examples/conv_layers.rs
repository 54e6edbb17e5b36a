//! The demo's six convolutions one at a time, forward and backward, on Burn's module and on
//! the demo's own products (flex):
//! `cargo run --release -p vqvae-demo --example conv_layers -- [--repeats N] [--batch-size B]`.
//!
//! Each layer runs on an autodiff flex device with a tracked input (the encoder's first layer
//! without one, as in training): the forward, then the backward of `sum(y * g)` for a fixed
//! random `g`. Prints the median milliseconds of each, per layer and path, and one JSON line per
//! layer.

use std::time::Instant;

use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2dConfig, ConvTranspose2dConfig};
use burn::tensor::{Device, Distribution, Tensor};
use vqvae_demo::conv::{conv_transpose2d, conv2d, use_burns_module};
use vqvae_demo::profile::median;

fn main() {
    let mut repeats = 30;
    let mut batch = 64;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().and_then(|v| v.parse().ok());
        match (flag.as_str(), value) {
            ("--repeats", Some(v)) => repeats = v,
            ("--batch-size", Some(v)) => batch = v,
            _ => {
                eprintln!("usage: conv_layers [--repeats N] [--batch-size B]");
                std::process::exit(2);
            }
        }
    }
    let device = Device::flex().autodiff();
    let padding = PaddingConfig2d::Explicit(1, 1, 1, 1);
    let d = 16;
    type Layer = Box<dyn Fn(Tensor<4>) -> Tensor<4>>;
    let layers: Vec<(&str, [usize; 4], bool, Layer)> = vec![
        ("encoder_1 conv 1->32 k4 s2", [batch, 1, 28, 28], false, {
            let l = Conv2dConfig::new([1, 32], [4, 4])
                .with_stride([2, 2])
                .with_padding(padding.clone())
                .init(&device);
            Box::new(move |x| conv2d(&l, x))
        }),
        ("encoder_2 conv 32->64 k4 s2", [batch, 32, 14, 14], true, {
            let l = Conv2dConfig::new([32, 64], [4, 4])
                .with_stride([2, 2])
                .with_padding(padding.clone())
                .init(&device);
            Box::new(move |x| conv2d(&l, x))
        }),
        ("encoder_3 conv 64->16 k3", [batch, 64, 7, 7], true, {
            let l = Conv2dConfig::new([64, d], [3, 3])
                .with_padding(padding.clone())
                .init(&device);
            Box::new(move |x| conv2d(&l, x))
        }),
        ("decoder_1 conv 16->64 k3", [batch, d, 7, 7], true, {
            let l = Conv2dConfig::new([d, 64], [3, 3])
                .with_padding(padding.clone())
                .init(&device);
            Box::new(move |x| conv2d(&l, x))
        }),
        ("decoder_2 convT 64->32 k4 s2", [batch, 64, 7, 7], true, {
            let l = ConvTranspose2dConfig::new([64, 32], [4, 4])
                .with_stride([2, 2])
                .with_padding([1, 1])
                .init(&device);
            Box::new(move |x| conv_transpose2d(&l, x))
        }),
        ("decoder_3 convT 32->1 k4 s2", [batch, 32, 14, 14], true, {
            let l = ConvTranspose2dConfig::new([32, 1], [4, 4])
                .with_stride([2, 2])
                .with_padding([1, 1])
                .init(&device);
            Box::new(move |x| conv_transpose2d(&l, x))
        }),
    ];
    println!("median ms over {repeats} runs, batch {batch}: forward / backward");
    let (mut total_burn, mut total_own) = ([0.0; 2], [0.0; 2]);
    for (name, dims, track, layer) in &layers {
        let x = Tensor::<4>::random(*dims, Distribution::Default, &device);
        let mut results = Vec::new();
        for burns in [true, false] {
            use_burns_module(burns);
            let g = Tensor::<4>::random(layer(x.clone()).dims(), Distribution::Default, &device);
            let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
            for run in 0..repeats + 3 {
                let x = if *track {
                    x.clone().require_grad()
                } else {
                    x.clone()
                };
                let start = Instant::now();
                let y = layer(x); // flex is eager: the forward is done here
                let forward = start.elapsed().as_secs_f64() * 1e3;
                let loss = (y * g.clone()).sum();
                let start = Instant::now();
                let grads = loss.backward();
                let backward = start.elapsed().as_secs_f64() * 1e3;
                drop(grads);
                if run >= 3 {
                    fwd.push(forward);
                    bwd.push(backward);
                }
            }
            results.push([median(fwd), median(bwd)]);
        }
        use_burns_module(false);
        let ([bf, bb], [of, ob]) = (results[0], results[1]);
        for i in 0..2 {
            total_burn[i] += results[0][i];
            total_own[i] += results[1][i];
        }
        println!(
            "  {name:<30} burn {bf:>6.2} / {bb:>6.2}   own {of:>6.2} / {ob:>6.2}   ({:.1}x / {:.1}x)",
            bf / of,
            bb / ob
        );
        println!(
            "{{\"layer\":\"{name}\",\"burn_forward_ms\":{bf},\"burn_backward_ms\":{bb},\"own_forward_ms\":{of},\"own_backward_ms\":{ob}}}"
        );
    }
    println!(
        "  {:<30} burn {:>6.2} / {:>6.2}   own {:>6.2} / {:>6.2}",
        "all six", total_burn[0], total_burn[1], total_own[0], total_own[1]
    );
}
