//! Property tests: the decoder never panics, whatever bytes arrive, and
//! valid messages survive an encode/decode round trip unchanged.

use std::collections::BTreeMap;

use forkserver_protocol::{
    decode, encode, ClientMessage, FdMapping, OnDisconnect, ServerMessage, Spawn, StdioSpec,
    WireStr,
};
use proptest::prelude::*;

fn wire_str() -> impl Strategy<Value = WireStr> {
    prop_oneof![
        "[a-zA-Z0-9 /._-]{0,12}".prop_map(WireStr::from),
        proptest::collection::vec(any::<u8>(), 0..12).prop_map(WireStr::from),
    ]
}

fn stdio() -> impl Strategy<Value = StdioSpec> {
    prop_oneof![
        Just(StdioSpec::Null),
        Just(StdioSpec::Pipe),
        any::<u32>().prop_map(|index| StdioSpec::Fd { index }),
    ]
}

fn spawn() -> impl Strategy<Value = Spawn> {
    (
        any::<u64>(),
        wire_str(),
        proptest::collection::vec(wire_str(), 0..4),
        proptest::collection::btree_map(wire_str(), proptest::option::of(wire_str()), 0..3),
        (stdio(), stdio(), stdio()),
        proptest::collection::vec((any::<u32>(), any::<i32>()), 0..3),
        any::<(bool, bool, bool, bool)>(),
    )
        .prop_map(
            |(id, program, args, env, (stdin, stdout, stderr), fds, flags)| {
                let mut spawn = Spawn::exec(id, program, args);
                spawn.env = env.into_iter().collect::<BTreeMap<_, _>>();
                (spawn.stdin, spawn.stdout, spawn.stderr) = (stdin, stdout, stderr);
                spawn.fds = fds
                    .into_iter()
                    .map(|(index, target)| FdMapping { index, target })
                    .collect();
                (
                    spawn.env_clear,
                    spawn.new_session,
                    spawn.die_with_server,
                    spawn.no_new_privs,
                ) = flags;
                if flags.0 {
                    spawn.on_disconnect = OnDisconnect::Detach;
                }
                spawn
            },
        )
}

fn client_message() -> impl Strategy<Value = ClientMessage> {
    prop_oneof![
        (any::<u32>(), "[a-z]{0,8}")
            .prop_map(|(protocol, client)| ClientMessage::Hello { protocol, client }),
        spawn().prop_map(ClientMessage::Spawn),
        (any::<u64>(), any::<i32>()).prop_map(|(id, signal)| ClientMessage::Signal { id, signal }),
        any::<u64>().prop_map(|id| ClientMessage::Status { id }),
    ]
}

/// A change to an encoded message: overwrite a byte, cut the end, or insert.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Flip(at, byte)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Insert(at, byte)),
    ]
}

fn apply(bytes: &mut Vec<u8>, mutation: &Mutation) {
    if bytes.is_empty() {
        return;
    }
    match *mutation {
        Mutation::Flip(at, byte) => {
            let at = at % bytes.len();
            bytes[at] = byte;
        }
        Mutation::Truncate(at) => bytes.truncate(at % bytes.len()),
        Mutation::Insert(at, byte) => bytes.insert(at % bytes.len(), byte),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic_the_decoders(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode::<ClientMessage>(&bytes);
        let _ = decode::<ServerMessage>(&bytes);
    }

    #[test]
    fn valid_messages_round_trip(message in client_message()) {
        let bytes = encode(&message).unwrap();
        prop_assert_eq!(decode::<ClientMessage>(&bytes).unwrap(), message);
    }

    #[test]
    fn mutated_messages_never_panic_the_decoder(
        message in client_message(),
        mutations in proptest::collection::vec(mutation(), 1..4),
    ) {
        let mut bytes = encode(&message).unwrap();
        for m in &mutations {
            apply(&mut bytes, m);
        }
        let _ = decode::<ClientMessage>(&bytes);
    }
}

/// Deep nesting must be an error, not a stack overflow (which would abort the
/// server, not panic it).
#[test]
fn deeply_nested_input_is_refused_not_a_stack_overflow() {
    for byte in [0x91u8, 0x81] {
        let mut bytes = vec![byte; 60_000];
        bytes.push(0xc0);
        assert!(decode::<ClientMessage>(&bytes).is_err());
        assert!(decode::<ServerMessage>(&bytes).is_err());
    }
}
