//! Dynamic modules: shared libraries loaded with `dlopen` before any thread
//! exists, whose exported `int SYMBOL(int argc, char **argv)` functions run
//! in forked children.
//!
//! # Platform facts
//! - `RTLD_NOW` resolves every symbol at load time, so a library with a
//!   missing dependency fails the start rather than a child later.
//! - `dlerror()` returns a thread-local string valid until the next dl* call;
//!   it is copied at once.
//! - A library is never `dlclose`d: workers hold pointers into it, and the
//!   server keeps it for its whole life. See dlopen(3).

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::sys;

/// `int SYMBOL(int argc, char **argv)`.
pub(crate) type EntryPoint = unsafe extern "C" fn(c_int, *mut *mut c_char) -> c_int;

/// The optional `int forkserver_module_init(void)`.
type InitFn = unsafe extern "C" fn() -> c_int;

/// The name of the optional init function a module may export.
pub(crate) const INIT_SYMBOL: &CStr = c"forkserver_module_init";

/// A loaded shared library.
pub(crate) struct Dylib {
    handle: *mut c_void,
}

impl Dylib {
    /// `dlopen(path, RTLD_NOW | RTLD_LOCAL)`.
    pub(crate) fn open(path: &Path) -> Result<Dylib, String> {
        let c_path = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| "the path contains a NUL byte".to_owned())?;
        // SAFETY: dlopen runs the library's constructors; loading code is
        // what the operator asked for with --module.
        let handle = unsafe { sys::dlopen(&c_path) }?;
        Ok(Dylib { handle })
    }

    /// Calls `forkserver_module_init` if the library exports it; Ok(None) if
    /// it does not, Ok(Some(status)) with what it returned.
    pub(crate) fn init(&self) -> Option<c_int> {
        let init = self.symbol(INIT_SYMBOL)?;
        // SAFETY: the module's contract is that this symbol, if present, is
        // `int forkserver_module_init(void)`.
        let init: InitFn = unsafe { std::mem::transmute::<*mut c_void, InitFn>(init) };
        // SAFETY: calling the module's init as its contract says.
        Some(unsafe { init() })
    }

    /// The entry point `name`, if exported.
    pub(crate) fn entry_point(&self, name: &CStr) -> Option<EntryPoint> {
        let symbol = self.symbol(name)?;
        // SAFETY: the module's contract is that worker symbols are
        // `int SYMBOL(int argc, char **argv)`; we cannot check a C signature.
        Some(unsafe { std::mem::transmute::<*mut c_void, EntryPoint>(symbol) })
    }

    fn symbol(&self, name: &CStr) -> Option<*mut c_void> {
        // SAFETY: handle came from a successful dlopen and is never closed.
        unsafe { sys::dlsym(self.handle, name) }
    }
}
