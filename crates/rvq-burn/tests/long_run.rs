//! A long run: 100,000 training steps at decay 0.999 on a slowly drifting distribution.
//!
//! Every state value stays finite, the total EMA count follows its closed form
//! `n_t = g n_{t-1} + (1 - g) N` (each step assigns exactly N vectors), and the codebook stays
//! equal to sums / smoothed counts.

mod common;

use burn::tensor::{Device, Tensor, TensorData};
use common::*;
use rvq_burn::EmaResidualVectorQuantizerConfig;

/// Steps of the run; `RVQ_LONG_RUN_STEPS` overrides it (e.g. for a quicker local run).
fn steps() -> usize {
    std::env::var("RVQ_LONG_RUN_STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

#[test]
fn a_hundred_thousand_steps_keep_the_state_finite_and_consistent() {
    let device = Device::flex().autodiff();
    let (n, d, k, decay) = (8usize, 2usize, 4usize, 0.999f64);
    let rvq = EmaResidualVectorQuantizerConfig::new(2, k.into(), d)
        .with_ema_decay(decay)
        .init(&device);
    // The closed form of the total count, from the initial total K (counts start at one).
    let mut expected_total = k as f64;
    let total_steps = steps();
    for step in 0..total_steps {
        // Points on a circle of radius 1 whose centre drifts slowly, plus a fixed pattern.
        let angle = step as f64 * 1e-4;
        let (cx, cy) = (3.0 * angle.cos(), 3.0 * angle.sin());
        let values: Vec<f32> = (0..n)
            .flat_map(|i| {
                let phase = i as f64 * std::f64::consts::TAU / n as f64;
                [(cx + phase.cos()) as f32, (cy + phase.sin()) as f32]
            })
            .collect();
        let x: Tensor<2> = Tensor::from_data(TensorData::new(values, [n, d]), &device);
        let _ = rvq.forward(x);
        expected_total = decay * expected_total + (1.0 - decay) * n as f64;

        if step % 10_000 == 9_999 || step + 1 == total_steps {
            for (level, total) in assert_finite_and_consistent(&rvq).into_iter().enumerate() {
                assert!(
                    (total - expected_total).abs() <= 1e-4 * expected_total,
                    "step {step} level {level}: total count {total}, closed form {expected_total}"
                );
            }
        }
    }
}
