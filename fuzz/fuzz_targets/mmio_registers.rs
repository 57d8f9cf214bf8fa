//! virtio-mmio register reads and writes in any order, sizes and offsets
//! against the real transport and virtio-net device (real IO threads, an
//! in-memory backend, a small real guest memory).
//!
//! Invariants: identity and feature registers never change; narrow or
//! unaligned register accesses read zero; config space reads match the
//! device's MAC/status/pairs/MTU, the link state included (the input
//! takes the host link down and up); ConfigGeneration changes exactly with
//! the link (between config writes); the status only gains bits until a
//! reset, which brings it (and every queue's READY) back to zero;
//! FEATURES_OK is only ever shown for an acceptable feature set; QueueReady
//! is what the driver wrote while queue setup was allowed; reset and drop
//! end every IO thread and give every backend back.

#![no_main]

use std::time::Duration;

use devices::bus::BusDevice;
use devices::virtio::mmio::*;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use xskvm_fuzz::*;

const REGISTERS: [u64; 23] = [
    REG_MAGIC_VALUE,
    REG_VERSION,
    REG_DEVICE_ID,
    REG_VENDOR_ID,
    REG_DEVICE_FEATURES,
    REG_DEVICE_FEATURES_SEL,
    REG_DRIVER_FEATURES,
    REG_DRIVER_FEATURES_SEL,
    REG_QUEUE_SEL,
    REG_QUEUE_NUM_MAX,
    REG_QUEUE_NUM,
    REG_QUEUE_READY,
    REG_QUEUE_NOTIFY,
    REG_INTERRUPT_STATUS,
    REG_INTERRUPT_ACK,
    REG_STATUS,
    REG_QUEUE_DESC_LOW,
    REG_QUEUE_DESC_HIGH,
    REG_QUEUE_AVAIL_LOW,
    REG_QUEUE_AVAIL_HIGH,
    REG_QUEUE_USED_LOW,
    REG_QUEUE_USED_HIGH,
    REG_CONFIG_GENERATION,
];

const STATUS_STEPS: [u32; 6] = [
    0,
    STATUS_ACKNOWLEDGE,
    STATUS_ACKNOWLEDGE | STATUS_DRIVER,
    STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
    STATUS_FAILED,
];

/// What the fuzz thread knows the transport must show.
struct Model {
    pairs: usize,
    config: [u8; 12],
    device_features_sel: u32,
    queue_sel: u32,
    /// Driver features as the transport holds them.
    driver_features: u64,
    driver_features_sel: u32,
    /// Status bits seen since the last reset (the status only grows).
    status_seen: u32,
    /// Last config generation read, while no config write happened since.
    generation: Option<u32>,
    /// QueueReady of each queue.
    ready: Vec<bool>,
    link_up: bool,
}

impl Model {
    fn new(pairs: usize) -> Self {
        let mut config = [0u8; 12];
        config[..6].copy_from_slice(&MAC);
        config[6..8].copy_from_slice(&1u16.to_le_bytes()); // link up
        config[8..10].copy_from_slice(&(pairs as u16).to_le_bytes());
        config[10..12].copy_from_slice(&MTU.to_le_bytes());
        Self {
            pairs,
            config,
            device_features_sel: 0,
            queue_sel: 0,
            driver_features: 0,
            driver_features_sel: 0,
            status_seen: 0,
            generation: None,
            ready: vec![false; 2 * pairs + 1],
            link_up: true,
        }
    }

    fn reset(&mut self) {
        self.device_features_sel = 0;
        self.queue_sel = 0;
        self.driver_features = 0;
        self.driver_features_sel = 0;
        self.status_seen = 0;
        self.ready.iter_mut().for_each(|r| *r = false);
    }

    fn queue_max(&self, sel: u32) -> u32 {
        let sel = sel as usize;
        if sel < 2 * self.pairs {
            u32::from(QUEUE_MAX)
        } else if sel == 2 * self.pairs {
            u32::from(CTRL_QUEUE_MAX)
        } else {
            0
        }
    }
}

