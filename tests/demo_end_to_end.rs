//! End to end: the demo trains a few steps on a small subset of the embedded digits, on the
//! CPU, on one device and on two, writes well-formed outputs, and a resumed run matches an
//! uninterrupted one.

use std::path::{Path, PathBuf};

use burn::config::Config;
use burn::tensor::Device;
use vqvae_demo::codec::{CompressOptions, compress, decompress};
use vqvae_demo::data::Mnist;
use vqvae_demo::metrics::EpochRecord;
use vqvae_demo::model::VqVae;
use vqvae_demo::training::{RunOptions, TrainingConfig, train};

fn out_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vqvae-demo-e2e-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn small_config(epochs: usize) -> TrainingConfig {
    let mut config = TrainingConfig::new()
        .with_epochs(epochs)
        .with_batch_size(32)
        .with_learning_rate(3e-3)
        .with_train_limit(Some(192))
        .with_valid_limit(Some(64));
    config.model.quantizer.num_levels = 2;
    config.model.quantizer.num_embeddings = 16.into();
    config
}

fn options(out: &Path, resume: bool) -> RunOptions {
    on_devices(out, resume, 1)
}

fn on_devices(out: &Path, resume: bool, devices: usize) -> RunOptions {
    on(out, resume, vec![Device::flex(); devices])
}

fn on(out: &Path, resume: bool, devices: Vec<Device>) -> RunOptions {
    RunOptions {
        out: out.to_path_buf(),
        resume,
        devices,
        verbose: false,
    }
}

/// The codes of the first `count` validation digits, on `device`, are within the 16 codes of
/// the small config's levels.
fn assert_codes_in_range(model: &VqVae, data: &Mnist, count: usize, device: &Device) {
    let images = data
        .valid
        .take(count)
        .batch(&(0..count).collect::<Vec<_>>(), device);
    for level in model.quantizer.encode(model.encode(images)) {
        let values: Vec<i64> = level.into_data().iter::<i64>().collect();
        assert_eq!(values.len(), count * 49);
        assert!(values.iter().all(|&i| (0..16).contains(&i)));
    }
}

/// The run's checkpoint, loaded on `device`, codes 8 validation digits.
fn compress_eight(run: &Path, device: &Device) {
    let options = CompressOptions {
        run: run.to_path_buf(),
        idx: None,
        images: Some(8),
        levels: None,
        output: run.join("digits.rvqz"),
        picture: run.join("compressed.png"),
    };
    let report = compress(&options, device).expect("the run's checkpoint codes digits");
    assert_eq!(report.images, 8);
}

fn read_metrics(out: &Path) -> Vec<EpochRecord> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .expect("metrics.jsonl written")
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect()
}

/// What a resumed run must reproduce of an uninterrupted one: everything but wall times.
fn same_training(a: &[EpochRecord], b: &[EpochRecord]) {
    assert_eq!(a.len(), b.len());
    for (a, b) in a.iter().zip(b) {
        let mut b = b.clone();
        b.train_seconds = a.train_seconds;
        b.images_per_second = a.images_per_second;
        assert_eq!(a, &b, "epoch {}", a.epoch);
    }
}

