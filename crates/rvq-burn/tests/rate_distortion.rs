//! Rate-distortion encoding (`EncodeOptions`): today's codes and streams by default, exact
//! round trips of streams with a depth per vector on every path, answers known by
//! construction (beam search against greedy, a heavy lambda, depths), and clear errors.

mod common;

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};
use common::*;
use rvq_burn::coding::{ABSENT, FORMAT_VERSION};
use rvq_burn::{
    EmaResidualVectorQuantizer, EmaResidualVectorQuantizerConfig, EncodeOptions, Execution,
    RvqError, StreamError,
};

const DIM: usize = 6;
const SIZES: [usize; 4] = [16, 8, 8, 4];

/// Vectors from a few clusters of unequal weight (codes far from uniform, so that code
/// lengths differ), at scale 1.
fn clustered(n: usize, seed: u64) -> Vec<f32> {
    let mut draws = Rng::new(seed);
    let centres: Vec<Vec<f32>> = (0..5)
        .map(|_| (0..DIM).map(|_| draws.normal() as f32).collect())
        .collect();
    let mut values = Vec::with_capacity(n * DIM);
    for _ in 0..n {
        let mut cluster = 0;
        while cluster < 4 && draws.uniform() < 0.5 {
            cluster += 1;
        }
        values.extend(
            centres[cluster]
                .iter()
                .map(|c| c + 0.4 * draws.normal() as f32),
        );
    }
    values
}

/// A quantizer trained a few steps on `flex`, then the same state on every path: the host
/// path (`flex`, `ndarray`), the tensor path (`flex`), and with `wgpu` the kernel path and
/// the tensor path there (unless `RVQ_SKIP_WGPU` is set: then said loudly).
fn on_every_path() -> Vec<(String, EmaResidualVectorQuantizer, Device)> {
    let device = Device::flex().autodiff();
    let config = EmaResidualVectorQuantizerConfig::new(4, SIZES.to_vec().into(), DIM);
    let trained = seeded_quantizer(&config, &device, 3);
    for step in 0..6 {
        let x = tensor(&clustered(400, 50 + step), [400, DIM], &device);
        let _ = trained.forward(x);
    }
    trained.sync_state();
    let mut devices: Vec<(String, Device, Execution)> = cpu_devices()
        .into_iter()
        .map(|(name, device)| (format!("host path on {name}"), device, Execution::Auto))
        .collect();
    devices.push((
        "tensor path on flex".into(),
        Device::flex(),
        Execution::TensorOps,
    ));
    #[cfg(feature = "wgpu")]
    match std::env::var_os("RVQ_SKIP_WGPU") {
        Some(_) => eprintln!("RVQ_SKIP_WGPU set: rate-distortion encoding on wgpu SKIPPED"),
        None => {
            devices.push(("kernel path on wgpu".into(), wgpu_device(), Execution::Auto));
            devices.push((
                "tensor path on wgpu".into(),
                wgpu_device(),
                Execution::TensorOps,
            ));
        }
    }
    #[cfg(not(feature = "wgpu"))]
    eprintln!("feature wgpu off: rate-distortion encoding on the kernel path SKIPPED");
    devices
        .into_iter()
        .map(|(name, device, execution)| {
            let rvq = config.clone().with_execution(execution).init(&device);
            for level in 0..SIZES.len() {
                let state = trained.statistics(level, &device);
                rvq.try_set_statistics(level, state.counts, state.sums)
                    .unwrap();
            }
            (name, rvq.valid(), device)
        })
        .collect()
}

fn codes_of(codes: Vec<Tensor<1, Int>>) -> Vec<Vec<i64>> {
    codes.into_iter().map(ints).collect()
}

/// `sum_i ||x_i - x^_i||^2` and the bits of the codes (-1: none) under the quantizer's models.
fn cost(
    rvq: &EmaResidualVectorQuantizer,
    x: &[f32],
    codes: &[Vec<i64>],
    device: &Device,
) -> (f64, f64) {
    let n = x.len() / DIM;
    let tensors: Vec<Tensor<1, Int>> = codes
        .iter()
        .map(|level| Tensor::from_data(TensorData::new(level.clone(), [n]), device))
        .collect();
    let decoded = floats(rvq.try_decode_partial(&tensors, [n, DIM]).unwrap());
    let error: f64 = x
        .iter()
        .zip(&decoded)
        .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
        .sum();
    let models = rvq.entropy_models().unwrap();
    let bits: f64 = codes
        .iter()
        .zip(models.levels())
        .map(|(level, model)| {
            let lengths = model.code_lengths();
            level
                .iter()
                .filter(|&&c| c >= 0)
                .map(|&c| lengths[c as usize])
                .sum::<f64>()
        })
        .sum();
    (error, bits)
}

