//! Data-parallel training on several devices with Burn's own strategy
//! (`ExecutionStrategy::multi`), against one device trained on the union of the devices'
//! batches.
//!
//! Under `multi`, every device runs the training step on its own thread with a clone of the
//! model; the clones share each `RunningState`, whose pending per-thread updates are averaged
//! at the next read. With `data_parallel` on, every state change is a per-code count or sum
//! of the batch, or a decision taken from the synchronized state, so the averaged state of k
//! devices is exactly the state of one device on the union of their batches divided by k,
//! and the codebook, a ratio of sums to counts, does not see the 1/k. Except through the
//! Laplace smoothing `c^ = (c + eps) / (n + K eps) * n`: with counts and total divided by k,
//! `k c^` is the smoothing of the union's counts with `k eps`. Hence two tests:
//!
//! - two devices with `eps` equal one device on the union with `2 eps`: to float rounding
//!   (the devices' gradients are summed in another order than the union's, and the averaged
//!   state is rounded once more), which stays below `ROUNDING` relative over these steps;
//! - two devices and one device with the same `eps` differ by the smoothing term alone: a
//!   code of (one-device) count `c` moves by at most `(k - 1) eps (1 / c + K / n)` relative,
//!   plus the rounding.
//!
//! Both hold only while no vector lies so close to a decision boundary that these differences
//! move it to another code. The data are well-separated clusters; k-means splitting, though,
//! puts boundaries inside clusters on purpose, which is why the k-means comparison is made
//! against `2 eps`, where the difference is rounding alone.

mod common;

use std::path::PathBuf;

use burn::data::dataloader::DataLoaderBuilder;
use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::InMemDataset;
use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::optim::{GradientsParams, SgdConfig};
use burn::tensor::{Device, Tensor, TensorData};
use burn::train::{
    ExecutionStrategy, InferenceStep, Learner, MultiDeviceOptim, SupervisedTraining, TrainOutput,
    TrainStep,
};
use common::{Rng, seeded_quantizer};
use rvq_burn::{EmaResidualVectorQuantizer, EmaResidualVectorQuantizerConfig};

/// Float rounding, relative: f32 has 6e-8; the state goes through about 20 steps of EMA
/// sums, each summing 64-128 vectors per code in another order on each side (measured: under
/// 1e-6).
const ROUNDING: f64 = 1e-5;

const DIM: usize = 8;
/// Vectors per device and step.
const BATCH: usize = 64;
/// Steps per epoch.
const STEPS: usize = 6;
const EPOCHS: usize = 3;
const DEVICES: usize = 2;
const LEARNING_RATE: f64 = 0.05;

/// A trainable projection (starting at the identity) before the quantizer; the loss is the
/// commitment loss, so the projection is trained through the straight-through path.
#[derive(Module, Debug)]
struct Probe {
    projection: Linear,
    quantizer: EmaResidualVectorQuantizer,
}

impl Probe {
    fn new(config: &EmaResidualVectorQuantizerConfig, device: &Device) -> Self {
        let mut projection = LinearConfig::new(DIM, DIM).init(device);
        let identity: Vec<f32> = (0..DIM * DIM)
            .map(|i| if i / DIM == i % DIM { 1.0 } else { 0.0 })
            .collect();
        projection.weight = Param::from_tensor(Tensor::from_data(
            TensorData::new(identity, [DIM, DIM]),
            device,
        ));
        projection.bias = projection.bias.map(|bias| bias.map(|b| b.zeros_like()));
        let quantizer = seeded_quantizer(config, device, 100);
        Self {
            projection,
            quantizer,
        }
    }

    /// The loss one device minimizes on its batch.
    fn loss(&self, batch: Tensor<2>) -> Tensor<1> {
        let latents = self.projection.forward(batch);
        self.quantizer.forward(latents).loss
    }
}

impl TrainStep for Probe {
    type Input = Tensor<2>;
    type Output = ();

    fn step(&self, batch: Tensor<2>) -> TrainOutput<()> {
        let grads = self.loss(batch).backward();
        TrainOutput::new(self, grads, ())
    }
}

impl InferenceStep for Probe {
    type Input = Tensor<2>;
    type Output = ();

    fn step(&self, batch: Tensor<2>) {
        let _ = self.loss(batch);
    }
}

#[derive(Clone)]
struct Rows;

impl Batcher<Vec<f32>, Tensor<2>> for Rows {
    fn batch(&self, rows: Vec<Vec<f32>>, device: &Device) -> Tensor<2> {
        let n = rows.len();
        let values: Vec<f32> = rows.into_iter().flatten().collect();
        Tensor::from_data(TensorData::new(values, [n, DIM]), device)
    }
}

