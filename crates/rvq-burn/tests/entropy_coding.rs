//! Codes to bytes: exact round trips at every level count, a payload at the cross-entropy
//! bound, and a clear error for every kind of bad stream.

mod common;

use burn::module::Module;
use burn::tensor::{Bool, Device, Tensor, TensorData};
use common::*;
use rvq_burn::coding::{FORMAT_VERSION, MAGIC, indices_to_host};
use rvq_burn::{
    EmaResidualVectorQuantizer, EmaResidualVectorQuantizerConfig, ForwardOptions, RvqError,
    StreamError,
};

/// `n` vectors of dimension `dim` from a mixture of clusters of unequal weight, so that the
/// codes are far from uniform.
fn clustered(n: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut draws = Rng::new(seed);
    let centres: Vec<Vec<f32>> = (0..6)
        .map(|_| (0..dim).map(|_| 2.0 * draws.normal() as f32).collect())
        .collect();
    let mut values = Vec::with_capacity(n * dim);
    for _ in 0..n {
        // Cluster c with probability proportional to 2^-c.
        let mut cluster = 0;
        while cluster < 5 && draws.uniform() < 0.5 {
            cluster += 1;
        }
        values.extend(
            centres[cluster]
                .iter()
                .map(|c| c + 0.3 * draws.normal() as f32),
        );
    }
    values
}

/// A quantizer trained for a few steps on clustered data.
fn trained(
    levels: usize,
    sizes: Vec<usize>,
    dim: usize,
    steps: usize,
) -> EmaResidualVectorQuantizer {
    let device = Device::flex().autodiff();
    let config = EmaResidualVectorQuantizerConfig::new(levels, sizes.into(), dim);
    let rvq = seeded_quantizer(&config, &device, 7);
    for step in 0..steps {
        let x = tensor(&clustered(512, dim, 100 + step as u64), [512, dim], &device);
        let _ = rvq.forward(x);
    }
    rvq.sync_state();
    rvq.valid()
}

fn stream_error(result: Result<impl std::fmt::Debug, RvqError>) -> StreamError {
    match result {
        Err(RvqError::Stream(error)) => error,
        other => panic!("expected a stream error, got {other:?}"),
    }
}

/// The stream error of `result`, which must say `fragment`.
fn stream_error_saying(
    result: Result<impl std::fmt::Debug, RvqError>,
    fragment: &str,
) -> StreamError {
    let error = stream_error(result);
    assert!(error.to_string().contains(fragment), "{error}");
    error
}

/// FNV-1a 64, to forge streams whose checksum is valid.
fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xCBF2_9CE4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

fn reseal(mut bytes: Vec<u8>) -> Vec<u8> {
    let body = bytes.len() - 8;
    let sum = checksum(&bytes[..body]);
    bytes[body..].copy_from_slice(&sum.to_le_bytes());
    bytes
}

#[test]
fn round_trip_is_exact_for_every_level_count_and_rank() {
    let device = Device::flex();
    let rvq = trained(4, vec![16, 32, 8, 64], 6, 3);
    let values = clustered(2 * 3 * 5, 6, 7);
    let x = tensor(&values, [2, 3, 5, 6], &device);
    for levels in 1..=4 {
        let want = indices_to_host(rvq.try_encode(x.clone(), levels).unwrap()).unwrap();
        let bytes = rvq.try_compress(x.clone(), levels).unwrap();
        let (codes, dequantized) = rvq.try_decompress::<4>(&bytes, &device).unwrap();
        assert_eq!(
            indices_to_host(codes.clone()).unwrap(),
            want,
            "{levels} levels"
        );
        assert_eq!(dequantized.dims(), [2, 3, 5, 6]);
        let decoded = rvq.decode(&codes, [2, 3, 5, 6]);
        assert_eq!(floats(dequantized), floats(decoded));
        // The stream of n levels is the n-level prefix of the full code.
        let full = indices_to_host(rvq.encode(x.clone())).unwrap();
        assert_eq!(want[..], full[..levels]);
    }
    // Rank 2 and an empty batch.
    let flat = tensor(&values, [30, 6], &device);
    let bytes = rvq.try_compress(flat.clone(), 4).unwrap();
    let (codes, _) = rvq.try_decompress::<2>(&bytes, &device).unwrap();
    assert_eq!(
        indices_to_host(codes).unwrap(),
        indices_to_host(rvq.encode(flat)).unwrap()
    );
    let empty = Tensor::<2>::zeros([0, 6], &device);
    let bytes = rvq.try_compress(empty, 2).unwrap();
    let (codes, dequantized) = rvq.try_decompress::<2>(&bytes, &device).unwrap();
    assert_eq!(codes.len(), 2);
    assert_eq!(dequantized.dims(), [0, 6]);
}

