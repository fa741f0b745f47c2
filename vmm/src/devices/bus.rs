//! Address spaces (port I/O, MMIO) mapping ranges to devices.

use std::sync::{Arc, Mutex};

/// A device reached through a bus; `offset` is relative to its range.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error)]
#[error("bus range {base:#x}+{len:#x} overlaps another device")]
pub struct Overlap {
    pub base: u64,
    pub len: u64,
}

struct Range {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Sorted, non-overlapping ranges. Built before the vCPUs start, then only read.
#[derive(Default)]
pub struct Bus {
    ranges: Vec<Range>,
}

impl Bus {
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), Overlap> {
        if len == 0
            || self
                .ranges
                .iter()
                .any(|r| base < r.base + r.len && r.base < base + len)
        {
            return Err(Overlap { base, len });
        }
        self.ranges.push(Range { base, len, device });
        self.ranges.sort_by_key(|r| r.base);
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(&Range, u64)> {
        let index = self
            .ranges
            .partition_point(|r| r.base <= addr)
            .checked_sub(1)?;
        let range = &self.ranges[index];
        (addr < range.base + range.len).then(|| (range, addr - range.base))
    }

    /// Returns false when no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some((range, offset)) = self.find(addr) else {
            return false;
        };
        range
            .device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .read(offset, data);
        true
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        let Some((range, offset)) = self.find(addr) else {
            return false;
        };
        range
            .device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write(offset, data);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder(Vec<(u64, u8)>);
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data[0]));
        }
    }

    #[test]
    fn routes_by_range_with_relative_offsets() {
        let mut bus = Bus::default();
        let a = Arc::new(Mutex::new(Recorder(Vec::new())));
        bus.insert(0x3f8, 8, a.clone()).unwrap();
        bus.insert(0x60, 1, Arc::new(Mutex::new(Recorder(Vec::new()))))
            .unwrap();
        assert!(bus.insert(0x3fc, 8, a.clone()).is_err());
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fd, &mut data));
        assert_eq!(data[0], 5);
        assert!(bus.write(0x3f8, &[9]));
        assert_eq!(a.lock().unwrap().0, vec![(0, 9)]);
        assert!(!bus.read(0x400, &mut data));
        assert!(!bus.read(0x10, &mut data));
        assert!(!bus.write(0x61, &[0]));
    }
}