/// `n` vectors around 12 well-separated centres (a coarse part for level 1, a finer one for
/// level 2), drawn on the host from `seed`.
fn clustered(n: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = Rng::new(seed);
    let mut uniform = move || rng.uniform();
    (0..n)
        .map(|_| {
            let coarse = (uniform() * 4.0) as usize;
            let fine = (uniform() * 3.0) as usize;
            (0..DIM)
                .map(|j| {
                    let a = if (coarse >> (j % 2)) & 1 == 1 {
                        4.0
                    } else {
                        -4.0
                    };
                    let b = if j % 3 == fine { 1.0 } else { 0.0 };
                    (a + b + 0.05 * (uniform() - 0.5)) as f32
                })
                .collect()
        })
        .collect()
}

fn data() -> Vec<Vec<f32>> {
    clustered(DEVICES * BATCH * STEPS, 7)
}

fn base_config() -> EmaResidualVectorQuantizerConfig {
    EmaResidualVectorQuantizerConfig::new(2, 16.into(), DIM)
        .with_ema_decay(0.8)
        .with_data_parallel(true)
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "rvq-burn-multi-device-{name}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Trains with Burn's `SupervisedTraining` and `ExecutionStrategy::multi` on `DEVICES` CPU
/// devices. Burn gives device `i` the `i`-th contiguous slice of the data set, in order.
fn train_multi(config: &EmaResidualVectorQuantizerConfig, name: &str) -> Probe {
    let device = Device::flex().autodiff();
    let model = Probe::new(config, &device);
    let rows = data();
    let train = DataLoaderBuilder::new(Rows)
        .batch_size(BATCH)
        .build(InMemDataset::new(rows.clone()));
    let valid = DataLoaderBuilder::new(Rows)
        .batch_size(BATCH)
        .build(InMemDataset::new(rows[..BATCH].to_vec()));
    let devices = vec![Device::flex().autodiff(); DEVICES];
    let dir = scratch_dir(name);
    let result = SupervisedTraining::new(&dir, train, valid)
        .with_training_strategy(
            ExecutionStrategy::multi(devices, MultiDeviceOptim::OptimMainDevice).into(),
        )
        .with_application_logger(None)
        .num_epochs(EPOCHS)
        .launch(Learner::new(model, SgdConfig::new().init(), LEARNING_RATE));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        result.error.is_none(),
        "training failed: {:?}",
        result.error
    );
    result.model
}

/// One device, one step per `multi` step, on the concatenation of the devices' batches of
/// that step. `multi` sums the devices' gradients (each the gradient of its batch's mean
/// loss); on the union that sum is `DEVICES` x the gradient of the mean loss, so that is the
/// loss used here. Returns the model and the restarts of every step.
fn train_single(config: &EmaResidualVectorQuantizerConfig) -> (Probe, usize) {
    let device = Device::flex().autodiff();
    let mut model = Probe::new(config, &device);
    let rows = data();
    let slice = rows.len() / DEVICES;
    let mut optimizer = SgdConfig::new().init();
    let mut restarted = 0;
    for _ in 0..EPOCHS {
        for step in 0..STEPS {
            let union: Vec<Vec<f32>> = (0..DEVICES)
                .flat_map(|d| {
                    let start = d * slice + step * BATCH;
                    rows[start..start + BATCH].to_vec()
                })
                .collect();
            let batch = Rows.batch(union, &device);
            let latents = model.projection.forward(batch);
            let output = model.quantizer.forward(latents);
            restarted += output.restarted_codes.iter().sum::<usize>();
            let loss = output.loss.mul_scalar(DEVICES as f64);
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optimizer.step(LEARNING_RATE, model, grads);
        }
    }
    (model, restarted)
}

fn floats<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
    tensor.into_data().iter::<f32>().collect()
}

/// Every level's codebook, and its counts.
fn state(model: &Probe) -> Vec<(Vec<f32>, Vec<f32>)> {
    let plain = Device::flex();
    let quantizer = model.quantizer.valid();
    (0..quantizer.num_levels())
        .map(|level| {
            (
                floats(quantizer.codebook(level, &plain)),
                floats(quantizer.statistics(level, &plain).counts),
            )
        })
        .collect()
}