/// The default options are `try_encode` and `try_compress`, code for code and byte for byte,
/// on every path; so are `max_levels` and their fewer levels.
#[test]
fn default_options_give_todays_codes_and_streams_on_every_path() {
    let x = clustered(300, 7);
    for (name, rvq, device) in on_every_path() {
        let input = tensor(&x, [300, DIM], &device);
        for levels in [SIZES.len(), 2] {
            let options = EncodeOptions::new().with_max_levels(levels);
            let want = codes_of(rvq.try_encode(input.clone(), levels).unwrap());
            let got = codes_of(rvq.try_encode_with(input.clone(), &options).unwrap());
            assert_eq!(got, want, "{name}, {levels} levels: codes");
            let want = rvq.try_compress(input.clone(), levels).unwrap();
            let got = rvq.try_compress_with(input.clone(), &options).unwrap();
            assert_eq!(got, want, "{name}, {levels} levels: stream");
            assert_eq!(got[4], 1, "{name}: a stream of full depth stays version 1");
        }
    }
}

/// For random lambda, beam and depth rules, on every path: the stream decodes to the
/// encoder's codes and to exactly what `try_decode_partial` gives for them; every path
/// chooses the same codes; depths are prefixes; a beam never costs more than greedy, nor a
/// lambda term more than none at its own lambda.
#[test]
fn rate_distortion_streams_round_trip_on_every_path() {
    let n = 257;
    let x = clustered(n, 9);
    let paths = on_every_path();
    let mut draws = Rng::new(4);
    let mut saw_version_2 = false;
    for trial in 0..10 {
        let lambda = match trial % 3 {
            0 => 0.0,
            _ => 0.02 * draws.uniform() * 4f64.powi(trial % 4),
        };
        let beam = 1 + (draws.next_u64() % 5) as usize;
        let max_levels = 1 + (draws.next_u64() % SIZES.len() as u64) as usize;
        let mut options = EncodeOptions::new()
            .with_lambda(lambda)
            .with_beam(beam)
            .with_max_levels(max_levels)
            .with_rd_depth(trial % 2 == 1);
        if trial % 4 == 2 {
            options = options.with_stop_below(0.5 + draws.uniform());
        }
        let what = format!("trial {trial}: {options:?}");
        let mut first: Option<Vec<Vec<i64>>> = None;
        for (name, rvq, device) in &paths {
            let input = tensor(&x, [n, DIM], device);
            let codes = codes_of(rvq.try_encode_with(input.clone(), &options).unwrap());
            assert_eq!(codes.len(), max_levels, "{what}, {name}");
            for i in 0..n {
                assert!(
                    codes[0][i] >= 0,
                    "{what}, {name}: vector {i} has no first code"
                );
                let depth = codes.iter().take_while(|level| level[i] >= 0).count();
                assert!(
                    codes[depth..].iter().all(|level| level[i] == -1),
                    "{what}, {name}: vector {i} is not a prefix"
                );
                if !options.rd_depth && options.stop_below.is_none() {
                    assert_eq!(depth, max_levels, "{what}, {name}: fixed depth");
                }
            }
            let bytes = rvq.try_compress_with(input.clone(), &options).unwrap();
            saw_version_2 |= bytes[4] == 2;
            let (indices, decoded) = rvq.try_decompress::<2>(&bytes, device).unwrap();
            assert_eq!(
                codes_of(indices.clone()),
                codes,
                "{what}, {name}: stream codes"
            );
            let want = rvq.try_decode_partial(&indices, [n, DIM]).unwrap();
            assert_eq!(
                floats(decoded),
                floats(want),
                "{what}, {name}: the stream's reconstruction"
            );
            // No worse than greedy at the same lambda, by the cost the encoder minimizes.
            if beam > 1 && !options.rd_depth && options.stop_below.is_none() {
                let greedy = EncodeOptions { beam: 1, ..options };
                let greedy = codes_of(rvq.try_encode_with(input.clone(), &greedy).unwrap());
                let (e, b) = cost(rvq, &x, &codes, device);
                let (ge, gb) = cost(rvq, &x, &greedy, device);
                let (j, gj) = (e + lambda * b, ge + lambda * gb);
                assert!(
                    j <= gj * (1.0 + 1e-5),
                    "{what}, {name}: beam {j} > greedy {gj}"
                );
            }
            match &first {
                None => first = Some(codes),
                Some(want) => assert_eq!(&codes, want, "{what}: {name} against the first path"),
            }
        }
    }
    assert!(saw_version_2, "some trial stops vectors early");
}

