//! Checks of single request fields, for the plan: limits, NUL bytes,
//! UTF-8, and the paths an exec tries.

use std::ffi::CString;

use forkserver_protocol::{ErrorKind, Limits, WireStr};

use super::LaunchError;

/// Used when neither the request's environment nor the server's has `PATH`.
const DEFAULT_PATH: &[u8] = b"/usr/local/bin:/usr/bin:/bin";

pub(super) fn invalid(message: String) -> LaunchError {
    LaunchError::new(ErrorKind::Invalid, message)
}

pub(super) fn check_args(args: &[WireStr], limits: &Limits) -> Result<(), LaunchError> {
    if limits.max_args != 0 {
        check_count("target.args", args.len(), limits.max_args, "max_args")?;
    }
    // With their NULs, as execve counts: a million empty arguments are not
    // nothing.
    let bytes = args.iter().map(|a| a.as_bytes().len() + 1).sum();
    check_bytes(
        "target.args",
        bytes,
        limits.max_args_bytes,
        "max_args_bytes",
    )
}

pub(super) fn check_bytes(
    field: &str,
    bytes: usize,
    limit: u32,
    name: &str,
) -> Result<(), LaunchError> {
    if bytes > limit as usize {
        return Err(LaunchError::new(
            ErrorKind::Limit,
            format!("{field} holds {bytes} bytes; the limit {name} is {limit}"),
        ));
    }
    Ok(())
}

pub(super) fn check_count(
    field: &str,
    count: usize,
    limit: u32,
    name: &str,
) -> Result<(), LaunchError> {
    if count > limit as usize {
        return Err(LaunchError::new(
            ErrorKind::Limit,
            format!("{field} has {count} entries; the limit {name} is {limit}"),
        ));
    }
    Ok(())
}

/// Worker arguments must be UTF-8 (a worker sees `&[String]`).
pub(super) fn utf8_args(args: &[WireStr]) -> Result<Vec<String>, LaunchError> {
    args.iter()
        .enumerate()
        .map(|(i, arg)| {
            String::from_utf8(arg.as_bytes().to_vec())
                .map_err(|_| invalid(format!("target.args[{i}] is not valid UTF-8")))
        })
        .collect()
}

pub(super) fn c_string(s: &WireStr, field: &str) -> Result<CString, LaunchError> {
    CString::new(s.as_bytes()).map_err(|_| invalid(format!("{field} contains a NUL byte")))
}

/// The paths execve should try for `program`: itself if it contains a `/`,
/// else `DIR/program` for each entry of the child's `PATH` (an empty entry
/// meaning the current directory, as execvp has it).
pub(super) fn exec_candidates(
    program: &[u8],
    path: Option<&[u8]>,
) -> Result<Vec<CString>, LaunchError> {
    let to_c = |bytes: Vec<u8>| {
        CString::new(bytes).map_err(|_| invalid("target.program contains a NUL byte".into()))
    };
    if program.contains(&b'/') {
        return Ok(vec![to_c(program.to_vec())?]);
    }
    let path = path.unwrap_or(DEFAULT_PATH);
    path.split(|&b| b == b':')
        .map(|dir| {
            let dir = if dir.is_empty() { b"." as &[u8] } else { dir };
            let mut full = Vec::with_capacity(dir.len() + 1 + program.len());
            full.extend_from_slice(dir);
            full.push(b'/');
            full.extend_from_slice(program);
            to_c(full)
        })
        .collect()
}