/// Compares every level of `multi` (trained on `DEVICES` devices with `epsilon`) with
/// `single` (one device on the union): each codebook value within
/// `(smoothing(c) + ROUNDING) * max(1, |value|)`, `c` its code's one-device count and
/// `smoothing` the relative tolerance that count allows, and each count within `ROUNDING`
/// relative of the one-device count / `DEVICES`. Returns the largest relative codebook
/// difference.
fn assert_same_state(multi: &Probe, single: &Probe, smoothing: impl Fn(f64, f64) -> f64) -> f64 {
    let mut worst: f64 = 0.0;
    for (level, ((got, got_counts), (want, want_counts))) in
        state(multi).into_iter().zip(state(single)).enumerate()
    {
        let total: f64 = want_counts.iter().map(|&c| c as f64).sum();
        for (code, (g, w)) in got_counts.iter().zip(&want_counts).enumerate() {
            let w = *w as f64 / DEVICES as f64;
            assert!(
                (*g as f64 - w).abs() <= ROUNDING * w.max(1.0),
                "level {level}, code {code}: count {g} on two devices, one device's / 2 = {w}"
            );
        }
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let count = want_counts[i / DIM] as f64;
            let relative = (*g as f64 - *w as f64).abs() / (*w as f64).abs().max(1.0);
            worst = worst.max(relative);
            let tolerance = smoothing(count, total) + ROUNDING;
            assert!(
                relative <= tolerance,
                "level {level}, value {i} (code count {count}): two devices {g}, one device \
                 {w}: relative difference {relative:.2e} > {tolerance:.2e}"
            );
        }
    }
    worst
}

/// Two devices with `config`, one device with `config`'s epsilon x `DEVICES`.
fn assert_multi_equals_single_with_scaled_epsilon(config: &EmaResidualVectorQuantizerConfig) {
    let multi = train_multi(config, "scaled");
    let scaled = config.clone().with_epsilon(config.epsilon * DEVICES as f64);
    let (single, restarted) = train_single(&scaled);
    let worst = assert_same_state(&multi, &single, |_, _| 0.0);
    println!(
        "largest relative codebook difference: {worst:.2e}; {restarted} codes split or restarted"
    );
}

#[test]
fn two_devices_equal_one_device_on_the_union_with_twice_the_smoothing() {
    assert_multi_equals_single_with_scaled_epsilon(&base_config());
}

#[test]
fn two_devices_equal_one_device_on_the_union_with_kmeans_init_and_dead_code_restarts() {
    let config = base_config()
        .with_kmeans_init(true)
        .with_kmeans_iterations(4)
        .with_threshold_ema_dead_code(0.3);
    assert_multi_equals_single_with_scaled_epsilon(&config);
    // The options did something: codes were split during the k-means init and restarted
    // after it, the same decisions on both sides.
    let (_, restarted) = train_single(&config);
    assert!(restarted > 0, "no code was split or restarted");
}

#[test]
fn two_devices_match_one_device_on_the_union_up_to_the_smoothing() {
    let config = base_config();
    let epsilon = config.epsilon;
    let multi = train_multi(&config, "same-epsilon");
    let (single, _) = train_single(&config);
    let k = 16.0;
    let extra = (DEVICES - 1) as f64;
    let worst = assert_same_state(&multi, &single, |count, total| {
        if count > 0.0 {
            1.01 * extra * epsilon * (1.0 / count + k / total)
        } else {
            0.0 // an empty code is the zero vector on both sides
        }
    });
    println!("largest relative codebook difference: {worst:.2e}");

    // The comparison has teeth: the codebooks moved far from their initial values (within
    // 1/K of zero), and the projection was trained.
    let codebook = &state(&single)[0].0;
    assert!(codebook.iter().any(|v| v.abs() > 1.0));
    let weight = floats(single.projection.weight.val());
    assert!(
        weight
            .iter()
            .enumerate()
            .any(|(i, w)| (w - if i / DIM == i % DIM { 1.0 } else { 0.0 }).abs() > 1e-4)
    );
}

#[test]
fn two_multi_device_runs_give_the_same_state() {
    let config = base_config()
        .with_kmeans_init(true)
        .with_kmeans_iterations(3)
        .with_threshold_ema_dead_code(0.3);
    let first = train_multi(&config, "repeat-a");
    let second = train_multi(&config, "repeat-b");
    // Bit for bit: the two devices' updates are averaged as (a + b) / 2, which does not
    // depend on which thread finished first.
    assert_eq!(state(&first), state(&second));
}

#[test]
fn without_data_parallel_mode_the_devices_do_not_match() {
    // The single-device defaults: the reference's initial state (which averaging does not
    // divide by k, so it weighs k times more on two devices) and k-means on each device's own
    // batch (codes fitted to different batches get averaged). This is what `data_parallel`
    // prevents, and the comparisons above would catch.
    let config = base_config()
        .with_data_parallel(false)
        .with_kmeans_init(true)
        .with_kmeans_iterations(4);
    let multi = train_multi(&config, "per-device");
    let (single, _) = train_single(&config);
    let got = state(&multi);
    let want = state(&single);
    let worst = got
        .iter()
        .zip(&want)
        .flat_map(|((g, _), (w, _))| g.iter().zip(w))
        .map(|(g, w)| (*g as f64 - *w as f64).abs() / (*w as f64).abs().max(1.0))
        .fold(0.0, f64::max);
    assert!(
        worst > 1e-2,
        "per-device k-means gave the union's codebooks ({worst:.2e})"
    );
    println!("largest relative codebook difference: {worst:.2e}");
}
