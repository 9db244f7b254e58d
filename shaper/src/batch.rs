//! Typed batch access to maps ([`crate::bpfsys`]'s `BPF_MAP_*_BATCH`): many entries a
//! system call, where aya makes one or two per entry. A policy of a million rules
//! writes millions of entries; one at a time, that took ten seconds.

use std::{io, os::fd::BorrowedFd};

use aya::Pod;

use crate::bpfsys::{self, Position};

/// The bytes of `v`. For the map types of `shaper_common::maps`, which are `repr(C)`
/// with their padding spelled out as fields, and for integers, byte arrays and aya's
/// packed trie keys: every byte is initialized.
fn bytes<T: Pod>(v: &[T]) -> &[u8] {
    // SAFETY: `v` is `size_of_val(v)` readable bytes, all initialized (above).
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), size_of_val(v)) }
}

/// `b` read as values of `T`, back to back.
fn from_bytes<T: Pod>(b: &[u8]) -> Vec<T> {
    b.chunks_exact(size_of::<T>())
        // SAFETY: each chunk is `size_of::<T>()` bytes; any bytes are a valid `T`
        // (`Pod`); read unaligned from the buffer.
        .map(|c| unsafe { std::ptr::read_unaligned(c.as_ptr().cast::<T>()) })
        .collect()
}

/// Write `values` under `keys`: one value per key, or for a per-CPU map one per
/// possible CPU per key, in CPU order.
pub fn write<K: Pod, V: Pod>(map: BorrowedFd<'_>, keys: &[K], values: &[V]) -> io::Result<()> {
    bpfsys::update_batch(map, bytes(keys), bytes(values), keys.len())
}

/// Delete `keys` (each must be there).
pub fn delete<K: Pod>(map: BorrowedFd<'_>, keys: &[K]) -> io::Result<()> {
    bpfsys::delete_batch(map, bytes(keys), keys.len())
}

/// Every entry of an array or a trie (for a per-CPU map, `V` is one CPU's value and
/// there are as many per key as possible CPUs).
pub fn read<K: Pod, V: Pod>(map: BorrowedFd<'_>, per_key: usize) -> io::Result<(Vec<K>, Vec<V>)> {
    let (k, v) = bpfsys::map_entries(map, size_of::<K>(), size_of::<V>() * per_key, Position::Key)?;
    Ok((from_bytes(&k), from_bytes(&v)))
}

/// Every entry of a hash map.
pub fn read_hash<K: Pod, V: Pod>(map: BorrowedFd<'_>) -> io::Result<(Vec<K>, Vec<V>)> {
    let (k, v) = bpfsys::hash_map_entries(map, size_of::<K>(), size_of::<V>())?;
    Ok((from_bytes(&k), from_bytes(&v)))
}
