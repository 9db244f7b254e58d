//! Map memory: an mmap-able array map's values, mapped into the daemon. Written with
//! atomic stores (a map update is a `memcpy`, which a packet could read half done) and
//! scanned without a system call per entry.

use std::os::fd::{AsFd as _, AsRawFd as _};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context as _, Result, anyhow};
use aya::{Ebpf, maps::Map};

/// The values of one array map, mapped shared (read and write).
pub struct MapMemory {
    ptr: *mut u8,
    len: usize,
    value_size: usize,
    entries: usize,
}

impl MapMemory {
    /// Map the values of the mmap-able array map `name`.
    pub fn new(ebpf: &Ebpf, name: &str) -> Result<MapMemory> {
        let Some(Map::Array(m)) = ebpf.map(name) else {
            return Err(anyhow!("map {name} missing (or not an array)"));
        };
        let info = m.info().with_context(|| format!("reading map {name}"))?;
        // An array's values are 8-aligned and start at offset 0 of its memory.
        let value_size = (info.value_size() as usize).next_multiple_of(8);
        let entries = info.max_entries() as usize;
        let len = (value_size * entries).next_multiple_of(4096);
        let fd = m.fd().as_fd().as_raw_fd();
        // SAFETY: a fresh shared mapping of the map's value area, unmapped on drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("mapping {name} (a map made by an older build?)"));
        }
        Ok(MapMemory {
            ptr: ptr.cast(),
            len,
            value_size,
            entries,
        })
    }

    /// Number of values.
    pub fn entries(&self) -> usize {
        self.entries
    }

    /// A copy of value `i` (read while the program may write it: fields are each
    /// whole, the value as a whole may mix two moments).
    pub fn read<T: aya::Pod>(&self, i: usize) -> Option<T> {
        if i >= self.entries || size_of::<T>() > self.value_size {
            return None;
        }
        // SAFETY: inside the mapping (checked above), 8-aligned; `T` is plain data.
        Some(unsafe {
            self.ptr
                .add(i * self.value_size)
                .cast::<T>()
                .read_volatile()
        })
    }

    /// The 64-bit word at byte `offset` of value `i`, for atomic access.
    pub fn word(&self, i: usize, offset: usize) -> Option<&AtomicU64> {
        if i >= self.entries || !offset.is_multiple_of(8) || offset + 8 > self.value_size {
            return None;
        }
        // SAFETY: inside the mapping, 8-aligned, shared with the program, which
        // accesses it whole or atomically; it lives as long as `self`.
        Some(unsafe {
            &*self
                .ptr
                .add(i * self.value_size + offset)
                .cast::<AtomicU64>()
        })
    }

    /// Store `v` in the word at `offset` of value `i`.
    pub fn store(&self, i: usize, offset: usize, v: u64) -> Result<()> {
        self.word(i, offset)
            .ok_or_else(|| anyhow!("no word at {i}:{offset}"))?
            .store(v, Ordering::Release);
        Ok(())
    }
}

impl Drop for MapMemory {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, no longer referenced (borrows of it end
        // with `self`).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}
