//! The training run: configuration, loop, checkpoints, per-epoch metrics.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::config::Config;
use burn::module::Module;
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Bool, Device, Tensor, TensorData};
use rvq_burn::{ForwardOptions, RvqMetrics};
use serde::{Deserialize, Serialize};

use crate::data::Mnist;
use crate::error::DemoError;
use crate::evaluation::{Validation, evaluate};
use crate::model::{VqVae, VqVaeConfig, VqVaeOutput};
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

/// One line of `OUT/metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based epoch.
    pub epoch: usize,
    /// Mean training loss (reconstruction + commitment) over the epoch's steps.
    pub train_loss: f64,
    /// Mean pixel MSE over the epoch's steps.
    pub train_mse: f64,
    /// Mean commitment loss over the epoch's steps.
    pub train_commitment: f64,
    /// Mean over steps of the per-batch mean perplexity over levels.
    pub train_perplexity_mean: f64,
    /// Codes restarted by the dead-code check during the epoch, per level.
    pub train_restarted_codes: Vec<usize>,
    /// After the epoch, per level: entropy of the EMA counts / log K (batch-independent).
    pub ema_entropy: Vec<f64>,
    /// After the epoch, per level: share of codes alive by their EMA counts.
    pub ema_active_share: Vec<f64>,
    /// Wall time of the epoch's training steps.
    pub train_seconds: f64,
    /// Training images per second.
    pub images_per_second: f64,
    /// Validation figures.
    #[serde(flatten)]
    pub validation: Validation,
}

/// Where and on what a run happens (not part of the saved configuration).
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Output directory.
    pub out: PathBuf,
    /// Continue from the last checkpoint in `out`.
    pub resume: bool,
    /// The device to train on (autodiff is added).
    pub device: Device,
    /// Print a progress bar and per-epoch lines.
    pub verbose: bool,
}

/// What a finished run returns.
#[derive(Debug)]
pub struct TrainingSummary {
    /// One record per epoch of this run (resumed epochs excluded).
    pub epochs: Vec<EpochRecord>,
    /// The trained model (on the training device).
    pub model: VqVae,
}