struct Fuzz {
    mem: vm_memory::GuestMemoryMmap,
    shadow: Shadow,
    transport: devices::virtio::MmioTransport,
    host: HostHandle,
    model: Model,
}

impl Fuzz {
    fn status(&mut self) -> u32 {
        let status = reg_read(&mut self.transport, REG_STATUS);
        self.check_status(status);
        status
    }

    fn check_status(&mut self, status: u32) {
        let bits = status & !STATUS_DEVICE_NEEDS_RESET;
        assert_eq!(
            bits & self.model.status_seen,
            self.model.status_seen,
            "status {status:#x} lost bits of {:#x} without a reset",
            self.model.status_seen
        );
        if bits & STATUS_FEATURES_OK != 0 && self.model.status_seen & STATUS_FEATURES_OK == 0 {
            let f = self.model.driver_features;
            assert!(
                f & !OFFERED == 0 && f & F_VERSION_1 != 0,
                "FEATURES_OK accepted driver features {f:#x}"
            );
        }
        self.model.status_seen = bits;
    }

    /// The transport after a register write the fuzz thread can model.
    fn note_write(&mut self, offset: u64, value: u32, status_before: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.model.device_features_sel = value,
            REG_QUEUE_SEL => self.model.queue_sel = value,
            REG_DRIVER_FEATURES_SEL => self.model.driver_features_sel = value,
            REG_DRIVER_FEATURES => {
                // Writable only between DRIVER and FEATURES_OK.
                let writable =
                    status_before & STATUS_DRIVER != 0 && status_before & STATUS_FEATURES_OK == 0;
                if writable {
                    let v = u64::from(value);
                    let f = &mut self.model.driver_features;
                    match self.model.driver_features_sel {
                        0 => *f = (*f & !0xffff_ffff) | v,
                        1 => *f = (*f & 0xffff_ffff) | (v << 32),
                        _ => {}
                    }
                }
            }
            REG_QUEUE_READY => {
                // Queue registers are written between FEATURES_OK and
                // DRIVER_OK only (the others are refused).
                let blocked = STATUS_DRIVER_OK | STATUS_FAILED | STATUS_DEVICE_NEEDS_RESET;
                let allowed =
                    status_before & STATUS_FEATURES_OK != 0 && status_before & blocked == 0;
                let sel = self.model.queue_sel as usize;
                if allowed && sel < self.model.ready.len() {
                    self.model.ready[sel] = value == 1;
                }
            }
            REG_STATUS if value == 0 => {
                self.model.reset();
                let status = reg_read(&mut self.transport, REG_STATUS);
                assert_eq!(status, 0, "status after reset");
                let ready = reg_read(&mut self.transport, REG_QUEUE_READY);
                assert_eq!(ready, 0, "queue 0 ready after reset");
            }
            _ => {}
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        let status_before = self.status();
        reg_write(&mut self.transport, offset, value);
        self.note_write(offset, value, status_before);
        self.status();
    }

