//! A stateful fuzz of a live server: random sequences of valid and invalid
//! messages from several connections at once — hello, spawn (good and bad),
//! signal, kill, list, status, garbage, mutated messages, random fds
//! attached, disconnects — and after each sequence the server's invariants:
//! alive, one thread, its fds back at their baseline, no zombies and no
//! children left. Within a sequence every request must be answered, or its
//! connection closed after a stated (fatal) reason.
//!
//! CI runs it for a few seconds; for a long run:
//! `FS_FUZZ_SECONDS=600 cargo test --test tests live_fuzz -- --nocapture`.

use std::cell::Cell;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use forkserver::protocol::{
    connect_seqpacket, decode, encode, recv_datagram, send_datagram, ClientMessage, FdMapping,
    OnDisconnect, ServerMessage, Spawn, StdioSpec, PROTOCOL_VERSION,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use crate::util::{fds_of, made_children_of, threads_of, zombie_children_of, Server};

/// Connections a sequence may use at once.
const CONNECTIONS: usize = 4;

/// How long to wait for an answer before calling it lost.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
enum Program {
    True,
    Exit7,
    Sleep,
    Missing,
    Nul,
    Empty,
}

#[derive(Debug, Clone)]
enum Action {
    Hello {
        conn: usize,
        version: u32,
    },
    Spawn {
        conn: usize,
        id: u64,
        program: Program,
        fds: u8,
        stdout_pipe: bool,
        bad_index: bool,
        fd_target: i32,
        bad_env: bool,
        detach: bool,
    },
    Signal {
        conn: usize,
        id: u64,
        signal: i32,
    },
    Kill {
        conn: usize,
        pid: Option<u32>,
        signal: i32,
    },
    List {
        conn: usize,
    },
    Status {
        conn: usize,
    },
    Garbage {
        conn: usize,
        bytes: Vec<u8>,
    },
    Mutated {
        conn: usize,
        at: usize,
        byte: u8,
    },
    Disconnect {
        conn: usize,
    },
}

fn action() -> impl Strategy<Value = Action> {
    let conn = 0..CONNECTIONS;
    let id = 0u64..8;
    let program = prop_oneof![
        4 => Just(Program::True),
        2 => Just(Program::Exit7),
        2 => Just(Program::Sleep),
        1 => Just(Program::Missing),
        1 => Just(Program::Nul),
        1 => Just(Program::Empty),
    ];
    prop_oneof![
        1 => (conn.clone(), prop_oneof![4 => Just(PROTOCOL_VERSION), 1 => 0u32..5])
            .prop_map(|(conn, version)| Action::Hello { conn, version }),
        6 => (
            conn.clone(),
            id.clone(),
            program,
            0u8..4,
            any::<bool>(),
            prop::bool::weighted(0.1),
            prop_oneof![4 => 3i32..20, 1 => -2i32..3],
            prop::bool::weighted(0.1),
            prop::bool::weighted(0.2),
        )
            .prop_map(
                |(conn, id, program, fds, stdout_pipe, bad_index, fd_target, bad_env, detach)| {
                    Action::Spawn {
                        conn,
                        id,
                        program,
                        fds,
                        stdout_pipe,
                        bad_index,
                        fd_target,
                        bad_env,
                        detach,
                    }
                }
            ),
        2 => (conn.clone(), id, prop_oneof![Just(15), Just(0), Just(99), 1i32..65])
            .prop_map(|(conn, id, signal)| Action::Signal { conn, id, signal }),
        1 => (conn.clone(), prop::option::of(1u32..100_000), prop_oneof![Just(15), Just(0)])
            .prop_map(|(conn, pid, signal)| Action::Kill { conn, pid, signal }),
        2 => conn.clone().prop_map(|conn| Action::List { conn }),
        2 => conn.clone().prop_map(|conn| Action::Status { conn }),
        1 => (conn.clone(), prop::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(conn, bytes)| Action::Garbage { conn, bytes }),
        1 => (conn.clone(), 0usize..200, any::<u8>())
            .prop_map(|(conn, at, byte)| Action::Mutated { conn, at, byte }),
        1 => conn.prop_map(|conn| Action::Disconnect { conn }),
    ]
}

/// One connection of a sequence, speaking the protocol raw.
struct Conn {
    socket: OwnedFd,
    /// Spawns answered `spawned` and not yet `exited`, by id.
    live: Vec<u64>,
    /// The server closed it after a fatal error.
    closed: bool,
}

impl Conn {
    fn open(server: &Server) -> Conn {
        let socket = connect_seqpacket(&server.socket).unwrap();
        let timeout = libc::timeval {
            tv_sec: ANSWER_TIMEOUT.as_secs() as _,
            tv_usec: 0,
        };
        // SAFETY: setting a receive timeout on our own socket.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        assert_eq!(rc, 0);
        Conn {
            socket,
            live: Vec::new(),
            closed: false,
        }
    }

    /// Sends; false if the server has closed the connection.
    fn send(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> bool {
        !self.closed && send_datagram(self.socket.as_fd(), bytes, fds, 0).is_ok()
    }

    /// Reads until `answers` accepts a message (true), or the connection
    /// closes after a fatal error. Exits are bookkept on the way.
    fn await_answer(
        &mut self,
        what: &str,
        answers: impl Fn(&ServerMessage) -> bool,
    ) -> Result<(), TestCaseError> {
        let mut fatal = false;
        loop {
            let datagram = match recv_datagram(self.socket.as_fd(), 1 << 20, 16, 0) {
                Ok(Some(datagram)) => datagram,
                Ok(None) => {
                    self.closed = true;
                    return if fatal {
                        Ok(())
                    } else {
                        Err(TestCaseError::fail(format!(
                            "{what}: the connection closed without a stated reason"
                        )))
                    };
                }
                Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) && fatal => {
                    self.closed = true;
                    return Ok(());
                }
                Err(e) => {
                    return Err(TestCaseError::fail(format!("{what}: no answer ({e})")));
                }
            };
            let message: ServerMessage = decode(&datagram.bytes)
                .map_err(|e| TestCaseError::fail(format!("{what}: undecodable reply: {e}")))?;
            match &message {
                ServerMessage::Exited { id, .. } => self.live.retain(|l| l != id),
                ServerMessage::Spawned { id, .. } => self.live.push(*id),
                ServerMessage::Error { fatal: true, .. } => fatal = true,
                _ => {}
            }
            if answers(&message) {
                return Ok(());
            }
        }
    }
}

/// Runs one sequence against `server`; the caller checks the invariants.
fn run_sequence(server: &Server, actions: &[Action]) -> Result<u64, TestCaseError> {
    let mut conns: Vec<Conn> = (0..CONNECTIONS).map(|_| Conn::open(server)).collect();
    let null = || -> OwnedFd { std::fs::File::open("/dev/null").unwrap().into() };
    let mut messages = 0;
    // Every connection starts greeted, so most requests reach a handler.
    for conn in &mut conns {
        let hello = encode(&ClientMessage::Hello {
            protocol: PROTOCOL_VERSION,
            client: "fuzz".into(),
        })
        .unwrap();
        conn.send(&hello, &[]);
        conn.await_answer("hello", |m| matches!(m, ServerMessage::Welcome { .. }))?;
    }
    for action in actions {
        messages += 1;
        match action.clone() {
            Action::Hello { conn, version } => {
                let c = &mut conns[conn];
                let bytes = encode(&ClientMessage::Hello {
                    protocol: version,
                    client: String::new(),
                })
                .unwrap();
                if c.send(&bytes, &[]) {
                    c.await_answer("a second hello", |m| {
                        matches!(m, ServerMessage::Error { .. })
                    })?;
                }
            }
            Action::Spawn {
                conn,
                id,
                program,
                fds,
                stdout_pipe,
                bad_index,
                fd_target,
                bad_env,
                detach,
            } => {
                let (name, args): (&str, Vec<&str>) = match program {
                    Program::True => ("true", vec![]),
                    Program::Exit7 => ("sh", vec!["-c", "exit 7"]),
                    Program::Sleep => ("sleep", vec!["0.3"]),
                    Program::Missing => ("/no/such/program", vec![]),
                    Program::Nul => ("tr\0ue", vec![]),
                    Program::Empty => ("", vec![]),
                };
                let mut spawn = Spawn::exec(id, name, args.into_iter().map(Into::into).collect());
                let attached: Vec<OwnedFd> = (0..fds).map(|_| null()).collect();
                if stdout_pipe {
                    spawn.stdout = StdioSpec::Pipe;
                }
                if !attached.is_empty() || bad_index {
                    spawn.fds = vec![FdMapping {
                        index: if bad_index { 9 } else { 0 },
                        target: fd_target,
                    }];
                }
                if bad_env {
                    spawn.env.insert("A=B".into(), Some("x".into()));
                }
                if detach {
                    spawn.on_disconnect = OnDisconnect::Detach;
                }
                let borrowed: Vec<_> = attached.iter().map(|f| f.as_fd()).collect();
                let c = &mut conns[conn];
                if c.send(&encode(&ClientMessage::Spawn(spawn)).unwrap(), &borrowed) {
                    c.await_answer("spawn", |m| match m {
                        ServerMessage::Spawned { id: got, .. }
                        | ServerMessage::SpawnFailed { id: got, .. } => *got == id,
                        ServerMessage::Error { id: got, .. } => *got == Some(id),
                        _ => false,
                    })?;
                }
            }
            Action::Signal { conn, id, signal } => {
                let c = &mut conns[conn];
                if c.send(&encode(&ClientMessage::Signal { id, signal }).unwrap(), &[]) {
                    c.await_answer("signal", |m| match m {
                        ServerMessage::Signaled { id: got, .. } => *got == id,
                        ServerMessage::Error { id: got, .. } => *got == Some(id),
                        _ => false,
                    })?;
                }
            }
            Action::Kill { conn, pid, signal } => {
                let c = &mut conns[conn];
                let request = ClientMessage::Kill {
                    id: 77,
                    pid,
                    signal,
                };
                if c.send(&encode(&request).unwrap(), &[]) {
                    c.await_answer("kill", |m| match m {
                        ServerMessage::Killed { id: 77, more, .. } => !more,
                        ServerMessage::Error { id: Some(77), .. } => true,
                        _ => false,
                    })?;
                }
            }
            Action::List { conn } => {
                let c = &mut conns[conn];
                if c.send(&encode(&ClientMessage::List { id: 78 }).unwrap(), &[]) {
                    c.await_answer("list", |m| {
                        matches!(
                            m,
                            ServerMessage::Children {
                                id: 78,
                                more: false,
                                ..
                            }
                        )
                    })?;
                }
            }
            Action::Status { conn } => {
                let c = &mut conns[conn];
                if c.send(&encode(&ClientMessage::Status { id: 79 }).unwrap(), &[]) {
                    c.await_answer(
                        "status",
                        |m| matches!(m, ServerMessage::Status(r) if r.id == 79),
                    )?;
                }
            }
            Action::Garbage { conn, bytes } => {
                let c = &mut conns[conn];
                // An empty datagram cannot be told from a close on SEQPACKET
                // by the server: it reads it as the peer going.
                if bytes.is_empty() {
                    continue;
                }
                let fd = null();
                if c.send(&bytes, &[fd.as_fd()]) {
                    c.await_answer("garbage", |m| matches!(m, ServerMessage::Error { .. }))?;
                }
            }
            Action::Mutated { conn, at, byte } => {
                let mut bytes =
                    encode(&ClientMessage::Spawn(Spawn::exec(70, "true", vec![]))).unwrap();
                let at = at % bytes.len();
                bytes[at] = byte;
                let c = &mut conns[conn];
                if c.send(&bytes, &[]) {
                    // Decodes to something (answered by its kind) or not
                    // (an error): either way some answer comes.
                    c.await_answer("a mutated spawn", |m| {
                        !matches!(m, ServerMessage::Exited { .. })
                    })?;
                }
            }
            Action::Disconnect { conn } => {
                conns[conn] = Conn::open(server);
                let hello = encode(&ClientMessage::Hello {
                    protocol: PROTOCOL_VERSION,
                    client: "fuzz".into(),
                })
                .unwrap();
                conns[conn].send(&hello, &[]);
                conns[conn]
                    .await_answer("hello", |m| matches!(m, ServerMessage::Welcome { .. }))?;
            }
        }
    }
    Ok(messages)
}

/// The server after a sequence: alive, one thread, its fds at the baseline,
/// and no children or zombies once every connection is gone (detached
/// children are short-lived: they exit on their own).
fn check_invariants(server: &Server, baseline: &[i32]) -> Result<(), TestCaseError> {
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    loop {
        let clean = made_children_of(server).is_empty()
            && zombie_children_of(server.pid()).is_empty()
            && fds_of(server.pid()) == baseline;
        if clean {
            break;
        }
        if Instant::now() > deadline {
            return Err(TestCaseError::fail(format!(
                "after the sequence: children {:?}, zombies {:?}, fds {:?} (baseline {baseline:?})",
                made_children_of(server),
                zombie_children_of(server.pid()),
                fds_of(server.pid())
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    prop_assert_eq!(threads_of(server.pid()), 1);
    prop_assert!(crate::util::is_running(server.pid()), "the server died");
    Ok(())
}

#[test]
fn live_fuzz_random_sequences_keep_the_server_whole() {
    let seconds: u64 = std::env::var("FS_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let server = Server::start_with(&[
        "--kill-grace",
        "0.2",
        "--limit",
        "max_message_bytes=16384",
        "--limit",
        "max_pending_per_connection=4",
    ]);
    // The baseline once the server has handled everything before: the
    // start-up probe's connection included (a status answered after it).
    let client = server.client();
    client.status().unwrap();
    drop(client);
    let mut baseline = fds_of(server.pid());
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = fds_of(server.pid());
        if now == baseline {
            break;
        }
        baseline = now;
    }
    let started = Instant::now();
    let (sequences, messages) = (Cell::new(0u64), Cell::new(0u64));
    let config = Config {
        cases: 16,
        failure_persistence: None,
        // Each shrink step replays a sequence: keep a failure's report quick.
        max_shrink_iters: 64,
        ..Config::default()
    };
    while started.elapsed() < Duration::from_secs(seconds) {
        // A runner runs its `cases` once; a fresh one (randomly seeded)
        // for each round.
        let mut runner = TestRunner::new(config.clone());
        let result = runner.run(&prop::collection::vec(action(), 1..40), |actions| {
            let sent = run_sequence(&server, &actions)?;
            check_invariants(&server, &baseline)?;
            sequences.set(sequences.get() + 1);
            messages.set(messages.get() + sent);
            Ok(())
        });
        if let Err(e) = result {
            panic!("{e}\nserver log:\n{}", server.log());
        }
    }
    println!(
        "live fuzz: {} sequences, {} messages in {:.0?}; server pid {} alive, 1 thread, fds at baseline",
        sequences.get(),
        messages.get(),
        started.elapsed(),
        server.pid()
    );
    assert!(sequences.get() > 0);
}