/// A deterministic permutation of `0..len` for `(seed, epoch)`: SplitMix64 + Fisher-Yates, so
/// a resumed run sees the batches an uninterrupted one would.
pub fn epoch_order(len: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut state = seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut order: Vec<usize> = (0..len).collect();
    for i in (1..len).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

pub(crate) fn checkpoint_dir(out: &Path) -> PathBuf {
    out.join("checkpoint")
}

/// The last epoch whose checkpoint is complete, from `OUT/checkpoint/last_epoch`.
pub(crate) fn last_checkpoint(out: &Path) -> Result<Option<usize>, DemoError> {
    let marker = checkpoint_dir(out).join("last_epoch");
    if !marker.exists() {
        return Ok(None);
    }
    let text = fs::read_to_string(&marker).map_err(|e| DemoError::io(&marker, e))?;
    text.trim().parse().map(Some).map_err(|_| {
        DemoError::Checkpoint(format!(
            "{}: not an epoch number: {text:?}",
            marker.display()
        ))
    })
}

/// Trains `config` on `data` and writes everything to `options.out`.
pub fn train(
    config: &TrainingConfig,
    data: &Mnist,
    options: &RunOptions,
) -> Result<TrainingSummary, DemoError> {
    config.model.quantizer.validate()?;
    if config.batch_size == 0 {
        return Err(DemoError::Config("batch_size must be >= 1, got 0".into()));
    }
    let out = &options.out;
    fs::create_dir_all(checkpoint_dir(out)).map_err(|e| DemoError::io(out, e))?;
    let train_set = data.train.take(config.train_limit.unwrap_or(usize::MAX));
    let valid_set = data.valid.take(config.valid_limit.unwrap_or(usize::MAX));
    if train_set.is_empty() || valid_set.is_empty() {
        return Err(DemoError::Config(
            "the training and validation sets must not be empty".into(),
        ));
    }

    // Before anything draws from the device's random generator.
    let resume_from = match options.resume {
        true => Some(last_checkpoint(out)?.ok_or_else(|| {
            DemoError::Checkpoint(format!(
                "--resume: no checkpoint in {}",
                checkpoint_dir(out).display()
            ))
        })?),
        false => None,
    };
    let device = options.device.clone().autodiff();
    let mut model = config.model.try_init_seeded(&device, config.seed)?;
    let mut optimizer = config.optimizer.init();
    let mut first_epoch = 1;
    let config_path = out.join("config.json");
    if let Some(epoch) = resume_from {
        let dir = checkpoint_dir(out);
        model = model
            .try_load_file(dir.join(format!("model-{epoch}.bpk")))
            .map_err(|e| DemoError::Checkpoint(format!("model-{epoch}.bpk: {e}")))?;
        optimizer = optimizer
            .load(dir.join(format!("optim-{epoch}.bpk")))
            .map_err(|e| DemoError::Checkpoint(format!("optim-{epoch}.bpk: {e}")))?;
        truncate_metrics(&out.join("metrics.jsonl"), epoch)?;
        first_epoch = epoch + 1;
    } else {
        let _ = fs::remove_file(out.join("metrics.jsonl"));
        let _ = fs::remove_file(checkpoint_dir(out).join("last_epoch"));
    }
    config
        .save(&config_path)
        .map_err(|e| DemoError::io(&config_path, e))?;

    let mut records = Vec::new();
    for epoch in first_epoch..=config.epochs {
        let order = epoch_order(train_set.len(), config.seed, epoch);
        let batches: Vec<&[usize]> = order.chunks(config.batch_size).collect();
        let mut progress = Progress::new(epoch, config.epochs, batches.len(), options.verbose);
        let (mut loss_sum, mut mse_sum, mut commit_sum, mut perplexity_sum) = (0.0, 0.0, 0.0, 0.0);
        let started = Instant::now();
        let mut images_seen = 0;
        let mut restarted = vec![0; config.model.quantizer.num_levels];
        for (step, batch) in batches.iter().enumerate() {
            let images = train_set.batch(batch, &device);
            let tails = (config.mask_random_tail > 0.0).then(|| {
                random_tails(
                    batch.len(),
                    config.mask_random_tail,
                    config.seed,
                    epoch,
                    step,
                )
            });
            let output = match &tails {
                None => model.forward(images, &ForwardOptions::default()),
                Some(rows) => forward_with_padded_tails(&model, images, rows),
            };
            let loss = output.loss();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optimizer.step(config.learning_rate, model, grads);

            let values: Vec<f64> = burn::tensor::Tensor::cat(
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
            mse_sum += values[0];
            commit_sum += values[1];
            loss_sum += values[0] + values[1];
            perplexity_sum += metrics.perplexity_mean();
            for (total, level) in restarted.iter_mut().zip(&output.quantizer.restarted_codes) {
                *total += level;
            }
            images_seen += batch.len();
            progress.step(
                values[0] + values[1],
                images_seen,
                started.elapsed().as_secs_f64(),
            );
        }
        let train_seconds = started.elapsed().as_secs_f64();
        progress.finish();
        let steps = batches.len() as f64;

        let validation = evaluate(&model, &valid_set, config.batch_size, &device);
        let health = model.quantizer.codebook_health();
        let record = EpochRecord {
            epoch,
            train_loss: loss_sum / steps,
            train_mse: mse_sum / steps,
            train_commitment: commit_sum / steps,
            train_perplexity_mean: perplexity_sum / steps,
            train_restarted_codes: restarted,
            ema_entropy: health.iter().map(|h| h.ema_entropy).collect(),
            ema_active_share: health.iter().map(|h| h.active_share).collect(),
            train_seconds,
            images_per_second: images_seen as f64 / train_seconds.max(1e-9),
            validation,
        };
        save_checkpoint(&model, &optimizer, out, epoch)?;
        append_metrics(&out.join("metrics.jsonl"), &record)?;
        if options.verbose {
            println!("{}", summary_line(&record, config.epochs));
        }
        records.push(record);
    }

    let final_validation = match records.last() {
        Some(record) => record.validation.clone(),
        None => evaluate(&model, &valid_set, config.batch_size, &device),
    };
    report::write_reconstructions(
        &out.join("reconstructions.png"),
        &model,
        &valid_set,
        &device,
    )?;
    report::write_codebook_usage(
        &out.join("codebook_usage.png"),
        &final_validation.code_histograms,
    )?;
    Ok(TrainingSummary {
        epochs: records,
        model,
    })
}

/// Latent rows (of 7) that are real for each of `count` digits: with probability `p`, 4 to 6
/// (the last 1 to 3 rows padding), else all 7; a fixed hash of `(seed, epoch, step, digit)`.
fn random_tails(count: usize, p: f64, seed: u64, epoch: usize, step: usize) -> Vec<usize> {
    (0..count)
        .map(|digit| {
            let mut state = seed
                ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ (step as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9)
                ^ (digit as u64).wrapping_mul(0x94D0_49BB_1331_11EB);
            let mut next = || {
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^ (z >> 31)
            };
            let padded = ((next() >> 11) as f64 / (1u64 << 53) as f64) < p;
            match padded {
                true => 6 - (next() % 3) as usize,
                false => 7,
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

fn save_checkpoint(
    model: &VqVae,
    optimizer: &burn::optim::ModuleOptimizer,
    out: &Path,
    epoch: usize,
) -> Result<(), DemoError> {
    let dir = checkpoint_dir(out);
    // RunningState defers the last EMA update until read: apply it before saving.
    model.quantizer.sync_state();
    model
        .clone()
        .save_file(dir.join(format!("model-{epoch}.bpk")))
        .map_err(|e| DemoError::Checkpoint(format!("saving model-{epoch}.bpk: {e}")))?;
    optimizer
        .save(dir.join(format!("optim-{epoch}.bpk")))
        .map_err(|e| DemoError::Checkpoint(format!("saving optim-{epoch}.bpk: {e}")))?;
    let marker = dir.join("last_epoch");
    fs::write(&marker, epoch.to_string()).map_err(|e| DemoError::io(&marker, e))?;
    // Keep the last two checkpoints.
    if epoch > 2 {
        for name in [
            format!("model-{}.bpk", epoch - 2),
            format!("optim-{}.bpk", epoch - 2),
        ] {
            let _ = fs::remove_file(dir.join(name));
        }
    }
    Ok(())
}

fn append_metrics(path: &Path, record: &EpochRecord) -> Result<(), DemoError> {
    let mut file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| DemoError::io(path, e))?;
    let line = serde_json::to_string(record).expect("records serialize");
    writeln!(file, "{line}").map_err(|e| DemoError::io(path, e))
}

/// Drops the lines of epochs after `last_epoch` (written after the checkpoint a resume starts
/// from).
fn truncate_metrics(path: &Path, last_epoch: usize) -> Result<(), DemoError> {
    let Ok(text) = fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v["epoch"].as_u64())
                .is_some_and(|epoch| epoch as usize <= last_epoch)
        })
        .collect();
    let mut body = kept.join("\n");
    if !body.is_empty() {
        body.push('\n');
    }
    fs::write(path, body).map_err(|e| DemoError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evaluation::Validation;

    /// f64s that serde_json's default parser reads back off by one bit (the two seen in a
    /// failed resume test), the extremes, and many arbitrary bit patterns.
    fn awkward_floats() -> Vec<f64> {
        let mut values = vec![
            0.20794587941297019,
            0.12329578816813107,
            0.1 + 0.2,
            f64::MIN_POSITIVE,
            5e-324,
            f64::MAX,
            -1.0 / 3.0,
        ];
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        while values.len() < 4000 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let value = f64::from_bits(state);
            if value.is_finite() {
                values.push(value);
            }
        }
        values
    }

    /// Every f64 a run writes to `metrics.jsonl` and `config.json` reads back bit for bit.
    #[test]
    fn floats_in_metrics_and_config_read_back_bit_for_bit() {
        let dir = std::env::temp_dir().join(format!("vqvae-json-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let metrics = dir.join("metrics.jsonl");
        let _ = fs::remove_file(&metrics);
        let values = awkward_floats();
        let records: Vec<EpochRecord> = values
            .chunks(8)
            .enumerate()
            .map(|(epoch, v)| EpochRecord {
                epoch,
                train_loss: v[0],
                train_mse: v[1 % v.len()],
                train_commitment: v[2 % v.len()],
                train_perplexity_mean: v[3 % v.len()],
                train_restarted_codes: vec![epoch],
                ema_entropy: v.to_vec(),
                ema_active_share: vec![v[4 % v.len()]],
                train_seconds: v[5 % v.len()],
                images_per_second: v[6 % v.len()],
                validation: Validation {
                    val_mse: v[7 % v.len()],
                    val_psnr_db: v[0],
                    val_usage: v.to_vec(),
                    val_perplexity: v.to_vec(),
                    val_bits_per_vector: v[1 % v.len()],
                    val_psnr_db_by_levels: v.to_vec(),
                    code_histograms: Vec::new(),
                },
            })
            .collect();
        for record in &records {
            append_metrics(&metrics, record).unwrap();
        }
        let text = fs::read_to_string(&metrics).unwrap();
        let read: Vec<EpochRecord> = text
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        let bits = |r: &EpochRecord| {
            let mut all = vec![
                r.train_loss,
                r.train_mse,
                r.train_commitment,
                r.train_perplexity_mean,
                r.train_seconds,
                r.images_per_second,
                r.validation.val_mse,
                r.validation.val_psnr_db,
                r.validation.val_bits_per_vector,
            ];
            all.extend(&r.ema_entropy);
            all.extend(&r.ema_active_share);
            all.extend(&r.validation.val_usage);
            all.extend(&r.validation.val_perplexity);
            all.extend(&r.validation.val_psnr_db_by_levels);
            all.into_iter().map(f64::to_bits).collect::<Vec<_>>()
        };
        assert_eq!(read.len(), records.len());
        for (got, want) in read.iter().zip(&records) {
            assert_eq!(bits(got), bits(want), "epoch {}", want.epoch);
        }

        // config.json, through Burn's Config save/load as `--config` and `--resume` use it.
        let path = dir.join("config.json");
        for v in values.chunks(4).take(200) {
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
