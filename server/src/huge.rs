//! [`HugePages`]: preload memory that forks fast.
//!
//! `fork()` copies the page tables of every mapped page, so its cost grows
//! with the preload (BENCHMARKS.md measures a 512 MB fork both ways).
//! Backed by 2 MiB transparent huge pages, the same memory needs a 512th of
//! the page-table entries. The trade: memory is committed in 2 MiB
//! steps, and a copy-on-write fault after the fork copies 2 MiB instead of
//! 4 KiB — fine for read-only tables, costly for state workers write to.
//!
//! # Platform facts
//! With `/sys/kernel/mm/transparent_hugepage/enabled` at `madvise` (Debian's
//! default) huge pages are used only where `madvise(MADV_HUGEPAGE)` asks;
//! with `never` this type still works, with ordinary pages. See madvise(2).

use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::{io, slice};

use crate::sys;

/// The size of an x86-64 (and arm64 4K-granule) transparent huge page.
const HUGE_PAGE: usize = 2 << 20;

/// A zero-initialised byte buffer in anonymous memory advised
/// `MADV_HUGEPAGE` and aligned to 2 MiB, for large read-mostly preloads.
///
/// ```
/// use forkserver_server::HugePages;
///
/// let mut table = HugePages::zeroed(8 << 20).unwrap();
/// table[..4].copy_from_slice(b"warm");
/// assert_eq!(&table[..4], b"warm");
/// ```
pub struct HugePages {
    ptr: NonNull<u8>,
    len: usize,
    /// The whole mapping, alignment slack included.
    mapping: (*mut libc::c_void, usize),
}

impl HugePages {
    /// Maps `len` zeroed bytes. Pages are committed as they are first written.
    pub fn zeroed(len: usize) -> io::Result<HugePages> {
        // Over-map by one huge page so a 2 MiB-aligned start fits inside.
        let map_len = len
            .checked_add(HUGE_PAGE)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "length overflows"))?;
        let base = sys::map_anonymous(map_len)?;
        let offset = (HUGE_PAGE - base as usize % HUGE_PAGE) % HUGE_PAGE;
        // SAFETY: offset < HUGE_PAGE, so start..start+len lies in the mapping.
        let start = unsafe { base.cast::<u8>().add(offset) };
        // SAFETY: start..start+len lies in our fresh mapping. Failure (THP
        // compiled out) leaves ordinary pages, which is still correct.
        unsafe { sys::advise(start.cast(), len, libc::MADV_HUGEPAGE) };
        Ok(HugePages {
            ptr: NonNull::new(start).expect("mmap never returns null on success"),
            len,
            mapping: (base, map_len),
        })
    }
}

// SAFETY: HugePages owns its mapping exclusively, like a Vec<u8>: sending it
// to another thread moves that ownership, and &HugePages only reads.
unsafe impl Send for HugePages {}
// SAFETY: as above; shared references only give &[u8].
unsafe impl Sync for HugePages {}

impl Deref for HugePages {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len is mapped readable for our lifetime and only
        // reachable through self.
        unsafe { slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for HugePages {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self makes the access exclusive.
        unsafe { slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping we made, once; the borrows
        // of it have ended with self's.
        unsafe { sys::unmap(self.mapping.0, self.mapping.1) };
    }
}

impl std::fmt::Debug for HugePages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HugePages").field("len", &self.len).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_aligned_zeroed_and_backed_by_huge_pages_when_the_kernel_allows() {
        let mut pages = HugePages::zeroed(8 << 20).unwrap();
        assert_eq!(pages.as_ptr() as usize % HUGE_PAGE, 0);
        assert!(pages.iter().all(|&b| b == 0));
        pages.fill(7);
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        if thp.contains("[never]") {
            return; // ordinary pages by the operator's choice; nothing to see
        }
        let smaps = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap();
        let anon_huge_kb: u64 = smaps
            .lines()
            .find_map(|l| l.strip_prefix("AnonHugePages:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap();
        assert!(anon_huge_kb >= 4096, "only {anon_huge_kb} kB in huge pages");
    }
}