/// A quantizer of one dimension with the given codebooks (counts one: each codebook is its
/// sums) on `device`.
fn one_dimensional(
    codebooks: &[&[f32]],
    counts: Option<&[f32]>,
    device: &Device,
) -> EmaResidualVectorQuantizer {
    let sizes: Vec<usize> = codebooks.iter().map(|c| c.len()).collect();
    let config = EmaResidualVectorQuantizerConfig::new(codebooks.len(), sizes.into(), 1);
    let rvq = config.init(device);
    for (level, codes) in codebooks.iter().enumerate() {
        let k = codes.len();
        let counts: Vec<f32> = match (level, counts) {
            (0, Some(counts)) => counts.to_vec(),
            _ => vec![1.0; k],
        };
        let sums: Vec<f32> = codes.iter().zip(&counts).map(|(e, c)| e * c).collect();
        rvq.try_set_statistics(
            level,
            tensor(&counts, [k], device),
            tensor(&sums, [k, 1], device),
        )
        .unwrap();
    }
    rvq.valid()
}

/// Greedy takes the code nearest 3.4 at level 1 (4), and level 2 cannot undo it (-3 leaves
/// 2.4); a beam of 2 keeps 0 as well, which 3 completes to 0.4.
#[test]
fn a_beam_of_two_finds_what_greedy_provably_misses() {
    for (name, device) in [("flex", Device::flex())]
        .into_iter()
        .chain(cpu_devices().into_iter().skip(1))
    {
        for execution in [Execution::Auto, Execution::TensorOps] {
            let rvq = one_dimensional(&[&[0.0, 4.0], &[-3.0, 3.0]], None, &device);
            let config = rvq.config().clone().with_execution(execution);
            let rvq = {
                let copy = config.init(&device);
                for level in 0..2 {
                    let s = rvq.statistics(level, &device);
                    copy.try_set_statistics(level, s.counts, s.sums).unwrap();
                }
                copy.valid()
            };
            let x = tensor(&[3.4], [1, 1], &device);
            let greedy = codes_of(
                rvq.try_encode_with(x.clone(), &EncodeOptions::new())
                    .unwrap(),
            );
            assert_eq!(
                greedy,
                vec![vec![1], vec![0]],
                "{name} {execution:?}: greedy"
            );
            let beam = EncodeOptions::new().with_beam(2);
            let best = codes_of(rvq.try_encode_with(x.clone(), &beam).unwrap());
            assert_eq!(best, vec![vec![0], vec![1]], "{name} {execution:?}: beam 2");
            let decoded = floats(
                rvq.try_decode_partial(&rvq.try_encode_with(x, &beam).unwrap(), [1, 1])
                    .unwrap(),
            );
            assert!((decoded[0] - 3.0).abs() < 1e-6, "{decoded:?}");
        }
    }
}

/// Code 0 is used a thousand times as often as code 1. A point a little nearer code 1 takes
/// it while a bit is worth little, and code 0 once lambda prices code 1's ten extra bits
/// above the 0.1 of squared error it saves. A second level that saves 0.0089 of error for
/// log2 3 bits is kept at lambda 0.001 and dropped by `rd_depth` at 0.01; `stop_below` stops a
/// vector whose first level is already good enough.
#[test]
fn a_heavy_lambda_drives_a_vector_to_a_cheaper_code_and_a_shallower_depth() {
    let device = Device::flex();
    let x = tensor(&[0.55], [1, 1], &device);
    let rvq = one_dimensional(&[&[0.0, 1.0], &[0.0]], Some(&[1000.0, 1.0]), &device);
    let lengths = rvq.entropy_models().unwrap().levels()[0].code_lengths();
    assert!(lengths[1] - lengths[0] > 9.5, "{lengths:?}");
    let level_one = |lambda: f64| {
        let options = EncodeOptions::new().with_lambda(lambda).with_max_levels(1);
        ints(rvq.try_encode_with(x.clone(), &options).unwrap().remove(0))[0]
    };
    assert_eq!(level_one(0.0), 1);
    assert_eq!(
        level_one(0.001),
        1,
        "0.01 bits' worth of error is less than 0.1"
    );
    assert_eq!(
        level_one(0.1),
        0,
        "10 bits at 0.1 each outweigh 0.1 of error"
    );

    // 0.55 -> -0.45 after level 1 (code 1 either way: both cost one bit); level 2 takes it to
    // -0.44.
    let rvq = one_dimensional(&[&[0.0, 1.0], &[-0.01, 0.01, 2.0]], None, &device);
    let depth = |options: EncodeOptions| {
        let codes = codes_of(rvq.try_encode_with(x.clone(), &options).unwrap());
        assert_eq!(codes[0], vec![1]);
        codes.iter().take_while(|level| level[0] >= 0).count()
    };
    let lambda = |lambda: f64| EncodeOptions::new().with_lambda(lambda);
    assert_eq!(depth(lambda(0.01)), 2, "a fixed depth");
    assert_eq!(
        depth(lambda(0.001).with_rd_depth(true)),
        2,
        "0.0016 < 0.0089"
    );
    assert_eq!(
        depth(lambda(0.01).with_rd_depth(true)),
        1,
        "0.0158 > 0.0089"
    );
    assert_eq!(
        depth(lambda(0.01).with_rd_depth(true).with_beam(3)),
        1,
        "beam 3"
    );
    assert_eq!(
        depth(lambda(0.0).with_rd_depth(true)),
        2,
        "lambda 0: the error alone"
    );
    assert_eq!(
        depth(lambda(0.0).with_stop_below(0.25)),
        1,
        "0.2025 <= 0.25"
    );
    assert_eq!(
        depth(lambda(0.0).with_stop_below(0.1)),
        2,
        "0.1936 > 0.1: every level"
    );
}

