//! The training run on one device or several: configuration, loop, per-epoch records.

use std::fs;
use std::path::PathBuf;
use std::time::Instant;

use burn::config::Config;
use burn::module::Module;
use burn::optim::{AdamConfig, GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::tensor::{Bool, Device, Tensor, TensorData};
use rvq_burn::{CodebookHealth, ForwardOptions, RvqMetrics};

use crate::checkpoint;
use crate::data::Mnist;
use crate::error::{DemoError, panic_message};
use crate::evaluation::{Validation, evaluate};
use crate::metrics::{self, EpochRecord};
use crate::model::{LATENT_SIDE, VqVae, VqVaeConfig, VqVaeOutput};
use crate::profile::StepPart;
use crate::progress::Progress;
use crate::report;

/// Everything that defines a run; saved as `OUT/config.json` and loadable with `--config`.
#[derive(Config, Debug)]
pub struct TrainingConfig {
    /// The model, quantizer included.
    #[config(default = "VqVaeConfig::new()")]
    pub model: VqVaeConfig,
    /// The optimizer (Adam, default settings).
    #[config(default = "AdamConfig::new()")]
    pub optimizer: AdamConfig,
    /// Passes over the training set. Default: 20 (about 5 minutes on 2 CPU cores).
    #[config(default = 20)]
    pub epochs: usize,
    /// Images per step. Default: 64.
    #[config(default = 64)]
    pub batch_size: usize,
    /// Adam's learning rate. Default: 1e-3.
    #[config(default = 1e-3)]
    pub learning_rate: f64,
    /// Seed of the weights, the codebooks and the data order. Default: 42.
    #[config(default = 42)]
    pub seed: u64,
    /// Train on only the first this many training digits (all when absent).
    #[config(default = "None")]
    pub train_limit: Option<usize>,
    /// Validate on only the first this many validation digits (all when absent).
    #[config(default = "None")]
    pub valid_limit: Option<usize>,
    /// Probability that a training digit's last 1 to 3 rows of latent positions are padding:
    /// its pixel rows there set to white and masked out of the quantizer and the
    /// reconstruction loss, as the padded tail of a shorter sequence. Default: 0.
    #[config(default = 0.0)]
    pub mask_random_tail: f64,
}

/// Where and on what a run happens (not part of the saved configuration).
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Output directory.
    pub out: PathBuf,
    /// Continue from the last checkpoint in `out`.
    pub resume: bool,
    /// The devices to train on (autodiff is added): one, or several for data-parallel
    /// training, the first of which runs the optimizer and the validation.
    pub devices: Vec<Device>,
    /// Print a progress bar and per-epoch lines.
    pub verbose: bool,
}

/// What a finished run returns.
#[derive(Debug)]
pub struct TrainingSummary {
    /// One record per epoch of this run (resumed epochs excluded).
    pub epochs: Vec<EpochRecord>,
    /// The trained model (on the first training device).
    pub model: VqVae,
}