    fn read(&mut self, offset: u64, len: usize) {
        let mut data = vec![0xa5u8; len];
        self.transport.read(offset, &mut data);
        if offset >= REG_CONFIG {
            for (i, &byte) in data.iter().enumerate() {
                let expected = usize::try_from(offset - REG_CONFIG)
                    .ok()
                    .and_then(|o| o.checked_add(i))
                    .and_then(|o| self.model.config.get(o))
                    .copied()
                    .unwrap_or(0);
                assert_eq!(byte, expected, "config byte {i} of a read at {offset:#x}");
            }
            return;
        }
        if len != 4 || offset % 4 != 0 {
            assert!(
                data.iter().all(|&b| b == 0),
                "{len}-byte read at {offset:#x}: {data:?}"
            );
            return;
        }
        let value = u32::from_le_bytes(data.try_into().unwrap());
        let m = &self.model;
        match offset {
            REG_MAGIC_VALUE => assert_eq!(value, 0x7472_6976),
            REG_VERSION => assert_eq!(value, 2),
            REG_DEVICE_ID => assert_eq!(value, 1),
            REG_DEVICE_FEATURES => {
                let expected = match m.device_features_sel {
                    0 => OFFERED as u32,
                    1 => (OFFERED >> 32) as u32,
                    _ => 0,
                };
                assert_eq!(value, expected, "device features");
            }
            REG_QUEUE_NUM_MAX => assert_eq!(value, m.queue_max(m.queue_sel), "QueueNumMax"),
            REG_QUEUE_READY => {
                let ready = m.ready.get(m.queue_sel as usize).copied().unwrap_or(false);
                assert_eq!(
                    value,
                    u32::from(ready),
                    "QueueReady of queue {}",
                    m.queue_sel
                );
            }
            REG_INTERRUPT_STATUS => assert_eq!(value & !3, 0, "interrupt status {value:#x}"),
            REG_STATUS => self.check_status(value),
            REG_CONFIG_GENERATION => {
                if let Some(generation) = self.model.generation {
                    assert_eq!(value, generation, "config generation changed by itself");
                }
                self.model.generation = Some(value);
            }
            // Write-only registers read as zero.
            REG_DEVICE_FEATURES_SEL
            | REG_DRIVER_FEATURES
            | REG_DRIVER_FEATURES_SEL
            | REG_QUEUE_SEL
            | REG_QUEUE_NUM
            | REG_QUEUE_NOTIFY
            | REG_INTERRUPT_ACK
            | REG_QUEUE_DESC_LOW..=REG_QUEUE_USED_HIGH => assert_eq!(value, 0, "{offset:#x}"),
            _ => {}
        }
    }

    /// A raw access of any size and alignment (registers or config space).
    fn write_raw(&mut self, offset: u64, data: &[u8]) {
        let status_before = self.status();
        self.transport.write(offset, data);
        if offset >= REG_CONFIG {
            self.model.generation = None;
        } else if data.len() == 4 && offset % 4 == 0 {
            let value = u32::from_le_bytes(data.try_into().unwrap());
            self.note_write(offset, value, status_before);
        }
        self.status();
    }
}

fn offset(u: &mut Unstructured) -> Result<u64> {
    Ok(match u.int_in_range(0..=7u8)? {
        0..=3 => *u.choose(&REGISTERS)?,
        4 => REG_CONFIG + u64::from(u.int_in_range(0..=16u8)?),
        5 => u64::from(u.int_in_range(0..=0x1ffu16)?),
        6 => *u.choose(&REGISTERS)? + u64::from(u.int_in_range(1..=3u8)?),
        _ => u.arbitrary()?,
    })
}

fn access_len(u: &mut Unstructured) -> Result<usize> {
    Ok(match u.int_in_range(0..=5u8)? {
        0..=2 => 4,
        3 => *u.choose(&[1usize, 2, 8])?,
        _ => u.int_in_range(0..=16usize)?,
    })
}

/// A queue address: mostly in guest RAM and aligned, sometimes not.
fn queue_addr(u: &mut Unstructured) -> Result<u64> {
    Ok(match u.int_in_range(0..=7u8)? {
        0..=5 => u64::from(u.int_in_range(0..=(MEM_END as u32 / 64))?) * 64,
        6 => u64::from(u.arbitrary::<u16>()?),
        _ => u.arbitrary()?,
    })
}

