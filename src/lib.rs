//! forkserver: a single-threaded server that forks and execs processes for
//! its clients, so that large or multithreaded programs can start children
//! cheaply and safely.
//!
//! This crate is the `forkserver` command line and a facade over the three
//! crates that do the work:
//! - [`protocol`]: the wire protocol both sides speak;
//! - [`server`]: the server (`forkserver serve`);
//! - [`client`]: a `std::process::Command`-like client.
//!
//! ```no_run
//! use forkserver::client::Client;
//!
//! let client = Client::connect_default()?;
//! let status = client.command("true").status()?;
//! assert!(status.success());
//! # Ok::<(), forkserver::client::Error>(())
//! ```
#![deny(missing_docs)]

pub use forkserver_client as client;
/// `std::process::Command`'s stand-in: `use forkserver::Command;` in place
/// of `use std::process::Command;` runs the same code through the server.
pub use forkserver_client::{Child, Command, Stdio};
pub use forkserver_protocol as protocol;
pub use forkserver_server as server;

/// The README's Rust examples, compiled as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
