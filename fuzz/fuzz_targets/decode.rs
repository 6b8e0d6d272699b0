//! Fuzzes the message decoders with arbitrary datagrams: whatever a client
//! (or a server) sends, decoding returns Ok or Err and never panics, aborts
//! or overflows the stack. Every message that decodes must encode again and
//! decode to the same value.
//!
//! ```sh
//! cargo install cargo-fuzz
//! RUSTC_BOOTSTRAP=1 cargo fuzz run decode -- -max_total_time=60   # nightly not needed
//! ```
#![no_main]

use forkserver_protocol::{decode, encode, ClientMessage, ServerMessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(message) = decode::<ClientMessage>(bytes) {
        let again = encode(&message).expect("a decoded message encodes");
        assert_eq!(decode::<ClientMessage>(&again).expect("and decodes again"), message);
    }
    let _ = decode::<ServerMessage>(bytes);
});
