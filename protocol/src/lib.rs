//! The forkserver wire protocol.
//!
//! Both sides of a forkserver connection use this crate: the message types
//! ([`ClientMessage`], [`ServerMessage`]), their MessagePack encoding
//! ([`encode`], [`decode`]), and fd passing over `SOCK_SEQPACKET`
//! ([`send_datagram`], [`recv_datagram`]). It has no I/O policy and no process
//! logic.
//!
//! One datagram carries one message: a MessagePack map with named fields and a
//! `type` field naming the message, plus any file descriptors as
//! `SCM_RIGHTS`, referred to by index from inside the message.
//! `protocol/README.md` is the reference for implementers in other languages.
//!
//! ```
//! use forkserver_protocol::{decode, encode, ClientMessage, Spawn, PROTOCOL_VERSION};
//!
//! let hello = ClientMessage::Hello { protocol: PROTOCOL_VERSION, client: "doc".into() };
//! let bytes = encode(&hello).unwrap();
//! assert_eq!(decode::<ClientMessage>(&bytes).unwrap(), hello);
//!
//! let spawn = ClientMessage::Spawn(Spawn::exec(7, "echo", vec!["hi".into()]));
//! assert!(encode(&spawn).unwrap().len() < 256);
//! ```
#![deny(missing_docs)]

mod fdpass;
mod message;
mod socket;
mod wire_str;

use std::fmt;

pub use fdpass::{recv_datagram, send_datagram, Datagram};
pub use message::{
    ChildInfo, ChildStatus, ClientMessage, ErrorKind, FdMapping, Limits, ModuleInfo, ModuleKind,
    OnDisconnect, PoolInfo, RunAs, ServerMessage, Spawn, StatusReport, StdioSpec, Target,
};
pub use rmpv;
pub use socket::{
    connect_seqpacket, default_socket_path, listen_seqpacket, per_user_socket_dir, seqpacket_pair,
};
pub use wire_str::WireStr;

/// The protocol version this crate speaks, sent in `Hello` and `Welcome`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Encodes a message as a MessagePack map with named fields.
pub fn encode<T: serde::Serialize>(message: &T) -> Result<Vec<u8>, CodecError> {
    rmp_serde::to_vec_named(message).map_err(|e| CodecError(e.to_string()))
}

/// How deeply MessagePack values may nest in a message (payloads included).
/// Messages themselves nest four levels; the bound keeps a hostile message of
/// nested arrays from overflowing the decoder's stack.
pub const MAX_NESTING: usize = 64;

/// Decodes one message from a datagram's bytes.
pub fn decode<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, CodecError> {
    let mut decoder = rmp_serde::Deserializer::from_read_ref(bytes);
    decoder.set_max_depth(MAX_NESTING);
    T::deserialize(&mut decoder).map_err(|e| CodecError(e.to_string()))
}

/// A message that could not be encoded or decoded; the text says why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodecError(String);

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed message: {}", self.0)
    }
}

impl std::error::Error for CodecError {}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pins the encoding documented (as a hex dump) in protocol/README.md.
    #[test]
    fn spawn_encoding_matches_the_documented_hex_dump() {
        let mut spawn = Spawn::exec(7, "echo", vec!["hi".into()]);
        spawn.stdout = StdioSpec::Pipe;
        let bytes = encode(&ClientMessage::Spawn(spawn)).unwrap();
        let readme = include_str!("../README.md");
        let documented = readme
            .split("<!-- spawn-hex -->")
            .nth(1)
            .expect("README has the spawn hex dump")
            .lines()
            .filter(|line| line.starts_with("00"))
            .flat_map(|line| line[10..58].split_whitespace())
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect::<Vec<u8>>();
        assert_eq!(
            bytes,
            documented,
            "README hex dump is stale; now:\n{}",
            hex_dump(&bytes)
        );
    }

    /// The dump format of the README (xxd's): offset, 16 bytes, ASCII.
    fn hex_dump(bytes: &[u8]) -> String {
        let mut out = String::new();
        for (i, chunk) in bytes.chunks(16).enumerate() {
            let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
            let ascii: String = chunk
                .iter()
                .map(|&b| {
                    if (0x20..0x7f).contains(&b) {
                        b as char
                    } else {
                        '.'
                    }
                })
                .collect();
            out += &format!("{:08x}: {:<48}{ascii}\n", i * 16, hex.join(" ") + " ");
        }
        out
    }

    #[test]
    fn messages_are_maps_with_a_snake_case_type() {
        let msg = ServerMessage::Exited {
            id: 1,
            pid: 2,
            status: ChildStatus::Signaled {
                signal: 9,
                core_dumped: false,
            },
        };
        let bytes = encode(&msg).unwrap();
        // fixmap with 4 entries, first key "type", value "exited".
        assert_eq!(&bytes[..13], b"\x84\xa4type\xa6exited");
        assert_eq!(decode::<ServerMessage>(&bytes).unwrap(), msg);
    }

    #[test]
    fn absent_optional_fields_take_their_defaults() {
        // {"type": "spawn", "id": 1, "target": {"kind": "exec", "program": "true"}}
        let bytes = encode(&serde_value_spawn()).unwrap();
        match decode::<ClientMessage>(&bytes).unwrap() {
            ClientMessage::Spawn(spawn) => {
                assert!(spawn.new_session);
                assert_eq!(spawn.on_disconnect, OnDisconnect::Kill);
                assert_eq!(spawn.stdin, StdioSpec::Null);
                assert!(spawn.env.is_empty() && spawn.fds.is_empty());
            }
            other => panic!("decoded as {other:?}"),
        }
    }

    fn serde_value_spawn() -> std::collections::BTreeMap<&'static str, rmpv_like::Value> {
        use rmpv_like::Value;
        let mut target = std::collections::BTreeMap::new();
        target.insert("kind", Value::Str("exec"));
        target.insert("program", Value::Str("true"));
        let mut map = std::collections::BTreeMap::new();
        map.insert("type", Value::Str("spawn"));
        map.insert("id", Value::Int(1));
        map.insert("target", Value::Map(target));
        map
    }

    /// Just enough of a dynamic value to write maps by hand in tests.
    mod rmpv_like {
        #[derive(serde::Serialize)]
        #[serde(untagged)]
        pub enum Value {
            Str(&'static str),
            Int(u64),
            Map(std::collections::BTreeMap<&'static str, Value>),
        }
    }

    #[test]
    fn unknown_error_kinds_decode_as_unknown() {
        let bytes = encode(&"from_the_future").unwrap();
        assert_eq!(decode::<ErrorKind>(&bytes).unwrap(), ErrorKind::Unknown);
    }

    #[test]
    fn raw_status_matches_waitpid_encoding() {
        assert_eq!(ChildStatus::Exited { code: 3 }.into_raw(), 3 << 8);
        let killed = ChildStatus::Signaled {
            signal: 9,
            core_dumped: true,
        };
        assert_eq!(killed.into_raw(), 9 | 0x80);
    }
}
