//! The fuzzer's bytes read as a stream of typed values. Past the end every
//! value reads as zero and every byte string as empty, so a harness never
//! fails for want of input: it just runs out of things to do.

/// A cursor over the fuzzer's input.
pub struct Input<'a> {
    bytes: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    /// Whether every byte was read.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Up to `max` next bytes (fewer when the input ends first).
    pub fn bytes(&mut self, max: usize) -> &'a [u8] {
        let (taken, rest) = self.bytes.split_at(max.min(self.bytes.len()));
        self.bytes = rest;
        taken
    }

    /// The next `N` bytes, zero-padded past the end.
    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0; N];
        let taken = self.bytes(N);
        out[..taken.len()].copy_from_slice(taken);
        out
    }

    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    pub fn bool(&mut self) -> bool {
        self.u8() & 1 != 0
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// One of `choices`, picked by the next byte.
    pub fn pick<T: Copy>(&mut self, choices: &[T]) -> T {
        choices[self.u8() as usize % choices.len()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_little_endian_values_then_zeros() {
        let mut input = Input::new(&[1, 2, 3, 4, 5]);
        assert_eq!(input.u16(), 0x0201);
        assert_eq!(input.u32(), 0x0005_0403);
        assert!(input.is_empty());
        assert_eq!(input.u64(), 0);
        assert!(input.bytes(10).is_empty());
    }
}
