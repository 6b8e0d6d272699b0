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

pub use fdpass::{memfd_holding, recv_datagram, send_datagram, Datagram};
pub use message::{
    ChildInfo, ChildStatus, ClientMessage, ErrorKind, FdMapping, Limits, ModuleInfo, ModuleKind,
    OnDisconnect, PoolInfo, PtySize, Rlimit, RunAs, ServerMessage, Spawn, StatusReport, StdioSpec,
    Target, RLIMITS,
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

/// How deeply MessagePack arrays and maps may nest in a message, the
/// message's own map counted as the first level (a `payload` included).
/// Messages themselves nest four levels; the bound keeps a hostile message
/// of nested arrays from overflowing the decoder's stack.
pub const MAX_NESTING: usize = 64;

/// Decodes one message from a datagram's bytes, which must hold exactly one
/// MessagePack value: trailing bytes are an error.
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    decode_wrapped(bytes, 0)
}

/// Decodes, as [`decode`] does, a message that wraps a client's message
/// (already decoded within [`MAX_NESTING`] once) in `levels` more: what a
/// server passes on to its own processes.
pub fn decode_wrapped<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    levels: usize,
) -> Result<T, CodecError> {
    let mut decoder = rmp_serde::Deserializer::new(std::io::Cursor::new(bytes));
    // rmp-serde refuses a container once its depth budget is used up, so a
    // budget of n admits n - 1 levels.
    decoder.set_max_depth(MAX_NESTING + levels + 1);
    let message = T::deserialize(&mut decoder).map_err(|e| CodecError(e.to_string()))?;
    let used = decoder.position() as usize;
    if used != bytes.len() {
        return Err(CodecError(format!(
            "{} bytes follow the message's {used}",
            bytes.len() - used
        )));
    }
    Ok(message)
}

/// Decodes a client's message, as [`decode`] does. A `spawn` written, as
/// every client here writes it, with `"type": "spawn"` first decodes
/// straight into [`Spawn`]: serde's internally tagged enums first copy the
/// whole map into a buffer of their own and decode from that, which for a
/// spawn carrying the caller's environment doubled the decode's time and
/// allocations on the server's request path. Any other message, field
/// order or a spawn that fails to decode takes the general path (whose
/// errors name what was expected: "invalid type: string \"022\", expected
/// u32", not the short path's "wrong msgpack marker"), so both accept and
/// refuse the same bytes with the same errors, except that a spawn's map
/// with a second `type` key after the first is read as a spawn.
pub fn decode_client_message(bytes: &[u8]) -> Result<ClientMessage, CodecError> {
    let mut rest = bytes;
    // fixstr "type", fixstr "spawn": how MessagePack encoders write them.
    if map_len(&mut rest).is_some() && rest.starts_with(b"\xa4type\xa5spawn") {
        if let Ok(spawn) = decode::<Spawn>(bytes) {
            return Ok(ClientMessage::Spawn(spawn));
        }
    }
    decode(bytes)
}

/// The `id` of a message that did not decode (an unknown `type`, a bad
/// field) or arrived cut short, if its map holds one ahead of the damage,
/// so that the error about it can name the request. Clients put `id` right
/// after `type` (protocol/README.md).
pub fn peek_id(bytes: &[u8]) -> Option<u64> {
    let mut rest = bytes;
    let len = map_len(&mut rest)?;
    for _ in 0..len.min(16) {
        let key = rmpv::decode::read_value_with_max_depth(&mut rest, MAX_NESTING).ok()?;
        if key.as_str() == Some("id") {
            return rmpv::decode::read_value_with_max_depth(&mut rest, MAX_NESTING)
                .ok()?
                .as_u64();
        }
        rmpv::decode::read_value_with_max_depth(&mut rest, MAX_NESTING).ok()?;
    }
    None
}

