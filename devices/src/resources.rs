//! Hands out guest MMIO windows and interrupt lines to devices.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResourceError {
    #[error("no MMIO space left for another device (window {base:#x}..{end:#x})")]
    MmioExhausted { base: u64, end: u64 },
    #[error("no interrupt line left for another device (last is {last})")]
    IrqExhausted { last: u32 },
}

/// One device's share of the platform: a register window and an interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    pub base: u64,
    pub len: u64,
    pub irq: u32,
}

/// Allocates fixed-size MMIO slots from a window and GSIs from a range.
///
/// Allocation only moves forward: devices live as long as the VM, so there
/// is nothing to free.
#[derive(Debug)]
pub struct ResourceAllocator {
    next_addr: u64,
    end: u64,
    slot_len: u64,
    next_irq: u32,
    last_irq: u32,
}

impl ResourceAllocator {
    /// `window` is `[base, end)`; IRQs are handed out from `irqs` inclusive.
    pub fn new(window: (u64, u64), slot_len: u64, irqs: (u32, u32)) -> Self {
        Self {
            next_addr: window.0,
            end: window.1,
            slot_len,
            next_irq: irqs.0,
            last_irq: irqs.1,
        }
    }

    pub fn allocate(&mut self) -> Result<MmioSlot, ResourceError> {
        let slot_end = self
            .next_addr
            .checked_add(self.slot_len)
            .filter(|&e| e <= self.end)
            .ok_or(ResourceError::MmioExhausted {
                base: self.next_addr,
                end: self.end,
            })?;
        if self.next_irq > self.last_irq {
            return Err(ResourceError::IrqExhausted {
                last: self.last_irq,
            });
        }
        let slot = MmioSlot {
            base: self.next_addr,
            len: self.slot_len,
            irq: self.next_irq,
        };
        self.next_addr = slot_end;
        self.next_irq += 1;
        Ok(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_out_distinct_slots_until_exhausted() {
        let mut alloc = ResourceAllocator::new((0x1000, 0x3000), 0x1000, (5, 9));
        assert_eq!(
            alloc.allocate(),
            Ok(MmioSlot {
                base: 0x1000,
                len: 0x1000,
                irq: 5
            })
        );
        assert_eq!(
            alloc.allocate(),
            Ok(MmioSlot {
                base: 0x2000,
                len: 0x1000,
                irq: 6
            })
        );
        assert!(matches!(
            alloc.allocate(),
            Err(ResourceError::MmioExhausted { .. })
        ));
    }

    #[test]
    fn runs_out_of_irqs() {
        let mut alloc = ResourceAllocator::new((0, 0x10_0000), 0x1000, (5, 5));
        assert_eq!(alloc.allocate().map(|s| s.irq), Ok(5));
        assert_eq!(
            alloc.allocate(),
            Err(ResourceError::IrqExhausted { last: 5 })
        );
    }
}