#[test]
fn trains_writes_outputs_and_resumes_exactly() {
    let data = Mnist::embedded();

    // Uninterrupted: 3 epochs.
    let full = out_dir("full");
    let summary = train(&small_config(3), &data, &options(&full, false)).expect("training runs");
    let records = read_metrics(&full);
    assert_eq!(records.len(), 3);
    let losses = |r: &[EpochRecord]| r.iter().map(|r| r.train_loss).collect::<Vec<_>>();
    assert_eq!(losses(&records), losses(&summary.epochs));
    let first = &records[0];
    let last = &records[2];
    assert!(
        last.train_loss < first.train_loss,
        "training loss did not decrease: {} -> {}",
        first.train_loss,
        last.train_loss
    );
    assert!(last.validation.val_mse < first.validation.val_mse);
    for record in &records {
        let v = &record.validation;
        assert!(record.train_loss.is_finite() && record.images_per_second > 0.0);
        assert!((v.val_psnr_db - 10.0 * (1.0 / v.val_mse).log10()).abs() < 1e-9);
        assert_eq!(v.val_usage.len(), 2);
        assert_eq!(v.val_perplexity.len(), 2);
        assert_eq!(v.val_psnr_db_by_levels.len(), 2);
        assert!(v.val_usage.iter().all(|u| (0.0..=1.0).contains(u)));
        assert!(v.val_perplexity.iter().all(|p| (0.99..=16.0).contains(p)));
        assert!(v.val_bits_per_vector >= 0.0 && v.val_bits_per_vector <= 8.0);
        // Decoding with all levels is the reported PSNR.
        assert!((v.val_psnr_db_by_levels[1] - v.val_psnr_db).abs() < 1e-9);
    }
    // Codes stay in range on the validation digits.
    assert_codes_in_range(&summary.model, &data, 64, &Device::flex());
    for record in &records {
        assert_eq!(record.devices, 1);
        assert_eq!(record.ema_entropy.len(), 2);
        assert_eq!(record.ema_active_share.len(), 2);
    }
    for png in [
        "reconstructions.png",
        "codebook_usage.png",
        "training_curves.png",
    ] {
        let bytes = std::fs::read(full.join(png)).expect("picture written");
        assert!(
            bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
            "{png} is not a PNG"
        );
    }
    let config = TrainingConfig::load(full.join("config.json")).expect("config.json loads");
    assert_eq!(config.epochs, 3);
    assert_eq!(config.model.quantizer.num_levels, 2);
    compress_and_decompress(&full, last.validation.val_psnr_db);

    // Interrupted after epoch 1, then resumed to 3: the same metrics, bit for bit.
    let resumed = out_dir("resumed");
    train(&small_config(1), &data, &options(&resumed, false)).unwrap();
    train(&small_config(3), &data, &options(&resumed, true)).unwrap();
    same_training(&records, &read_metrics(&resumed));
}

#[test]
fn zero_epochs_are_refused() {
    let out = out_dir("zero-epochs");
    let error = train(&small_config(0), &Mnist::embedded(), &options(&out, false)).unwrap_err();
    assert!(
        error.to_string().contains("epochs must be >= 1, got 0"),
        "{error}"
    );
    assert!(!out.exists(), "a refused run wrote {}", out.display());
    let error = vqvae_demo::run(["--epochs", "0"].map(String::from)).unwrap_err();
    assert!(
        error.to_string().contains("epochs must be >= 1, got 0"),
        "{error}"
    );
}

#[test]
fn resume_without_a_checkpoint_is_a_clear_error() {
    let out = out_dir("none");
    let error = train(&small_config(1), &Mnist::embedded(), &options(&out, true)).unwrap_err();
    assert!(
        error.to_string().contains("--resume: no checkpoint in"),
        "{error}"
    );
}

/// The trained run as a codec: the stream round-trips (checked inside `compress`), its payload
/// is at the cross-entropy bound, its PSNR is the validation PSNR (8-bit rounding aside), and
/// a damaged file is an error.
fn compress_and_decompress(run: &Path, val_psnr_db: f64) {
    let device = Device::flex();
    for levels in [1, 2] {
        let options = CompressOptions {
            run: run.to_path_buf(),
            idx: None,
            images: Some(64),
            levels: Some(levels),
            output: run.join(format!("digits-{levels}.rvqz")),
            picture: run.join(format!("compressed-{levels}.png")),
        };
        let report = compress(&options, &device).expect("compress runs");
        assert_eq!((report.images, report.levels), (64, levels));
        assert!(
            report.payload_overhead_percent().abs() < 1.0,
            "{}",
            report.summary()
        );
        assert!(report.ratio_to_raw() > 10.0, "{}", report.summary());
        if levels == 2 {
            // The validation PSNR is on the same 64 digits, before 8-bit rounding.
            assert!(
                (report.psnr_db - val_psnr_db).abs() < 0.3,
                "{} against {val_psnr_db}",
                report.summary()
            );
        }
        let picture = run.join(format!("decompressed-{levels}.png"));
        let (images, bits) = decompress(run, &options.output, &picture, &device).unwrap();
        assert_eq!(images, 64);
        assert!((bits - report.bits_per_image()).abs() < 1e-9);
        assert!(std::fs::read(&picture).unwrap().starts_with(b"\x89PNG"));

        let mut damaged = std::fs::read(&options.output).unwrap();
        let middle = damaged.len() / 2;
        damaged[middle] ^= 0x10;
        let bad = run.join("damaged.rvqz");
        std::fs::write(&bad, damaged).unwrap();
        let error = decompress(run, &bad, &picture, &device).unwrap_err();
        assert!(error.to_string().contains("corrupted"), "{error}");
    }
    let error = vqvae_demo::run(["decompress".to_string()]).unwrap_err();
    assert!(error.to_string().contains("needs --in"), "{error}");
    rd_curve_of(run);
}