#[test]
fn round_trip_is_exact_on_random_indices_including_improbable_codes() {
    // Indices drawn uniformly, whatever the counts say: codes the EMA has never seen cost
    // many bits but must still round-trip.
    let rvq = trained(3, vec![256, 16, 1], 4, 2);
    let models = rvq.entropy_models().unwrap();
    let mut draws = Rng::new(3);
    for n in [1usize, 2, 17, 1000] {
        let indices: Vec<Vec<u32>> = rvq
            .sizes()
            .iter()
            .map(|&k| {
                (0..n)
                    .map(|_| (draws.uniform() * k as f64) as u32)
                    .collect()
            })
            .collect();
        let bytes = models.compress(&indices, &[n, 4]).unwrap();
        let stream = models.decompress(&bytes).unwrap();
        assert_eq!(stream.indices, indices);
        assert_eq!(stream.shape, vec![n, 4]);
    }
}

#[test]
fn payload_is_within_one_percent_of_the_cross_entropy() {
    let rvq = trained(4, vec![64; 4], 8, 20);
    let device = Device::flex();
    let x = tensor(&clustered(8192, 8, 99), [8192, 8], &device);
    let models = rvq.entropy_models().unwrap();
    for levels in 1..=4 {
        let indices = indices_to_host(rvq.try_encode(x.clone(), levels).unwrap()).unwrap();
        let bytes = models.compress(&indices, &[8192, 8]).unwrap();
        let stream = models.decompress(&bytes).unwrap();
        assert_eq!(stream.indices, indices);
        let ideal = models.cross_entropy_bits(&indices);
        let payload = stream.payload_bits as f64;
        // ANS flushes at most two words; the 24-bit tables cost a fraction of a percent.
        assert!(
            payload <= 1.01 * ideal && payload >= 0.99 * ideal,
            "{levels} levels: payload {payload} bits, cross-entropy {ideal} bits"
        );
        // And well below the fixed-length indices.
        assert!(payload < 0.9 * 8192.0 * 6.0 * levels as f64);
        let header = bytes.len() as f64 - payload / 8.0;
        assert_eq!(header, (36 + 4 * levels + 8 * 2) as f64);
    }
}

#[test]
fn the_same_checkpoint_gives_the_same_tables_and_streams() {
    let path = std::env::temp_dir().join(format!("rvq-entropy-{}.bpk", std::process::id()));
    let rvq = trained(3, vec![32; 3], 5, 4);
    rvq.clone().save_file(&path).unwrap();
    let device = Device::flex();
    let loaded = EmaResidualVectorQuantizerConfig::new(3, 32.into(), 5)
        .init(&device)
        .load_file(&path);
    let x = tensor(&clustered(300, 5, 11), [300, 5], &device);
    let a = rvq.try_compress(x.clone(), 3).unwrap();
    let b = loaded.try_compress(x, 3).unwrap();
    assert_eq!(a, b);
    let (ma, mb) = (
        rvq.entropy_models().unwrap(),
        loaded.entropy_models().unwrap(),
    );
    for (la, lb) in ma.levels().iter().zip(mb.levels()) {
        assert_eq!(la.fixed_point(), lb.fixed_point());
        assert_eq!(
            la.fixed_point().iter().map(|&p| u64::from(p)).sum::<u64>(),
            1 << 24
        );
        assert!(la.fixed_point().iter().all(|&p| p >= 1));
    }
    let _ = std::fs::remove_file(path);
}

