//! The four AF_XDP rings, mapped from the socket and driven directly.
//!
//! Each ring is a single-producer single-consumer queue shared with the
//! kernel: a power-of-two array of entries plus free-running `u32`
//! producer and consumer indices. The side that writes entries publishes
//! them with a release store of its index; the other side reads that index
//! with an acquire load before touching the entries (and the same in the
//! other direction for slots being handed back). The kernel does the
//! matching `smp_load_acquire` / `smp_store_release` in `xsk_queue.h`.
//!
//! Indices are cached locally so that the shared cache lines are read only
//! when the cached view says there is not enough room or data.

use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU32, Ordering};

/// One `mmap`ed ring region; unmapped on drop.
#[derive(Debug)]
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe a mapping this struct created and owns;
        // the ring pointers into it die with the Ring that owns this.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// Where a ring's fields live inside its mapping (from `XDP_MMAP_OFFSETS`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RingOffsets {
    pub producer: u64,
    pub consumer: u64,
    pub desc: u64,
    pub flags: u64,
}

impl From<libc::xdp_ring_offset> for RingOffsets {
    fn from(o: libc::xdp_ring_offset) -> Self {
        RingOffsets {
            producer: o.producer,
            consumer: o.consumer,
            desc: o.desc,
            flags: o.flags,
        }
    }
}

/// A mapped ring of `T` entries (`u64` addresses for fill/completion,
/// `xdp_desc` for rx/tx). Which side we play (producer or consumer) is
/// fixed per ring; the methods for the other side are simply not called.
#[derive(Debug)]
pub(crate) struct Ring<T: Copy> {
    producer: NonNull<AtomicU32>,
    consumer: NonNull<AtomicU32>,
    flags: NonNull<AtomicU32>,
    entries: NonNull<T>,
    size: u32,
    mask: u32,
    /// Our view of the producer index (authoritative when we produce).
    cached_prod: u32,
    /// Our view of the consumer index (authoritative when we consume).
    cached_cons: u32,
    _map: Mapping,
    _entries: PhantomData<T>,
}

// SAFETY: the ring only holds pointers into its own mapping, which lives as
// long as the Ring; the kernel side synchronises through the atomic
// indices. Moving it to another thread is fine (it is not Sync: one thread
// drives a ring at a time, as the SPSC protocol requires).
unsafe impl<T: Copy> Send for Ring<T> {}

impl<T: Copy> Ring<T> {
    /// Maps the ring at `pgoff` of the socket `fd` with `size` entries.
    pub(crate) fn map(
        fd: BorrowedFd<'_>,
        pgoff: u64,
        size: u32,
        off: RingOffsets,
    ) -> io::Result<Self> {
        debug_assert!(size.is_power_of_two());
        let len = off.desc as usize + size as usize * std::mem::size_of::<T>();
        // SAFETY: a fresh shared mapping of the socket's ring; the kernel
        // checks the offset and length against the ring it allocated.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                pgoff as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave NULL"))?;
        let map = Mapping { ptr: base, len };
        let at = |o: u64| -> NonNull<u8> {
            // SAFETY: the kernel's offsets lie inside the ring it mapped.
            unsafe { base.add(o as usize) }
        };
        let producer = at(off.producer).cast::<AtomicU32>();
        let consumer = at(off.consumer).cast::<AtomicU32>();
        let flags = at(off.flags).cast::<AtomicU32>();
        let entries = at(off.desc).cast::<T>();
        let mut ring = Ring {
            producer,
            consumer,
            flags,
            entries,
            size,
            mask: size - 1,
            cached_prod: 0,
            cached_cons: 0,
            _map: map,
            _entries: PhantomData,
        };
        ring.cached_prod = ring.producer().load(Ordering::Acquire);
        ring.cached_cons = ring.consumer().load(Ordering::Acquire);
        Ok(ring)
    }

    fn producer(&self) -> &AtomicU32 {
        // SAFETY: points into our live mapping, 4-byte aligned by the kernel.
        unsafe { self.producer.as_ref() }
    }

    fn consumer(&self) -> &AtomicU32 {
        // SAFETY: as for `producer`.
        unsafe { self.consumer.as_ref() }
    }

    pub(crate) fn size(&self) -> u32 {
        self.size
    }

    /// The kernel asks to be woken (`XDP_RING_NEED_WAKEUP`). The full fence
    /// orders our preceding index store before this load, against the
    /// kernel's "set flag, then re-check ring" sequence; without it both
    /// sides could miss each other and frames would sit in the ring.
    pub(crate) fn needs_wakeup(&self) -> bool {
        fence(Ordering::SeqCst);
        // SAFETY: points into our live mapping.
        let flags = unsafe { self.flags.as_ref() };
        flags.load(Ordering::Relaxed) & libc::XDP_RING_NEED_WAKEUP != 0
    }