/// The length of the map a MessagePack value starts with.
fn map_len(rest: &mut &[u8]) -> Option<u32> {
    let (&marker, tail) = rest.split_first()?;
    let (len, used) = match marker {
        0x80..=0x8f => (u32::from(marker & 0x0f), 0),
        0xde => (
            u32::from(u16::from_be_bytes(tail.get(..2)?.try_into().ok()?)),
            2,
        ),
        0xdf => (u32::from_be_bytes(tail.get(..4)?.try_into().ok()?), 4),
        _ => return None,
    };
    *rest = &tail[used..];
    Some(len)
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

    /// `n` arrays, each holding the next, the innermost empty.
    fn nested(n: usize) -> Vec<u8> {
        let mut bytes = vec![0x91; n - 1];
        bytes.push(0x90);
        bytes
    }

    #[test]
    fn nesting_is_bounded_at_exactly_max_nesting_levels() {
        assert!(decode::<rmpv::Value>(&nested(MAX_NESTING)).is_ok());
        let err = decode::<rmpv::Value>(&nested(MAX_NESTING + 1)).unwrap_err();
        assert!(err.to_string().contains("depth"), "{err}");
    }

    #[test]
    fn a_wrapped_message_may_nest_as_many_more_levels_as_it_wraps() {
        assert!(decode_wrapped::<rmpv::Value>(&nested(MAX_NESTING + 2), 2).is_ok());
        assert!(decode_wrapped::<rmpv::Value>(&nested(MAX_NESTING + 3), 2).is_err());
    }

    #[test]
    fn reload_and_reloaded_are_as_documented() {
        let reload = encode(&ClientMessage::Reload { id: 5 }).unwrap();
        assert_eq!(reload, b"\x82\xa4type\xa6reload\xa2id\x05");
        let reloaded = ServerMessage::Reloaded {
            id: 5,
            generation: 2,
            modules: Vec::new(),
        };
        let bytes = encode(&reloaded).unwrap();
        assert_eq!(&bytes[..15], b"\x84\xa4type\xa8reloaded");
        assert_eq!(decode::<ServerMessage>(&bytes).unwrap(), reloaded);
    }

    #[test]
    fn trailing_bytes_after_a_message_are_an_error() {
        let mut bytes = encode(&ClientMessage::Status { id: 3 }).unwrap();
        assert!(decode::<ClientMessage>(&bytes).is_ok());
        bytes.push(0xc0);
        let err = decode::<ClientMessage>(&bytes).unwrap_err();
        assert!(err.to_string().contains("1 bytes follow"), "{err}");
    }

    #[test]
    fn a_spawn_decodes_the_same_by_the_short_path_and_the_general_one() {
        use rmpv::Value;
        let mut spawn = Spawn::exec(9, "/bin/echo", vec!["hi".into()]);
        spawn.env.insert("A".into(), Some("1".into()));
        spawn.env.insert("B".into(), None);
        spawn.umask = Some(0o22);
        let good = encode(&ClientMessage::Spawn(spawn.clone())).unwrap();
        type Fields = Vec<(Value, Value)>;
        let fields = |bytes: &[u8]| match decode::<Value>(bytes).unwrap() {
            Value::Map(fields) => fields,
            _ => unreachable!(),
        };
        let with = |edit: &dyn Fn(&mut Fields)| {
            let mut map = fields(&good);
            edit(&mut map);
            encode(&Value::Map(map)).unwrap()
        };
        let set = |key: &'static str, value: Value| {
            move |map: &mut Fields| {
                map.iter_mut()
                    .find(|(k, _)| k.as_str() == Some(key))
                    .unwrap()
                    .1 = value.clone()
            }
        };
        let mut trailing = good.clone();
        trailing.push(0xc0);
        let cases = [
            good.clone(),
            trailing,
            with(&|map| map.retain(|(k, _)| k.as_str() != Some("id"))),
            with(&set("env", Value::from(3))),
            with(&set("umask", Value::from("022"))),
            with(&set("target", Value::from("sh"))),
            with(&|map| map.push(("unknown_field".into(), Value::Nil))),
            // `type` last: the general path only.
            with(&|map| map.rotate_left(1)),
        ];
        // This crate's own encoding takes the short path.
        let mut rest = &good[..];
        assert!(map_len(&mut rest).is_some() && rest.starts_with(b"\xa4type\xa5spawn"));
        for bytes in cases {
            let general = decode::<ClientMessage>(&bytes).map_err(|e| e.to_string());
            let short = decode_client_message(&bytes).map_err(|e| e.to_string());
            assert_eq!(short, general, "{}", hex_dump(&bytes));
        }
        assert_eq!(
            decode_client_message(&good).unwrap(),
            ClientMessage::Spawn(spawn)
        );
    }

    #[test]
    fn the_id_of_a_damaged_message_can_be_read() {
        // An unknown type, a bad enum value, a message cut short: the id
        // that comes before the damage is found.
        let unknown = encode(&rmpv::Value::Map(vec![
            ("type".into(), "frobnicate".into()),
            ("id".into(), 42.into()),
        ]))
        .unwrap();
        assert!(decode::<ClientMessage>(&unknown).is_err());
        assert_eq!(peek_id(&unknown), Some(42));
        let spawn = encode(&ClientMessage::Spawn(Spawn::exec(
            7,
            "x".repeat(1000),
            vec![],
        )))
        .unwrap();
        assert_eq!(peek_id(&spawn[..40]), Some(7));
        assert_eq!(peek_id(&[0xc1]), None);
        assert_eq!(
            peek_id(
                &encode(&ClientMessage::Hello {
                    protocol: 1,
                    client: String::new()
                })
                .unwrap()
            ),
            None
        );
    }

    #[test]
    fn hello_may_say_nil_for_its_client() {
        let hello = encode(&rmpv::Value::Map(vec![
            ("type".into(), "hello".into()),
            ("protocol".into(), 1.into()),
            ("client".into(), rmpv::Value::Nil),
        ]))
        .unwrap();
        assert_eq!(
            decode::<ClientMessage>(&hello).unwrap(),
            ClientMessage::Hello {
                protocol: 1,
                client: String::new()
            }
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