/// Every bad option is an `InvalidArgument` or `LevelCount` naming it, and leaves the state as
/// it was; codes that are not prefixes are refused by `try_decode_partial` and `compress`.
#[test]
fn bad_options_are_clear_errors_that_leave_the_state_unchanged() {
    let (_, rvq, device) = on_every_path().remove(0);
    let before = state_bits(&rvq);
    let x = tensor(&clustered(20, 1), [20, DIM], &device);
    let invalid = |options: EncodeOptions, argument: &str| {
        for result in [
            rvq.try_encode_with(x.clone(), &options).map(|_| ()),
            rvq.try_compress_with(x.clone(), &options).map(|_| ()),
        ] {
            match result {
                Err(RvqError::InvalidArgument { argument: a, .. }) if a == argument => {}
                other => panic!("{options:?}: expected InvalidArgument({argument}), got {other:?}"),
            }
        }
    };
    invalid(EncodeOptions::new().with_lambda(-0.1), "lambda");
    invalid(EncodeOptions::new().with_lambda(f64::NAN), "lambda");
    invalid(EncodeOptions::new().with_lambda(f64::INFINITY), "lambda");
    invalid(EncodeOptions::new().with_beam(0), "beam");
    invalid(EncodeOptions::new().with_stop_below(-1.0), "stop_below");
    invalid(EncodeOptions::new().with_stop_below(f64::NAN), "stop_below");
    for levels in [0, SIZES.len() + 1] {
        let options = EncodeOptions::new().with_max_levels(levels).with_beam(2);
        assert!(
            matches!(
                rvq.try_encode_with(x.clone(), &options),
                Err(RvqError::LevelCount { requested, available: 4 }) if requested == levels
            ),
            "{levels} levels"
        );
    }
    let error = rvq
        .try_encode_with(x.clone(), &EncodeOptions::new().with_lambda(-1.0))
        .unwrap_err();
    assert!(
        error.to_string().contains("lambda") && error.to_string().contains("-1"),
        "{error}"
    );
    assert_eq!(state_bits(&rvq), before, "state unchanged");

    let n = 3;
    let codes = |levels: &[[i64; 3]]| -> Vec<Tensor<1, Int>> {
        levels
            .iter()
            .map(|level| Tensor::from_data(TensorData::new(level.to_vec(), [n]), &device))
            .collect()
    };
    let after_absent =
        rvq.try_decode_partial(&codes(&[[0, 1, 2], [0, -1, 1], [1, 1, 0]]), [n, DIM]);
    assert!(
        matches!(&after_absent, Err(RvqError::InvalidArgument { value, .. }) if value.contains("position 1")),
        "{after_absent:?}"
    );
    let no_first = rvq.try_decode_partial(&codes(&[[0, -1, 2]]), [n, DIM]);
    assert!(
        matches!(
            no_first,
            Err(RvqError::IndexOutOfRange {
                level: 0,
                min: -1,
                ..
            })
        ),
        "{no_first:?}"
    );
    assert!(
        rvq.try_decode(&codes(&[[0, 1, 2], [0, -1, 1]]), [n, DIM])
            .is_err(),
        "plain decode refuses -1"
    );
    let models = rvq.entropy_models().unwrap();
    let shape = [n, DIM];
    assert!(matches!(
        models.compress(&[vec![0, 1, 2], vec![0, ABSENT, 1], vec![1, 1, 0]], &shape),
        Err(RvqError::InvalidArgument { .. })
    ));
    assert!(matches!(
        models.compress(&[vec![ABSENT, 1, 2]], &shape),
        Err(RvqError::IndexOutOfRange {
            level: 0,
            min: -1,
            ..
        })
    ));
}

