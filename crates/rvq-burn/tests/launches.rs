//! The kernel path's launches per level (WGPU; Mesa's lavapipe in CI), counted by CubeCL's
//! launch observer: a guard on how a step's work is split into launches (the level's kernels
//! and Burn's fusion of the operations around them), not a timing. The observer sees every
//! launch of the process, so this binary holds this one test.
#![cfg(feature = "wgpu")]

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use burn::module::Module;
use burn::tensor::Tensor;
use common::*;
use cubecl::config::{TypeNameFormatLevel, type_name_format};
use cubecl::logging::{Duration, LaunchObservation, LaunchObserver, TimingMethod, TimingRequest};
use rvq_burn::{EmaResidualVectorQuantizer, EmaResidualVectorQuantizerConfig};

/// Launches by kernel name.
#[derive(Default)]
struct Counter(Mutex<BTreeMap<String, usize>>);

impl LaunchObserver for Counter {
    fn launched(&self, kernel: &'static str) {
        let name = type_name_format(kernel, TypeNameFormatLevel::Short);
        *self
            .0
            .lock()
            .expect("not poisoned")
            .entry(name)
            .or_default() += 1;
    }

    fn timing(&self) -> TimingRequest {
        TimingRequest::None
    }

    fn timed(&self, _kernel: &'static str, _duration: Duration, _method: TimingMethod) {}
}

/// The launches `run` issues (after a first, unobserved run: kernels compile and Burn's
/// fusion settles), their total and by kernel.
fn launches(device: &burn::tensor::Device, run: impl Fn()) -> (usize, BTreeMap<String, usize>) {
    run();
    device.sync().expect("device sync");
    let counter = Arc::new(Counter::default());
    let observation = LaunchObservation::new(counter.clone());
    run();
    device.sync().expect("device sync");
    drop(observation);
    let by_kernel = counter.0.lock().expect("not poisoned").clone();
    (by_kernel.values().sum(), by_kernel)
}

fn train_step(rvq: &EmaResidualVectorQuantizer, x: &Tensor<2>) {
    let input = x.clone().autodiff().require_grad();
    let out = rvq.forward(input.clone());
    let grads = out.loss.backward();
    let _ = input.grad(&grads).expect("gradient");
    rvq.sync_state();
}

/// Eight levels: a training step (forward, backward, the EMA update) at most 7 launches per
/// level, every one of Burn's operations around the kernels fused as before (this caught
/// eight independent loss chains leaving every later operation unfused); an evaluation
/// forward at most 4 per level; `encode` a search per level and one codebook launch per 4
/// levels; `decode` the codebook launches and a few launches for all levels.
#[test]
fn launches_per_level_stay_within_budget() {
    if std::env::var_os("RVQ_SKIP_WGPU").is_some() {
        eprintln!("RVQ_SKIP_WGPU set: launch count SKIPPED");
        return;
    }
    let device = wgpu_device();
    let (n, d, k, m) = (512, 16, 64, 8);
    let config = EmaResidualVectorQuantizerConfig::new(m, k.into(), d);
    let rvq = seeded_quantizer(&config, &device.clone().autodiff(), 3);
    let values: Vec<f32> = (0..n * d)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 200.0)
        .collect();
    let x: Tensor<2> = Tensor::from_data(burn::tensor::TensorData::new(values, [n, d]), &device);

    let (train, by_kernel) = launches(&device, || train_step(&rvq, &x));
    // The levels' codebooks in one launch per 4 levels, where a launch per level made it 61.
    let codebook_launches = m.div_ceil(4);
    assert!(
        train <= 7 * m,
        "training step: {train} launches for {m} levels: {by_kernel:?}"
    );
    let eval = rvq.valid();
    let (forward, by_kernel) = launches(&device, || {
        let _ = eval.forward(x.clone()).loss.into_data();
    });
    assert!(
        forward <= 4 * m,
        "evaluation forward: {forward} launches for {m} levels: {by_kernel:?}"
    );
    let (encode, by_kernel) = launches(&device, || {
        let codes = eval.encode(x.clone());
        let _ = codes.last().map(|c| c.clone().into_data());
    });
    assert_eq!(encode, m + codebook_launches, "encode: {by_kernel:?}");
    let codes = eval.encode(x.clone());
    let (decode, by_kernel) = launches(&device, || {
        let _ = eval.decode(&codes, [n, d]).into_data();
    });
    // The codebooks, the decode, the index check's two reductions over all levels (two per
    // level made it 4 M + 4) and the stacking of codes and codebooks.
    assert!(
        decode <= codebook_launches + 6,
        "decode: {decode} launches for {m} levels: {by_kernel:?}"
    );
    eprintln!(
        "launches for {m} levels: training {train}, evaluation {forward}, encode {encode}, \
         decode {decode}"
    );
}