#[test]
fn every_bad_stream_is_a_clear_error() {
    let device = Device::flex();
    let rvq = trained(3, vec![16, 16, 8], 4, 3);
    let x = tensor(&clustered(40, 4, 5), [40, 4], &device);
    let bytes = rvq.try_compress(x.clone(), 3).unwrap();
    let decompress = |bytes: &[u8]| rvq.try_decompress::<2>(bytes, &device);

    // Every truncation.
    for len in 0..bytes.len() {
        let error = stream_error(decompress(&bytes[..len]));
        assert!(
            matches!(
                error,
                StreamError::Truncated { .. } | StreamError::BadMagic { .. }
            ),
            "length {len}: {error:?}"
        );
        if len >= 4 {
            assert!(error.to_string().contains("truncated"), "{error}");
        }
    }
    // Trailing bytes.
    let mut longer = bytes.clone();
    longer.push(0);
    let error = stream_error(decompress(&longer));
    assert!(
        matches!(error, StreamError::TrailingBytes { .. }),
        "{error:?}"
    );

    // Every single flipped bit is caught, by the field it lands in or by the checksum.
    for at in 0..bytes.len() {
        for bit in 0..8 {
            let mut flipped = bytes.clone();
            flipped[at] ^= 1 << bit;
            let error = stream_error(decompress(&flipped));
            match at {
                0..4 => assert!(matches!(error, StreamError::BadMagic { .. })),
                4 => assert!(matches!(error, StreamError::UnsupportedVersion { .. })),
                _ => assert!(
                    matches!(
                        error,
                        StreamError::Checksum { .. }
                            | StreamError::Truncated { .. }
                            | StreamError::TrailingBytes { .. }
                    ),
                    "byte {at} bit {bit}: {error:?}"
                ),
            }
        }
    }
    let mut bad = bytes.clone();
    bad[0] = b'X';
    assert!(stream_error(decompress(&bad)).to_string().contains("RVQZ"));
    let mut bad = bytes.clone();
    bad[4] = FORMAT_VERSION + 1;
    assert_eq!(
        stream_error(decompress(&bad)),
        StreamError::UnsupportedVersion {
            found: FORMAT_VERSION + 1,
            supported: FORMAT_VERSION
        }
    );
    assert_eq!(&bytes[..4], &MAGIC);

    // Another configuration: other D, other K, fewer levels.
    let other_dim = trained(3, vec![16, 16, 8], 5, 3);
    stream_error_saying(
        other_dim.try_decompress::<2>(&bytes, &device),
        "D is 4 in the stream, expected 5",
    );
    let other_size = trained(3, vec![16, 32, 8], 4, 3);
    stream_error_saying(
        other_size.try_decompress::<2>(&bytes, &device),
        "K of level 1 is 16 in the stream, expected 32",
    );
    let fewer = trained(2, vec![16, 16], 4, 3);
    stream_error_saying(
        fewer.try_decompress::<2>(&bytes, &device),
        "levels is 3 in the stream, expected 2",
    );

    // Same configuration, other counts (one more training step): the tables differ.
    let further = trained(3, vec![16, 16, 8], 4, 4);
    let error = stream_error_saying(further.try_decompress::<2>(&bytes, &device), "checkpoint");
    assert!(
        matches!(error, StreamError::ModelMismatch { .. }),
        "{error:?}"
    );

    // Wrong rank asked for.
    stream_error_saying(rvq.try_decompress::<3>(&bytes, &device), "expected rank 3");

    // Forged with a valid checksum: a shape that does not end in D, a shape too large, no
    // levels, a payload that does not hold the declared codes.
    let shape_at = 8 + 4 + 4 * 3;
    let mut forged = bytes.clone();
    forged[shape_at + 8..shape_at + 16].copy_from_slice(&5u64.to_le_bytes());
    stream_error_saying(decompress(&reseal(forged)), "does not end in D = 4");
    let mut forged = bytes.clone();
    forged[shape_at..shape_at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    stream_error_saying(decompress(&reseal(forged)), "more than");
    // A caller's own, lower limit on the declared codes (40 vectors x 3 levels here).
    let models = rvq.entropy_models().unwrap();
    assert!(models.decompress_limited(&bytes, 120).is_ok());
    stream_error_saying(
        models.decompress_limited(&bytes, 119),
        "more than 119 codes",
    );
    let mut forged = bytes.clone();
    forged[shape_at..shape_at + 8].copy_from_slice(&41u64.to_le_bytes());
    let error = stream_error(decompress(&reseal(forged)));
    assert!(matches!(error, StreamError::Malformed { .. }), "{error:?}");
    let mut forged = bytes.clone();
    forged[shape_at..shape_at + 8].copy_from_slice(&39u64.to_le_bytes());
    let error = stream_error(decompress(&reseal(forged)));
    assert!(matches!(error, StreamError::Malformed { .. }), "{error:?}");

    // The stream still decodes after all that.
    let (codes, _) = decompress(&bytes).unwrap();
    assert_eq!(
        indices_to_host(codes).unwrap(),
        indices_to_host(rvq.encode(x)).unwrap()
    );
}

#[test]
fn compress_refuses_bad_indices_and_shapes() {
    let rvq = trained(2, vec![8, 4], 3, 1);
    let models = rvq.entropy_models().unwrap();
    let ok = vec![vec![0u32, 7], vec![3, 0]];
    assert!(models.compress(&ok, &[2, 3]).is_ok());
    let error = models
        .compress(&[vec![0, 8], vec![0, 0]], &[2, 3])
        .unwrap_err();
    assert!(
        matches!(
            error,
            RvqError::IndexOutOfRange {
                level: 0,
                max: 8,
                ..
            }
        ),
        "{error:?}"
    );
    let error = models
        .compress(&[vec![0, 1], vec![0]], &[2, 3])
        .unwrap_err();
    assert!(matches!(
        error,
        RvqError::IndicesLength {
            level: 1,
            expected: 2,
            got: 1
        }
    ));
    let error = models.compress(&ok, &[2, 4]).unwrap_err();
    assert!(
        matches!(error, RvqError::InputDim { expected: 3, .. }),
        "{error:?}"
    );
    let error = models.compress(&[], &[0, 3]).unwrap_err();
    assert!(matches!(error, RvqError::LevelCount { requested: 0, .. }));
    let three = vec![vec![0u32]; 3];
    let error = models.compress(&three, &[1, 3]).unwrap_err();
    assert!(matches!(
        error,
        RvqError::LevelCount {
            requested: 3,
            available: 2
        }
    ));
    let device = Device::flex();
    let error = rvq
        .try_compress(Tensor::<2>::zeros([2, 3], &device), 3)
        .unwrap_err();
    assert!(matches!(error, RvqError::LevelCount { .. }));
}

/// A masked forward's `-1` (a padded position) is no code: the public index conversion
/// refuses it by value, level and position instead of wrapping it to 4294967295, and the
/// real positions' codes convert.
#[test]
fn masked_codes_are_refused_by_the_index_conversion() {
    let device = Device::flex();
    let rvq = EmaResidualVectorQuantizerConfig::new(2, 8.into(), 3).init(&device);
    let x = Tensor::<3>::from_data(TensorData::new(clustered(8, 3, 5), [2, 4, 3]), &device);
    let real = [true, true, true, false, true, false, false, false];
    let mask = Tensor::<2, Bool>::from_data(TensorData::new(real.to_vec(), [2, 4]), &device);
    let out = rvq.forward_with(x.clone(), &ForwardOptions::new().with_mask(mask.clone()));
    let error = indices_to_host(out.indices.clone()).unwrap_err();
    assert!(
        matches!(
            error,
            RvqError::InvalidArgument {
                argument: "indices",
                ..
            }
        ),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains("-1 at level 0, position 3") && message.contains("try_encode_masked"),
        "{message}"
    );
    let kept: Vec<Vec<u32>> = out
        .indices
        .iter()
        .map(|level| {
            let codes: Vec<i64> = level.to_data().iter::<i64>().collect();
            codes
                .iter()
                .zip(real)
                .filter(|(_, r)| *r)
                .map(|(&c, _)| c as u32)
                .collect()
        })
        .collect();
    let masked = rvq.try_encode_masked(x, 2, mask).unwrap();
    assert_eq!(indices_to_host(masked).unwrap(), kept);
}
