//! A forkserver dynamic module, written against the C ABI any language can
//! export:
//!
//! - `int forkserver_module_init(void)` runs once in the server at start,
//!   before any thread exists; non-zero fails the start.
//! - `int SYMBOL(int argc, char **argv)` runs in a forked child for a spawn of
//!   worker `MODULE:SYMBOL`; argv\[0\] is that name, the rest are the spawn's
//!   args, and the return value is the exit code.
//!
//! ```sh
//! cargo build --release --manifest-path examples/dylib_module/Cargo.toml
//! forkserver serve --module demo=examples/dylib_module/target/release/libforkserver_demo_module.so &
//! forkserver spawn --worker demo:hello -- world
//! ```

use std::ffi::{c_char, c_int, CStr};
use std::sync::OnceLock;

/// Built by the init, in the server; every worker sees it copy-on-write.
static GREETING: OnceLock<String> = OnceLock::new();

/// Prepares the module's state. Set `DEMO_MODULE_INIT_FAIL=1` to watch a
/// failed init stop the server's start.
#[no_mangle]
pub extern "C" fn forkserver_module_init() -> c_int {
    if std::env::var_os("DEMO_MODULE_INIT_FAIL").is_some_and(|v| v == "1") {
        return 3;
    }
    let _ = GREETING.set(format!("hello from pid {}'s init", std::process::id()));
    0
}

/// # Safety
/// `argv` holds `argc` valid C strings, as forkserver passes them.
unsafe fn args(argc: c_int, argv: *mut *mut c_char) -> Vec<String> {
    (0..argc as usize)
        .map(|i| {
            // SAFETY: the caller guarantees argv[0..argc] are C strings.
            unsafe { CStr::from_ptr(*argv.add(i)) }
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

/// Prints the greeting the init built and the arguments; returns how many
/// arguments there were (after argv\[0\]).
///
/// # Safety
/// `argv` holds `argc` valid C strings.
#[no_mangle]
pub unsafe extern "C" fn hello(argc: c_int, argv: *mut *mut c_char) -> c_int {
    // SAFETY: forwarded from our caller's contract.
    let args = unsafe { args(argc, argv) };
    let greeting = GREETING.get().map_or("no init ran", String::as_str);
    println!("{greeting}; {} says: {}", args[0], args[1..].join(" "));
    argc - 1
}

/// Exits with the code given as its first argument.
///
/// # Safety
/// `argv` holds `argc` valid C strings.
#[no_mangle]
pub unsafe extern "C" fn exit_with(argc: c_int, argv: *mut *mut c_char) -> c_int {
    // SAFETY: forwarded from our caller's contract.
    let args = unsafe { args(argc, argv) };
    args.get(1).and_then(|code| code.parse().ok()).unwrap_or(0)
}