/// `rd-curve` on the trained run: a line of `rd_curve.jsonl` per point with the fields the
/// README gives, the greedy prefixes' bytes those of `compress --levels m`, every rate-
/// distortion stream decoded to its codes (checked inside), and the picture.
fn rd_curve_of(run: &Path) {
    let out = run.join("rd");
    let args = [
        "rd-curve",
        "--run",
        run.to_str().unwrap(),
        "--images",
        "64",
        "--out",
    ];
    let args = args
        .iter()
        .map(|a| a.to_string())
        .chain([out.display().to_string()]);
    vqvae_demo::run(args).expect("rd-curve runs");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.join("rd_curve.jsonl"))
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let levels = 2; // small_config
    assert_eq!(
        lines.len(),
        levels + 2 * 14,
        "prefixes, then 14 lambdas x beams 1 and 4"
    );
    for line in &lines {
        let fields: Vec<&str> = line
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut fields = fields;
        fields.sort_unstable();
        assert_eq!(
            fields,
            [
                "beam",
                "bits_per_pixel",
                "bytes",
                "lambda",
                "levels",
                "method",
                "psnr_db"
            ]
        );
        let bytes = line["bytes"].as_f64().unwrap();
        let bpp = line["bits_per_pixel"].as_f64().unwrap();
        assert!((bpp - 8.0 * bytes / (64.0 * 784.0)).abs() < 1e-12, "{line}");
        // The three-epoch model of small_config draws blurs: about 10 dB.
        assert!(line["psnr_db"].as_f64().unwrap() > 5.0, "{line}");
    }
    for (m, line) in lines[..levels].iter().enumerate() {
        assert_eq!(line["method"], "prefix");
        let stream = std::fs::read(run.join(format!("digits-{}.rvqz", m + 1))).unwrap();
        assert_eq!(
            line["bytes"].as_u64().unwrap() as usize,
            stream.len(),
            "{line}"
        );
    }
    assert!(lines[levels..].iter().all(|line| line["method"] == "rd"));
    assert!(
        std::fs::read(out.join("rd_curve.png"))
            .unwrap()
            .starts_with(b"\x89PNG")
    );
}

/// `--devices 2`: the same loop, records, checkpoints and pictures as one device; the
/// quantizer in data-parallel mode; a resumed run matches an uninterrupted one.
#[test]
fn trains_on_two_devices_and_resumes_exactly() {
    let data = Mnist::embedded();
    let out = out_dir("devices");
    let summary = train(&small_config(2), &data, &on_devices(&out, false, 2)).expect("runs");
    let records = read_metrics(&out);
    assert_eq!(records.len(), 2);
    for (read, kept) in records.iter().zip(&summary.epochs) {
        let mut kept = kept.clone();
        kept.validation.code_histograms.clear(); // not written to metrics.jsonl
        assert_eq!(read, &kept);
    }
    for record in &records {
        assert_eq!(record.devices, 2);
        assert!(record.train_loss.is_finite(), "{record:?}");
        assert!(record.images_per_second > 0.0, "{record:?}");
        assert_eq!(record.ema_entropy.len(), 2);
        assert!(record.validation.val_psnr_db.is_finite());
    }
    assert!(records[1].train_loss < records[0].train_loss, "{records:?}");
    let saved = TrainingConfig::load(out.join("config.json")).expect("config.json written");
    assert!(saved.model.quantizer.data_parallel);
    for file in [
        "reconstructions.png",
        "codebook_usage.png",
        "training_curves.png",
    ] {
        assert!(out.join(file).exists(), "{file} missing");
    }
    compress_eight(&out, &Device::flex());

    let resumed = out_dir("devices-resumed");
    train(&small_config(1), &data, &on_devices(&resumed, false, 2)).unwrap();
    train(&small_config(2), &data, &on_devices(&resumed, true, 2)).unwrap();
    same_training(&records, &read_metrics(&resumed));
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&resumed);
}

