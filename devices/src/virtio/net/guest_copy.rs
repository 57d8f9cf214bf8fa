//! Copies between guest memory and the IO thread's buffers on the
//! datapath. vm-memory's `read_slice`/`write_slice` walk an iterator of
//! region slices on every call; a packet's buffer nearly always lies in one
//! region, which `get_slice` reaches directly (the iterator was about half
//! of the IO thread's own time sending 64-byte frames). Ranges across
//! regions, or outside guest memory, take the general path, which decides.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Fills `dst` from guest memory at `addr`; false if it is not all there.
pub fn read(mem: &GuestMemoryMmap, addr: GuestAddress, dst: &mut [u8]) -> bool {
    match mem.get_slice(addr, dst.len()) {
        Ok(slice) => slice.copy_to(dst) == dst.len(),
        Err(_) => mem.read_slice(dst, addr).is_ok(),
    }
}

/// Writes `src` to guest memory at `addr`; false if it does not all fit.
pub fn write(mem: &GuestMemoryMmap, addr: GuestAddress, src: &[u8]) -> bool {
    match mem.get_slice(addr, src.len()) {
        Ok(slice) => {
            slice.copy_from(src);
            true
        }
        Err(_) => mem.write_slice(src, addr).is_ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two adjacent regions: inside one, across both, and past the end.
    #[test]
    fn copies_within_and_across_regions_and_refuses_outside() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
        ])
        .unwrap();
        let data: Vec<u8> = (0..64u8).collect();
        for at in [0x10u64, 0xfe0, 0x1fc0] {
            assert!(write(&mem, GuestAddress(at), &data), "write at {at:#x}");
            let mut back = [0u8; 64];
            assert!(read(&mem, GuestAddress(at), &mut back), "read at {at:#x}");
            assert_eq!(back[..], data[..]);
            let mut plain = [0u8; 64];
            mem.read_slice(&mut plain, GuestAddress(at)).unwrap();
            assert_eq!(plain[..], data[..]);
        }
        let mut back = [0u8; 64];
        assert!(!read(&mem, GuestAddress(0x1fe0), &mut back));
        assert!(!write(&mem, GuestAddress(0x1fe0), &data));
        assert!(!read(&mem, GuestAddress(0x5000), &mut back));
        assert!(!write(&mem, GuestAddress(0x5000), &data));
        assert!(read(&mem, GuestAddress(0x10), &mut []));
    }
}
