//! Memory and code: mappings, advice, resident size, the dynamic loader.

use std::ffi::{c_void, CStr};
use std::io;
use std::ptr;

/// Hands free heap memory back to the system: glibc keeps freed blocks
/// below its mmap threshold (128 KiB and up, adjusted at run time) for
/// reuse, so a burst of queued replies would stay resident after it was
/// sent or dropped; `malloc_trim(0)` releases the free pages. Other C
/// libraries (musl's mallocng) give pages back as they free them, and need
/// nothing here.
pub(crate) fn give_back_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The resident set size of process `pid` (this one if None), from
/// /proc/PID/statm.
pub(crate) fn resident_bytes(pid: Option<libc::pid_t>) -> Option<u64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/statm"),
        None => "/proc/self/statm".to_owned(),
    };
    let statm = std::fs::read_to_string(path).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page_size.max(0) as u64)
}

/// An anonymous private read-write mapping of `len` bytes.
pub(crate) fn map_anonymous(len: usize) -> io::Result<*mut c_void> {
    // SAFETY: an anonymous private mapping at an address of the kernel's
    // choosing touches no existing memory.
    let base = unsafe {
        libc::mmap(
            ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(base)
}

/// madvise(2) on a range of a mapping this process made. Advice changes
/// no contents, so a failure only leaves the pages as they were.
///
/// # Safety
/// `start..start + len` must lie in a mapping of this process.
pub(crate) unsafe fn advise(start: *mut c_void, len: usize, advice: libc::c_int) {
    // SAFETY: the caller guarantees the range is ours.
    unsafe { libc::madvise(start, len, advice) };
}

/// munmap(2).
///
/// # Safety
/// `base..base + len` must be a whole mapping of this process that nothing
/// refers to any more.
pub(crate) unsafe fn unmap(base: *mut c_void, len: usize) {
    // SAFETY: the caller guarantees the mapping is ours and unused.
    unsafe { libc::munmap(base, len) };
}

/// `dlopen(path, RTLD_NOW | RTLD_LOCAL)`; Err carries dlerror's text.
///
/// # Safety
/// Loading a library runs its constructors: the caller vouches for it.
pub(crate) unsafe fn dlopen(path: &CStr) -> Result<*mut c_void, String> {
    // SAFETY: path is NUL-terminated; the caller vouches for the library.
    let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() {
        return Err(dl_error());
    }
    Ok(handle)
}

/// dlsym(3): the address of `name` in a library, if it exports it.
///
/// # Safety
/// `handle` must come from a successful [`dlopen`] and still be open.
pub(crate) unsafe fn dlsym(handle: *mut c_void, name: &CStr) -> Option<*mut c_void> {
    // SAFETY: the caller guarantees the handle; name is NUL-terminated.
    let symbol = unsafe { libc::dlsym(handle, name.as_ptr()) };
    (!symbol.is_null()).then_some(symbol)
}

fn dl_error() -> String {
    // SAFETY: dlerror returns null or a NUL-terminated string that stays
    // valid until the next dl* call on this thread; we copy it at once.
    unsafe {
        let message = libc::dlerror();
        if message.is_null() {
            "unknown dlopen error".to_owned()
        } else {
            CStr::from_ptr(message).to_string_lossy().into_owned()
        }
    }
}