/// `--backend tch` (feature `tch`, LibTorch on the CPU): the same loop trains, the quantizer
/// runs its host path on LibTorch's tensors, a resumed run matches an uninterrupted one, and
/// the checkpoint codes digits on LibTorch and, moved, on flex alike.
#[cfg(feature = "tch")]
#[test]
#[allow(deprecated)] // Burn 0.22 deprecates its LibTorch backend but still offers it.
fn trains_on_libtorch_and_resumes_exactly() {
    let data = Mnist::embedded();
    let libtorch = |out: &Path, resume| on(out, resume, vec![Device::libtorch()]);
    let out = out_dir("libtorch");
    let summary = train(&small_config(2), &data, &libtorch(&out, false)).expect("runs");
    let records = read_metrics(&out);
    assert_eq!(records.len(), 2);
    assert!(records[1].train_loss < records[0].train_loss, "{records:?}");
    for record in &records {
        let v = &record.validation;
        assert!(
            v.val_psnr_db.is_finite() && v.val_psnr_db > 5.0,
            "{record:?}"
        );
        assert!(v.val_usage.iter().all(|u| (0.0..=1.0).contains(u)));
        assert_eq!(record.ema_entropy.len(), 2);
    }
    assert_codes_in_range(&summary.model, &data, 16, &Device::libtorch());
    for device in [Device::libtorch(), Device::flex()] {
        compress_eight(&out, &device);
    }

    let resumed = out_dir("libtorch-resumed");
    train(&small_config(1), &data, &libtorch(&resumed, false)).unwrap();
    train(&small_config(2), &data, &libtorch(&resumed, true)).unwrap();
    same_training(&records, &read_metrics(&resumed));
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&resumed);
}

/// `--backend wgpu` (feature `wgpu`; Mesa's lavapipe in CI): training and coding take the
/// same adapter, a few hundred digits train for an epoch, the checkpoint compresses and
/// decompresses on it, and more devices than adapters is a clear error, not a panic.
#[cfg(feature = "wgpu")]
#[test]
fn trains_and_codes_on_wgpu() {
    use burn::tensor::DeviceType;
    use vqvae_demo::backend::Backend;
    use vqvae_demo::codec::load_trained;
    use vqvae_demo::evaluation::evaluate;

    if std::env::var_os("RVQ_SKIP_WGPU").is_some() {
        eprintln!("########## RVQ_SKIP_WGPU set: the demo's wgpu test is SKIPPED ##########");
        return;
    }
    let backend = Backend::Wgpu;
    let devices = backend.devices(1).expect("a WGPU adapter starts");
    let coding = backend.device().expect("a WGPU adapter starts");
    assert_eq!(
        devices,
        vec![coding.clone()],
        "training and coding on one adapter"
    );

    let adapters = Device::enumerate(DeviceType::Wgpu).into_vec().len();
    let error = backend.devices(adapters + 1).unwrap_err().to_string();
    assert!(
        error.contains(&format!("--devices {} asks for", adapters + 1))
            && error.contains("adapters found"),
        "{error}"
    );

    let data = Mnist::embedded();
    let out = out_dir("wgpu");
    let summary = train(&small_config(1), &data, &on(&out, false, devices)).expect("runs");
    let records = read_metrics(&out);
    assert_eq!(records.len(), 1);
    let record = &records[0];
    let v = &record.validation;
    assert!(record.train_loss.is_finite(), "{record:?}");
    assert!(
        v.val_psnr_db.is_finite() && v.val_psnr_db > 5.0,
        "{record:?}"
    );
    assert!(v.val_usage.iter().all(|u| (0.0..=1.0).contains(u)));
    assert_eq!(record.ema_entropy.len(), 2);
    assert_codes_in_range(&summary.model, &data, 16, &coding);
    // The validation measured on WGPU is the one the checkpoint gives on flex (a reduction
    // fused after the decoder once made WGPU's reconstructions come back wrong).
    let flex = Device::flex();
    let on_flex = evaluate(
        &load_trained(&out, &flex).expect("the checkpoint loads on flex"),
        &data.valid.take(64),
        32,
        &flex,
    );
    assert!(
        (on_flex.val_psnr_db - v.val_psnr_db).abs() < 1e-3,
        "validation PSNR on wgpu {} dB, the same checkpoint on flex {} dB",
        v.val_psnr_db,
        on_flex.val_psnr_db
    );

    compress_eight(&out, &coding);
    let stream = out.join("digits.rvqz");
    let picture = out.join("decompressed.png");
    let (images, bits) = decompress(&out, &stream, &picture, &coding).expect("decompresses");
    assert_eq!(images, 8);
    assert!(bits > 0.0);
    assert!(std::fs::read(&picture).unwrap().starts_with(b"\x89PNG"));
    let _ = std::fs::remove_dir_all(&out);
}
