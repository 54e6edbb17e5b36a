//! Small helpers every part of the crate shares: the fixed hashes, and moving tensors to and
//! from host memory.
//!
//! SplitMix64 (Steele, Lea and Flood 2014) is behind every "random" choice the quantizer makes
//! itself (k-means seeds, quantizer dropout depth, split offsets): deterministic from its seed,
//! so a choice is reproducible and the same on every device, and independent of the device
//! random generator the rest of a model shares. FNV-1a checks compressed streams.

use burn::tensor::{Device, Int, Tensor, TensorData};

/// A SplitMix64 stream.
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    /// The stream for `seed`.
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// FNV-1a, 64 bits: the checksum of compressed streams and the fingerprint of their
/// probability tables. Each step (xor a byte, multiply by an odd prime) is a bijection of the
/// state, so any change confined to one byte always changes the result.
pub(crate) fn fnv1a64(bytes: impl IntoIterator<Item = u8>) -> u64 {
    fnv1a64_continue(0xCBF2_9CE4_8422_2325, bytes)
}

/// FNV-1a over `bytes` from the state `hash` an earlier call returned: hashing `a` then
/// continuing with `b` equals hashing `a` followed by `b`.
pub(crate) fn fnv1a64_continue(hash: u64, bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(hash, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// The values of a float tensor, row-major, on the host, as f32 whatever its float dtype
/// (converted in bulk). Takes an f32 tensor's buffer without a copy where the tensor holds it
/// alone.
pub(crate) fn host_floats<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
    match tensor.into_data().try_into_vec_as::<f32>() {
        Ok(values) => values,
        Err(error) => unreachable!("every float dtype converts to f32: {error:?}"),
    }
}

/// The values of an integer tensor on the host, as i64 whatever its integer dtype (converted
/// in bulk: an element-by-element iterator is several times slower on large batches).
pub(crate) fn host_ints(tensor: Tensor<1, Int>) -> Vec<i64> {
    match tensor.into_data().try_into_vec_as::<i64>() {
        Ok(values) => values,
        Err(error) => unreachable!("every integer dtype converts to i64: {error:?}"),
    }
}

/// Rows of `d` values, row-major, as a `[N, d]` tensor on `device`.
pub(crate) fn float_tensor(values: Vec<f32>, d: usize, device: &Device) -> Tensor<2> {
    let n = values.len() / d.max(1);
    Tensor::from_data(TensorData::new(values, [n, d]), device)
}

/// Integers as a `[N]` tensor on `device`.
pub(crate) fn int_tensor(values: Vec<i64>, device: &Device) -> Tensor<1, Int> {
    let len = values.len();
    Tensor::from_data(TensorData::new(values, [len]), device)
}

/// Each row of `rows` `[N, D]` over its L2 norm, norms below 1e-6 taken as 1e-6 (PyTorch's
/// `F.normalize(eps=1e-6)`, vector-quantize-pytorch's `l2norm`): the cosine codebooks'
/// normalization, of inputs and codes alike.
pub(crate) fn unit_rows(rows: Tensor<2>) -> Tensor<2> {
    let norms = rows
        .clone()
        .powi_scalar(2)
        .sum_dim(1)
        .sqrt()
        .clamp_min(1e-6); // [N, 1]
    rows.div(norms)
}