    // ---- producer side (fill, tx) ----

    /// Free slots, refreshing the consumer index only when the cached view
    /// has fewer than `want`.
    pub(crate) fn prod_free(&mut self, want: u32) -> u32 {
        let free = self.size - self.cached_prod.wrapping_sub(self.cached_cons);
        if free >= want {
            return free;
        }
        // Acquire: the kernel has finished reading the slots it released.
        self.cached_cons = self.consumer().load(Ordering::Acquire);
        self.size - self.cached_prod.wrapping_sub(self.cached_cons)
    }

    /// Writes entry `i` (0-based) past the producer index. The caller has
    /// checked `i < prod_free()`.
    pub(crate) fn prod_write(&mut self, i: u32, value: T) {
        let slot = self.cached_prod.wrapping_add(i) & self.mask;
        // SAFETY: slot < size, inside the mapped entry array; the slot is
        // free (the caller checked prod_free), so the kernel is not reading it.
        unsafe {
            self.entries
                .as_ptr()
                .add(slot as usize)
                .write_volatile(value)
        }
    }

    /// Publishes `n` written entries.
    pub(crate) fn prod_submit(&mut self, n: u32) {
        if n == 0 {
            return;
        }
        self.cached_prod = self.cached_prod.wrapping_add(n);
        // Release: the entries written above become visible first.
        self.producer().store(self.cached_prod, Ordering::Release);
    }

    /// Entries produced by us and not yet consumed by the kernel (fresh
    /// read of the consumer index).
    pub(crate) fn prod_outstanding(&mut self) -> u32 {
        self.cached_cons = self.consumer().load(Ordering::Acquire);
        self.cached_prod.wrapping_sub(self.cached_cons)
    }

    /// Entry `i` (0-based) of those we produced and the kernel has not
    /// consumed, counting from the consumer index `prod_outstanding` read
    /// last.
    pub(crate) fn prod_read_unconsumed(&self, i: u32) -> T {
        let slot = self.cached_cons.wrapping_add(i) & self.mask;
        // SAFETY: slot < size, inside the mapped entry array. Reading a
        // slot races at most with the kernel's own reads of it.
        unsafe { self.entries.as_ptr().add(slot as usize).read_volatile() }
    }

    /// Rewrites entry `i` of those we produced and the kernel has not
    /// consumed (as in [`Ring::prod_read_unconsumed`]).
    ///
    /// # Safety
    /// The kernel must not be consuming the ring meanwhile: in copy mode it
    /// reads the tx ring only inside the owner's own `sendto`/`poll` calls;
    /// a zero-copy driver reads it at any time.
    pub(crate) unsafe fn prod_rewrite_unconsumed(&mut self, i: u32, value: T) {
        let slot = self.cached_cons.wrapping_add(i) & self.mask;
        // SAFETY: slot < size, inside the mapped entry array; the caller
        // guarantees the kernel is not reading it now.
        unsafe {
            self.entries
                .as_ptr()
                .add(slot as usize)
                .write_volatile(value)
        }
    }

    // ---- consumer side (rx, completion) ----

    /// Entries ready to read, up to `want`, refreshing the producer index
    /// only when the cached view has fewer than `want`.
    pub(crate) fn cons_available(&mut self, want: u32) -> u32 {
        let mut avail = self.cached_prod.wrapping_sub(self.cached_cons);
        if avail < want {
            // Acquire: the entries the kernel published are visible after this.
            self.cached_prod = self.producer().load(Ordering::Acquire);
            avail = self.cached_prod.wrapping_sub(self.cached_cons);
        }
        avail.min(want)
    }

    /// Reads entry `i` (0-based) past the consumer index; `i` is below
    /// what `cons_available` returned.
    pub(crate) fn cons_read(&self, i: u32) -> T {
        let slot = self.cached_cons.wrapping_add(i) & self.mask;
        // SAFETY: slot < size; the kernel published this entry (acquire
        // load in cons_available) and will not rewrite it until released.
        unsafe { self.entries.as_ptr().add(slot as usize).read_volatile() }
    }

    /// Hands `n` read entries back to the kernel.
    pub(crate) fn cons_release(&mut self, n: u32) {
        if n == 0 {
            return;
        }
        self.cached_cons = self.cached_cons.wrapping_add(n);
        // Release: our reads of those entries happen before the kernel reuses them.
        self.consumer().store(self.cached_cons, Ordering::Release);
    }

    /// True when the kernel has published entries we have not consumed
    /// (fresh read; no side effects on what `cons_available` returns later).
    pub(crate) fn cons_has_entries(&self) -> bool {
        self.producer().load(Ordering::Acquire) != self.cached_cons
    }
}