/// A deterministic permutation of `0..len` for `(seed, epoch)`: SplitMix64 + Fisher-Yates, so
/// a resumed run sees the batches an uninterrupted one would.
pub fn epoch_order(len: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut next = split_mix(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut order: Vec<usize> = (0..len).collect();
    for i in (1..len).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// Trains `config` on `data` and writes everything to `options.out`: `config.json`,
/// `metrics.jsonl`, `checkpoint/` and the pictures.
///
/// On several devices every step gives each device `batch_size` images of the step's
/// `devices x batch_size` (the last step's fewer images shared evenly); each device runs the forward and backward pass on its own thread
/// with its copy of the model, the gradients are summed on the first device (as Burn's
/// `ExecutionStrategy::multi` does), and the quantizer runs in data-parallel mode, its
/// devices' EMA updates averaged after the step (the codebooks of one device trained on the
/// union of the batches: [`rvq_burn::EmaResidualVectorQuantizerConfig::data_parallel`]).
pub fn train(
    config: &TrainingConfig,
    data: &Mnist,
    options: &RunOptions,
) -> Result<TrainingSummary, DemoError> {
    let mut config = config.clone();
    let Some(main) = options.devices.first() else {
        return Err(DemoError::Config(
            "training needs at least one device, got 0".into(),
        ));
    };
    let main = main.clone().autodiff();
    let devices: Vec<Device> = options
        .devices
        .iter()
        .map(|d| d.clone().autodiff())
        .collect();
    if devices.len() > 1 {
        config.model.quantizer.data_parallel = true;
    }
    config.model.quantizer.validate()?;
    if config.batch_size == 0 {
        return Err(DemoError::Config("batch_size must be >= 1, got 0".into()));
    }
    if config.epochs == 0 {
        return Err(DemoError::Config(
            "epochs must be >= 1, got 0 (nothing would be trained)".into(),
        ));
    }
    let out = &options.out;
    fs::create_dir_all(checkpoint::dir(out)).map_err(|e| DemoError::io(out, e))?;
    let train_set = data.train.take(config.train_limit.unwrap_or(usize::MAX));
    let valid_set = data.valid.take(config.valid_limit.unwrap_or(usize::MAX));
    if train_set.is_empty() || valid_set.is_empty() {
        return Err(DemoError::Config(
            "the training and validation sets must not be empty".into(),
        ));
    }

    // Before anything draws from the device's random generator.
    let resume_from = match options.resume {
        true => Some(checkpoint::last_epoch(out)?.ok_or_else(|| {
            DemoError::Checkpoint(format!(
                "--resume: no checkpoint in {}",
                checkpoint::dir(out).display()
            ))
        })?),
        false => None,
    };
    let mut model = config.model.try_init_seeded(&main, config.seed)?;
    let mut optimizer = config.optimizer.init();
    let mut first_epoch = 1;
    let config_path = out.join("config.json");
    if let Some(epoch) = resume_from {
        model = checkpoint::load_model(model, out, epoch)?;
        optimizer = checkpoint::load_optimizer(optimizer, out, epoch)?;
        metrics::truncate(&out.join("metrics.jsonl"), epoch)?;
        first_epoch = epoch + 1;
    } else {
        checkpoint::clear(out);
    }
    config
        .save(&config_path)
        .map_err(|e| DemoError::io(&config_path, e))?;

    let mut records = Vec::new();
    for epoch in first_epoch..=config.epochs {
        let order = epoch_order(train_set.len(), config.seed, epoch);
        let steps: Vec<&[usize]> = order.chunks(config.batch_size * devices.len()).collect();
        let mut progress = Progress::new(epoch, config.epochs, steps.len(), options.verbose);
        let mut totals = EpochTotals::new(config.model.quantizer.num_levels);
        let started = Instant::now();
        for (step, indices) in steps.iter().enumerate() {
            let tails = (config.mask_random_tail > 0.0).then(|| {
                random_tails(
                    indices.len(),
                    config.mask_random_tail,
                    config.seed,
                    epoch,
                    step,
                )
            });
            // `batch_size` images per device; a shorter last step is shared evenly, so
            // that every device's update weighs the same in the average.
            let per_device = indices.len().div_ceil(devices.len());
            let shards: Vec<Shard> = indices
                .chunks(per_device)
                .zip(&devices)
                .enumerate()
                .map(|(i, (images, device))| {
                    let first = i * per_device;
                    Shard {
                        images: train_set.batch(images, device),
                        tails: tails
                            .as_ref()
                            .map(|rows| rows[first..first + images.len()].to_vec()),
                    }
                })
                .collect();
            let figures;
            (model, figures) = train_step(
                model,
                &mut optimizer,
                config.learning_rate,
                shards,
                &main,
                &mut StepPart::ignore,
            )?;
            if devices.len() > 1 {
                // Each device's EMA update is pending under the thread that ran it: average
                // them now, before the next step's threads read the state.
                model.quantizer.sync_state();
            }
            totals.add(&figures);
            progress.step(
                totals.last_loss,
                totals.images,
                started.elapsed().as_secs_f64(),
            );
        }
        let train_seconds = started.elapsed().as_secs_f64();
        progress.finish();

        let validation = evaluate(&model, &valid_set, config.batch_size, &main);
        let health = model.quantizer.codebook_health();
        let record = totals.record(epoch, devices.len(), train_seconds, &health, validation);
        checkpoint::commit(&model, &optimizer, out, &record)?;
        if options.verbose {
            println!("{}", summary_line(&record, config.epochs));
        }
        records.push(record);
    }

    let final_validation = match records.last() {
        Some(record) => record.validation.clone(),
        None => evaluate(&model, &valid_set, config.batch_size, &main),
    };
    report::write_reconstructions(&out.join("reconstructions.png"), &model, &valid_set, &main)?;
    report::write_codebook_usage(&out.join("codebook_usage.png"), &final_validation)?;
    report::write_training_curves(
        &out.join("training_curves.png"),
        &metrics::read(&out.join("metrics.jsonl"))?,
    )?;
    Ok(TrainingSummary {
        epochs: records,
        model,
    })
}

/// A device's part of a training step: its images and, with padded tails, each image's
/// real latent rows.
struct Shard {
    images: Tensor<4>,
    tails: Option<Vec<usize>>,
}

/// What one shard's forward gave, read back once per shard and step.
struct ShardFigures {
    mse: f64,
    commitment: f64,
    perplexity: f64,
    restarted: Vec<usize>,
    images: usize,
}

/// The forward pass of one shard: its loss (to differentiate) and its figures; `lap` is told
/// as each part ends.
fn shard_forward(
    model: &VqVae,
    shard: Shard,
    lap: &mut dyn FnMut(StepPart),
) -> (Tensor<1>, ShardFigures) {
    let images = shard.images.dims()[0];
    let output = match &shard.tails {
        None => model.forward_reporting(shard.images, &ForwardOptions::default(), lap),
        Some(rows) => forward_with_padded_tails(model, shard.images, rows),
    };
    let values: Vec<f64> = Tensor::cat(
        vec![
            output.reconstruction_loss.clone().without_autodiff(),
            output.quantizer.loss.clone().without_autodiff(),
        ],
        0,
    )
    .into_data()
    .iter::<f64>()
    .collect();
    let metrics: RvqMetrics = output.quantizer.metrics();
    let figures = ShardFigures {
        mse: values[0],
        commitment: values[1],
        perplexity: metrics.perplexity_mean(),
        restarted: output.quantizer.restarted_codes.clone(),
        images,
    };
    lap(StepPart::Reads);
    (output.loss(), figures)
}

/// One training step of the loop on one device, on `images`, without padded tails, telling
/// `lap` as each part ends: what `examples/step_profile.rs` times. Returns the model after
/// the optimizer's step.
pub fn profiled_step(
    model: VqVae,
    optimizer: &mut ModuleOptimizer,
    learning_rate: f64,
    images: Tensor<4>,
    lap: &mut dyn FnMut(StepPart),
) -> Result<VqVae, DemoError> {
    let main = images.device();
    let shards = vec![Shard {
        images,
        tails: None,
    }];
    let (model, _) = train_step(model, optimizer, learning_rate, shards, &main, lap)?;
    Ok(model)
}

/// One optimizer step over `shards` (one per device, the first on `main`).
fn train_step(
    model: VqVae,
    optimizer: &mut ModuleOptimizer,
    learning_rate: f64,
    shards: Vec<Shard>,
    main: &Device,
    lap: &mut dyn FnMut(StepPart),
) -> Result<(VqVae, Vec<ShardFigures>), DemoError> {
    if let [_] = shards.as_slice() {
        let shard = shards.into_iter().next().expect("one shard");
        let (loss, figures) = shard_forward(&model, shard, lap);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        lap(StepPart::Backward);
        let model = optimizer.step(learning_rate, model, grads);
        lap(StepPart::Optimizer);
        return Ok((model, vec![figures]));
    }
    let results: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = shards
            .into_iter()
            .map(|shard| {
                let replica = model.clone();
                scope.spawn(move || {
                    let replica = replica.fork(&shard.images.device());
                    let (loss, figures) = shard_forward(&replica, shard, &mut StepPart::ignore);
                    (
                        GradientsParams::from_grads(loss.backward(), &replica),
                        figures,
                    )
                })
            })
            .collect();
        handles.into_iter().map(|handle| handle.join()).collect()
    });
    let mut accumulator = GradientsAccumulator::<VqVae>::new();
    let mut figures = Vec::with_capacity(results.len());
    for (device, result) in results.into_iter().enumerate() {
        let (grads, shard) = result.map_err(|payload| {
            DemoError::Training(format!(
                "the training step on device {device} panicked: {}",
                panic_message(&*payload)
            ))
        })?;
        accumulator.accumulate(&model, grads.to_device(main, &model));
        figures.push(shard);
    }
    Ok((
        optimizer.step(learning_rate, model, accumulator.grads()),
        figures,
    ))
}