fn op(f: &mut Fuzz, u: &mut Unstructured) -> Result<()> {
    match u.int_in_range(0..=12u8)? {
        0 | 1 => {
            let (offset, len) = (offset(u)?, access_len(u)?);
            f.read(offset, len);
        }
        2 => {
            let (offset, len) = (offset(u)?, access_len(u)?);
            let data = u.bytes(len)?.to_vec();
            f.write_raw(offset, &data);
        }
        3 | 4 => {
            let status = if u.ratio(7, 8)? {
                *u.choose(&STATUS_STEPS)?
            } else {
                u.arbitrary()?
            };
            f.write_reg(REG_STATUS, status);
        }
        5 => {
            let sel = u.int_in_range(0..=2u32)?;
            let features: u64 = if u.ratio(3, 4)? {
                (u.arbitrary::<u64>()? & OFFERED) | F_VERSION_1
            } else {
                u.arbitrary()?
            };
            f.write_reg(REG_DRIVER_FEATURES_SEL, sel);
            let value = if sel == 1 {
                (features >> 32) as u32
            } else {
                features as u32
            };
            f.write_reg(REG_DRIVER_FEATURES, value);
        }
        6 | 7 => {
            // Queue setup, as a driver does it between FEATURES_OK and DRIVER_OK.
            let queue = u.int_in_range(0..=(2 * f.model.pairs as u32 + 1))?;
            let size = if u.ratio(7, 8)? {
                1u32 << u.int_in_range(0..=8u32)?
            } else {
                u.arbitrary::<u16>()?.into()
            };
            f.write_reg(REG_QUEUE_SEL, queue);
            f.write_reg(REG_QUEUE_NUM, size);
            for low in [REG_QUEUE_DESC_LOW, REG_QUEUE_AVAIL_LOW, REG_QUEUE_USED_LOW] {
                let addr = queue_addr(u)?;
                f.write_reg(low, addr as u32);
                f.write_reg(low + 4, (addr >> 32) as u32);
            }
            let ready = if u.ratio(7, 8)? { 1 } else { u.arbitrary()? };
            f.write_reg(REG_QUEUE_READY, ready);
        }
        8 => {
            let queue = if u.ratio(7, 8)? {
                u.int_in_range(0..=(2 * f.model.pairs as u32))?
            } else {
                u.arbitrary()?
            };
            f.write_reg(REG_QUEUE_NOTIFY, queue);
        }
        9 => {
            let pair = u.int_in_range(0..=f.model.pairs - 1)?;
            let len = u.int_in_range(0..=1600usize)?;
            f.host.inject(pair, vec![0x5a; len]);
        }
        10 => {
            let addr = u64::from(u.int_in_range(0..=(MEM_END as u32))?);
            let len = u.int_in_range(0..=32usize)?;
            let data = u.bytes(len)?.to_vec();
            f.shadow.write(&f.mem, addr, &data);
        }
        12 => {
            // The host NIC goes away or comes back (the VMM's NIC watcher).
            let up = u.arbitrary()?;
            let changed = f.host.link.as_ref().unwrap().set_up(up);
            assert_eq!(changed, up != f.model.link_up, "link change reported");
            f.model.link_up = up;
            f.model.config[6..8].copy_from_slice(&u16::from(up).to_le_bytes());
            if changed {
                if let Some(generation) = &mut f.model.generation {
                    *generation = generation.wrapping_add(1);
                }
            }
        }
        _ => {
            let status = reg_read(&mut f.transport, REG_INTERRUPT_STATUS);
            f.write_reg(REG_INTERRUPT_ACK, status);
            if u.ratio(1, 4)? {
                settle(Duration::from_millis(2));
            }
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let pairs = usize::from(u.int_in_range(1..=3u8).unwrap_or(1));
    let room = u.int_in_range(0..=15u8).unwrap_or(7);
    let (tx_room, gather) = (usize::from(room % 8) + 1, room >= 8);
    let mem = guest_memory();
    let (transport, host, _irq) = device(pairs, tx_room, gather, &mem);
    let mut f = Fuzz {
        mem,
        shadow: Shadow::new(),
        transport,
        host,
        model: Model::new(pairs),
    };
    for _ in 0..256 {
        if u.is_empty() || op(&mut f, &mut u).is_err() {
            break;
        }
    }
    // The end of every driver: reset, then the VMM drops the device.
    f.write_reg(REG_STATUS, 0);
    assert_eq!(reg_read(&mut f.transport, REG_STATUS), 0);
    if let Some(v) = f.host.violation() {
        panic!("device thread: {v}");
    }
    let Fuzz {
        transport, host, ..
    } = f;
    drop(transport);
    assert_eq!(
        host.live.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "backends not given back and dropped"
    );
    assert_no_workers("after drop");
});