/// FNV-1a as the stream's checksum, to forge streams that pass it.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xCBF2_9CE4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

fn reseal(bytes: &mut [u8]) {
    let end = bytes.len() - 8;
    let checksum = fnv1a64(&bytes[..end]);
    bytes[end..].copy_from_slice(&checksum.to_le_bytes());
}

/// A version 2 stream: every bit flip is caught; another version, depth counts that do not
/// sum to the vectors or do not match the payload's depths, each a clear error.
#[test]
fn damaged_depth_streams_are_clear_errors() {
    let (_, rvq, device) = on_every_path().remove(0);
    let n = 40;
    let x = tensor(&clustered(n, 2), [n, DIM], &device);
    let options = EncodeOptions::new().with_lambda(0.05).with_rd_depth(true);
    let bytes = rvq.try_compress_with(x, &options).unwrap();
    assert_eq!(
        bytes[4], FORMAT_VERSION,
        "a stream with depths is version {FORMAT_VERSION}"
    );
    let models = rvq.entropy_models().unwrap();
    let decode = |bytes: &[u8]| match models.decompress(bytes) {
        Err(RvqError::Stream(error)) => error,
        other => panic!("expected a stream error, got {other:?}"),
    };
    let stream = models.decompress(&bytes).unwrap();
    assert!(stream.has_depths());
    for at in 0..bytes.len() {
        for bit in 0..8 {
            let mut flipped = bytes.clone();
            flipped[at] ^= 1 << bit;
            let error = decode(&flipped);
            assert!(
                matches!(
                    error,
                    StreamError::BadMagic { .. }
                        | StreamError::UnsupportedVersion { .. }
                        | StreamError::Checksum { .. }
                        | StreamError::Truncated { .. }
                        | StreamError::TrailingBytes { .. }
                ),
                "byte {at} bit {bit}: {error:?}"
            );
        }
    }
    let mut newer = bytes.clone();
    newer[4] = FORMAT_VERSION + 1;
    reseal(&mut newer);
    assert_eq!(
        decode(&newer),
        StreamError::UnsupportedVersion {
            found: FORMAT_VERSION + 1,
            supported: FORMAT_VERSION
        }
    );
    assert!(decode(&newer).to_string().contains("expected 1 to 2"));
    // Read as version 1, its depth counts are taken for the payload's length.
    let mut older = bytes.clone();
    older[4] = 1;
    reseal(&mut older);
    assert!(models.decompress(&older).is_err());

    // The depth counts: after magic, version, n, rank, reserved, D, 4 K's, 2 dims, fingerprint.
    let counts_at = 4 + 4 + 4 + 4 * SIZES.len() + 8 * 2 + 8;
    let count = |bytes: &[u8], level: usize| {
        u32::from_le_bytes(
            bytes[counts_at + 4 * level..counts_at + 4 * level + 4]
                .try_into()
                .unwrap(),
        )
    };
    let total: u32 = (0..SIZES.len()).map(|level| count(&bytes, level)).sum();
    assert_eq!(total as usize, n);
    let set = |bytes: &mut Vec<u8>, level: usize, value: u32| {
        bytes[counts_at + 4 * level..counts_at + 4 * level + 4]
            .copy_from_slice(&value.to_le_bytes());
        reseal(bytes);
    };
    let mut too_many = bytes.clone();
    set(&mut too_many, 0, count(&bytes, 0) + 1);
    let error = decode(&too_many);
    assert!(
        error
            .to_string()
            .contains("sum to 41, expected the 40 vectors"),
        "{error}"
    );
    // Moved from one depth to another: the sum holds, the payload's depths do not match.
    let (from, to) = match count(&bytes, 0) {
        0 => (1, 0),
        _ => (0, 1),
    };
    let mut moved = bytes.clone();
    set(&mut moved, from, count(&bytes, from) - 1);
    set(&mut moved, to, count(&bytes, to) + 1);
    let error = decode(&moved);
    assert!(matches!(error, StreamError::Malformed { .. }), "{error:?}");
}