/// The running sums of an epoch's steps.
struct EpochTotals {
    loss: f64,
    mse: f64,
    commitment: f64,
    perplexity: f64,
    shards: usize,
    images: usize,
    restarted: Vec<usize>,
    last_loss: f64,
}

impl EpochTotals {
    fn new(levels: usize) -> Self {
        Self {
            loss: 0.0,
            mse: 0.0,
            commitment: 0.0,
            perplexity: 0.0,
            shards: 0,
            images: 0,
            restarted: vec![0; levels],
            last_loss: f64::NAN,
        }
    }

    fn add(&mut self, figures: &[ShardFigures]) {
        let mut step_loss = 0.0;
        for shard in figures {
            self.mse += shard.mse;
            self.commitment += shard.commitment;
            self.loss += shard.mse + shard.commitment;
            self.perplexity += shard.perplexity;
            self.images += shard.images;
            self.shards += 1;
            for (total, level) in self.restarted.iter_mut().zip(&shard.restarted) {
                *total += level;
            }
            step_loss += shard.mse + shard.commitment;
        }
        self.last_loss = step_loss / figures.len().max(1) as f64;
    }

    /// The epoch's record: means over the shards of all steps (the steps on one device).
    fn record(
        self,
        epoch: usize,
        devices: usize,
        train_seconds: f64,
        health: &[CodebookHealth],
        validation: Validation,
    ) -> EpochRecord {
        let shards = self.shards.max(1) as f64;
        EpochRecord {
            epoch,
            devices,
            train_loss: self.loss / shards,
            train_mse: self.mse / shards,
            train_commitment: self.commitment / shards,
            train_perplexity_mean: self.perplexity / shards,
            train_restarted_codes: self.restarted,
            ema_entropy: health.iter().map(|h| h.ema_entropy).collect(),
            ema_active_share: health.iter().map(|h| h.active_share).collect(),
            train_seconds,
            images_per_second: self.images as f64 / train_seconds.max(1e-9),
            validation,
        }
    }
}

