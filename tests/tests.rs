//! Integration tests: each starts a real `forkserver serve` on a socket in a
//! temp dir and talks to it as a client would.

mod util;

mod async_client;
mod boot;
mod caller;
mod cgroups;
mod cli;
mod controls;
mod dylib;
mod generations;
mod hostile;
mod hygiene;
mod lifecycle;
mod live_fuzz;
mod pool;
mod protocol;
mod python;
mod replies;
mod robustness;
mod security;
mod soak;
mod spawn;
mod systemd_units;
mod tty;
mod upgrade;
mod zygote;
