//! The crate's fixed hashes. SplitMix64 (Steele, Lea and Flood 2014) is behind every "random"
//! choice the quantizer makes itself (k-means seeds, quantizer dropout depth): deterministic
//! from its seed, so a choice is reproducible and the same on every device, and independent of
//! the device random generator the rest of a model shares. FNV-1a checks compressed streams.

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