/// A SplitMix64 stream (Steele, Lea and Flood 2014) from `state`: the demo's fixed hash for
/// every draw that must repeat exactly on resume.
fn split_mix(mut state: u64) -> impl FnMut() -> u64 {
    move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Latent rows (of [`LATENT_SIDE`]) that are real for each of `count` digits: with
/// probability `p`, all but the last 1 to 3 (padding), else all; a fixed hash of `(seed,
/// epoch, step, digit)`.
fn random_tails(count: usize, p: f64, seed: u64, epoch: usize, step: usize) -> Vec<usize> {
    (0..count)
        .map(|digit| {
            let mut next = split_mix(
                seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    ^ (step as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9)
                    ^ (digit as u64).wrapping_mul(0x94D0_49BB_1331_11EB),
            );
            let padded = ((next() >> 11) as f64 / (1u64 << 53) as f64) < p;
            match padded {
                true => LATENT_SIDE - 1 - (next() % 3) as usize,
                false => LATENT_SIDE,
            }
        })
        .collect()
}

/// A training forward of `images` `[B, 1, 28, 28]` whose digit `b` has `rows[b]` real latent
/// rows: the pixel rows of the padding (4 per latent row) set to white, the latent positions
/// there masked out of the quantizer, and the reconstruction loss the mean over real pixels.
fn forward_with_padded_tails(model: &VqVae, images: Tensor<4>, rows: &[usize]) -> VqVaeOutput {
    let device = images.device();
    let [batch, _, side, _] = images.dims();
    let latent_side = side / 4;
    let real_latent: Vec<bool> = rows
        .iter()
        .flat_map(|&real| (0..latent_side * latent_side).map(move |i| i / latent_side < real))
        .collect();
    let real_pixels: Vec<bool> = rows
        .iter()
        .flat_map(|&real| (0..side * side).map(move |i| i / side < 4 * real))
        .collect();
    let plain = device.clone().without_autodiff();
    let latent_mask = Tensor::<3, Bool>::from_data(
        TensorData::new(real_latent, [batch, latent_side, latent_side]),
        &plain,
    );
    let pixel_mask = Tensor::<4, Bool>::from_data(
        TensorData::new(real_pixels, [batch, 1, side, side]),
        &device,
    );
    let images = images.mask_fill(pixel_mask.clone().bool_not(), 1.0);
    let mut output = model.forward(
        images.clone(),
        &ForwardOptions::new().with_mask(latent_mask),
    );
    let real = pixel_mask.clone().float();
    let count = real.clone().sum();
    output.reconstruction_loss = output
        .reconstruction
        .clone()
        .sub(images)
        .powi_scalar(2)
        .mul(real)
        .sum()
        .div(count);
    output
}

/// One line a person reads after each epoch.
pub fn summary_line(record: &EpochRecord, epochs: usize) -> String {
    let v = &record.validation;
    let usage: Vec<String> = v
        .val_usage
        .iter()
        .map(|u| format!("{:.0}%", u * 100.0))
        .collect();
    let perplexity: Vec<String> = v.val_perplexity.iter().map(|p| format!("{p:.1}")).collect();
    format!(
        "epoch {}/{}: train loss {:.5} ({:.0} img/s, {:.1} s) | val MSE {:.5}, PSNR {:.2} dB, \
         usage [{}], perplexity [{}], {:.2} bits/vector",
        record.epoch,
        epochs,
        record.train_loss,
        record.images_per_second,
        record.train_seconds,
        v.val_mse,
        v.val_psnr_db,
        usage.join(" "),
        perplexity.join(" "),
        v.val_bits_per_vector,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every f64 of `config.json`, through Burn's Config save/load as `--config` and
    /// `--resume` use it, reads back bit for bit.
    #[test]
    fn floats_in_config_read_back_bit_for_bit() {
        let dir = std::env::temp_dir().join(format!("vqvae-config-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.json");
        for v in crate::metrics::tests::awkward_floats().chunks(4).take(200) {
            let mut config = TrainingConfig::new().with_learning_rate(v[0]);
            config.model.quantizer.beta = v[1 % v.len()];
            config.model.quantizer.ema_decay = v[2 % v.len()];
            config.model.quantizer.epsilon = v[3 % v.len()];
            config.save(&path).unwrap();
            let back = TrainingConfig::load(&path).unwrap();
            let q = (&config.model.quantizer, &back.model.quantizer);
            assert_eq!(back.learning_rate.to_bits(), config.learning_rate.to_bits());
            assert_eq!(q.1.beta.to_bits(), q.0.beta.to_bits());
            assert_eq!(q.1.ema_decay.to_bits(), q.0.ema_decay.to_bits());
            assert_eq!(q.1.epsilon.to_bits(), q.0.epsilon.to_bits());
        }
        let _ = fs::remove_dir_all(&dir);
    }

    /// About a share `p` of the digits lose 1 to 3 latent rows, the same for the same step.
    #[test]
    fn random_tails_pad_a_share_of_the_digits() {
        let tails = random_tails(4000, 0.25, 42, 1, 0);
        assert_eq!(tails, random_tails(4000, 0.25, 42, 1, 0));
        assert_ne!(tails, random_tails(4000, 0.25, 42, 1, 1));
        assert!(tails.iter().all(|rows| (4..=7).contains(rows)));
        let padded = tails.iter().filter(|&&rows| rows < 7).count();
        assert!((850..1150).contains(&padded), "{padded} of 4000 padded");
        for rows in 4..=6 {
            assert!(tails.contains(&rows));
        }
        assert!(random_tails(100, 0.0, 42, 1, 0).iter().all(|&r| r == 7));
    }

    /// Padded tails: white pixels there, masked latents (code -1), and a loss over the real
    /// pixels only, with gradients that train the model.
    #[test]
    fn padded_tails_are_masked_out_of_the_quantizer_and_the_loss() {
        let device = Device::flex().autodiff();
        let model = VqVaeConfig::new().try_init_seeded(&device, 1).unwrap();
        let data = Mnist::embedded();
        let images = data.train.batch(&[0, 1, 2], &device);
        let output = forward_with_padded_tails(&model, images, &[7, 5, 4]);
        let codes: Vec<i64> = output.quantizer.indices[0]
            .to_data()
            .iter::<i64>()
            .collect();
        let padded = |image: usize, position: usize| position / 7 >= [7, 5, 4][image];
        for (i, code) in codes.iter().enumerate() {
            let (image, position) = (i / 49, i % 49);
            assert_eq!(
                *code == -1,
                padded(image, position),
                "image {image}, position {position}"
            );
        }
        let loss: f64 = output.loss().into_scalar::<f64>();
        assert!(loss.is_finite() && loss > 0.0);
    }

    #[test]
    fn epoch_order_is_a_seeded_permutation() {
        let a = epoch_order(1000, 7, 1);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(1000, 7, 1));
        assert_ne!(a, epoch_order(1000, 7, 2));
        assert_ne!(a, epoch_order(1000, 8, 1));
    }
}
