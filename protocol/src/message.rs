//! The messages, one MessagePack map per datagram.
//!
//! Every message is a map whose `type` field names it in snake_case. Optional
//! fields may be absent or `nil`; unknown fields are ignored, so the protocol
//! can grow without breaking older peers. See `protocol/README.md` for the
//! field-by-field reference other languages implement.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::WireStr;

/// A message from a client to the server.
// A message lives briefly and is moved once or twice; boxing `Spawn` would
// cost an allocation per request to save stack space nobody lacks.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    /// The first message on every connection.
    Hello {
        /// The protocol version the client speaks ([`crate::PROTOCOL_VERSION`]).
        protocol: u32,
        /// A free-form name of the client, for logs; absent or nil: `""`.
        #[serde(default, deserialize_with = "nil_as_default")]
        client: String,
    },
    /// Start a child; answered by [`ServerMessage::Spawned`] or
    /// [`ServerMessage::SpawnFailed`], then [`ServerMessage::Exited`].
    Spawn(Spawn),
    /// Send a signal to a child this connection spawned; answered by
    /// [`ServerMessage::Signaled`] or [`ServerMessage::Error`].
    Signal {
        /// The `id` of the spawn request that started the child.
        id: u64,
        /// The signal number (1..=64).
        signal: i32,
    },
    /// Ask how the server is doing; answered by [`ServerMessage::Status`].
    Status {
        /// Echoed in the reply.
        id: u64,
    },
    /// List live children (all of them for root and the server's uid, the
    /// peer's own uid's otherwise); answered by [`ServerMessage::Children`].
    List {
        /// Echoed in the reply.
        id: u64,
    },
    /// A message too big for one datagram: the whole message, encoded as
    /// usual, is the content of a passed regular file (a memfd), the last
    /// fd attached to this datagram. The message's own fds are the others,
    /// indexed as if the file were not there. At most
    /// `limits.max_bulk_bytes`; a `bulk` cannot hold another `bulk`.
    Bulk {
        /// The file's index among the attached fds: always the last one.
        fd: u32,
    },
    /// Signal live children by pid, or all the peer may touch; answered by
    /// [`ServerMessage::Killed`] or a `denied`/`no_such_child` error. A peer
    /// may signal children started by its own uid; root and the server's
    /// uid may signal any.
    Kill {
        /// Echoed in the reply.
        id: u64,
        /// The child's pid; absent or nil for every child the peer may touch.
        #[serde(default)]
        pid: Option<u32>,
        /// The signal number.
        signal: i32,
    },
    /// Load the preloads afresh from what is on disk now: start a new
    /// generation (a zygote that preloads), switch new spawns to it once it
    /// is ready, and retire the old one. Running children and connections
    /// are untouched. Root and the server's uid only. Answered, once the new
    /// generation is serving or has failed, by [`ServerMessage::Reloaded`]
    /// or an error (the old generation then serves on).
    Reload {
        /// Echoed in the reply.
        id: u64,
    },
    /// Upgrade the server in place: it runs its binary again (the file on
    /// disk now), with the same pid, and hands the new image its socket,
    /// every connection and every child; the new image starts a fresh
    /// generation. Root and the server's uid only. Answered by the new
    /// image with [`ServerMessage::Upgraded`] once its generation serves,
    /// or by an error if the new binary could not take over (the old image
    /// then serves on, with everything it had).
    Upgrade {
        /// Echoed in the reply.
        id: u64,
    },
}

/// A request to start a child. File descriptors ride on the same datagram
/// (`SCM_RIGHTS`) and are referred to by their index in that list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spawn {
    /// Chosen by the client; every reply about this child carries it. Must not
    /// be in use by another live child of the same connection.
    pub id: u64,
    /// What the child runs.
    pub target: Target,
    /// Start from an empty environment instead of the server's.
    #[serde(default)]
    pub env_clear: bool,
    /// Changes to the environment: a string value sets a variable, `nil`
    /// removes it. Applied after `env_clear`.
    #[serde(default)]
    pub env: BTreeMap<WireStr, Option<WireStr>>,
    /// Working directory of the child: relative to `cwd_fd` if given, else
    /// to the server's directory; the server's (or `cwd_fd`) if absent.
    #[serde(default)]
    pub cwd: Option<WireStr>,
    /// A passed directory fd (by index; `O_PATH` is enough) the child
    /// changes to (`fchdir`) before `cwd` is applied: how a client gives its
    /// child its own directory without the server resolving a path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd_fd: Option<u32>,
    /// The child's file mode creation mask; the server's if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub umask: Option<u32>,
    /// Put the child in a process group (`setpgid(0, pgid)`): 0 for a new
    /// group led by the child. Needs `new_session: false`; a nonzero group
    /// must be in the server's session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process_group: Option<i32>,
    /// A passed fd (by index) of a cgroup v2 directory the child is
    /// created in (`clone3` with `CLONE_INTO_CGROUP`) or moves itself into
    /// before its work. The peer must be able to write its `cgroup.procs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<u32>,
    /// Give the child a new pseudo-terminal of this size as its controlling
    /// terminal and its stdin, stdout and stderr (which must then be left
    /// `null`); `spawned` carries the terminal's master end (`pty`).
    /// Needs `new_session` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<PtySize>,
    /// Resource limits for the child (`setrlimit`); the server's otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rlimits: Vec<Rlimit>,
    /// The child's nice value (`setpriority`), absolute; the server's
    /// otherwise. Below the peer's own is root's privilege.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nice: Option<i32>,
    /// The CPUs the child may run on (`sched_setaffinity`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<Vec<u32>>,
    /// The child's `oom_score_adj` (-1000..=1000). Below the peer's own is
    /// root's privilege.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_score_adj: Option<i32>,
    /// The child's fd 0.
    #[serde(default)]
    pub stdin: StdioSpec,
    /// The child's fd 1.
    #[serde(default)]
    pub stdout: StdioSpec,
    /// The child's fd 2.
    #[serde(default)]
    pub stderr: StdioSpec,
    /// Further passed fds to install in the child at chosen numbers (>= 3).
    #[serde(default)]
    pub fds: Vec<FdMapping>,
    /// Start the child in a new session (`setsid`). On by default: a child left
    /// in the server's process group would be stopped by SIGTTIN when it
    /// reads a terminal the server was started from.
    #[serde(default = "default_true")]
    pub new_session: bool,
    /// What happens to the child when this connection closes.
    #[serde(default)]
    pub on_disconnect: OnDisconnect,
    /// Kill the child (SIGKILL) if the server dies (`PR_SET_PDEATHSIG`).
    #[serde(default)]
    pub die_with_server: bool,
    /// Set `PR_SET_NO_NEW_PRIVS`: exec can never grant the child more
    /// privileges (setuid bits and file capabilities are ignored).
    #[serde(default)]
    pub no_new_privs: bool,
    /// Run the child as this user. Only a root peer may ask; a root server
    /// otherwise runs children as the peer's own user.
    #[serde(default)]
    pub user: Option<RunAs>,
    /// Signals blocked in the child (its signal mask), by number: the
    /// caller's, as a child it forked itself would have them. None if
    /// empty. SIGKILL and SIGSTOP cannot be blocked and are refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signal_mask: Vec<u32>,
    /// Signals the child starts with ignored (`SIG_IGN`, which exec
    /// keeps), by number: the ones its caller ignores (`nohup`). Every other
    /// signal starts at its default action.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignored_signals: Vec<u32>,
}

/// The resource limits a spawn may set, as prlimit(1) names them without
/// `RLIMIT_`, with their `RLIMIT_*` numbers.
// The constants are c_uint on glibc and c_int on musl: the casts are for
// the latter.
#[allow(clippy::unnecessary_cast)]
pub const RLIMITS: [(&str, u32); 16] = [
    ("AS", libc::RLIMIT_AS as u32),
    ("CORE", libc::RLIMIT_CORE as u32),
    ("CPU", libc::RLIMIT_CPU as u32),
    ("DATA", libc::RLIMIT_DATA as u32),
    ("FSIZE", libc::RLIMIT_FSIZE as u32),
    ("LOCKS", libc::RLIMIT_LOCKS as u32),
    ("MEMLOCK", libc::RLIMIT_MEMLOCK as u32),
    ("MSGQUEUE", libc::RLIMIT_MSGQUEUE as u32),
    ("NICE", libc::RLIMIT_NICE as u32),
    ("NOFILE", libc::RLIMIT_NOFILE as u32),
    ("NPROC", libc::RLIMIT_NPROC as u32),
    ("RSS", libc::RLIMIT_RSS as u32),
    ("RTPRIO", libc::RLIMIT_RTPRIO as u32),
    ("RTTIME", libc::RLIMIT_RTTIME as u32),
    ("SIGPENDING", libc::RLIMIT_SIGPENDING as u32),
    ("STACK", libc::RLIMIT_STACK as u32),
];

/// A terminal's size, in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtySize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// One resource limit for a child.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    /// The resource, as prlimit(1) names it without `RLIMIT_` (one of
    /// [`RLIMITS`]).
    pub resource: String,
    /// The soft limit; nil for unlimited.
    pub soft: Option<u64>,
    /// The hard limit; nil for unlimited.
    pub hard: Option<u64>,
}

/// Credentials for a child: uid, gid and supplementary groups.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunAs {
    /// The user id.
    pub uid: u32,
    /// The group id.
    pub gid: u32,
    /// The supplementary groups.
    #[serde(default)]
    pub groups: Vec<u32>,
}

fn default_true() -> bool {
    true
}

/// Reads nil as the type's default (the documented meaning of nil for an
/// optional field).
fn nil_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

impl Spawn {
    /// A request to exec `program` with `args` (not including argv\[0\]) and
    /// every other option at its default.
    pub fn exec(id: u64, program: impl Into<WireStr>, args: Vec<WireStr>) -> Spawn {
        Spawn {
            id,
            target: Target::Exec {
                program: program.into(),
                args,
                arg0: None,
            },
            env_clear: false,
            env: BTreeMap::new(),
            cwd: None,
            cwd_fd: None,
            umask: None,
            process_group: None,
            cgroup: None,
            pty: None,
            rlimits: Vec::new(),
            nice: None,
            cpus: None,
            oom_score_adj: None,
            stdin: StdioSpec::Null,
            stdout: StdioSpec::Null,
            stderr: StdioSpec::Null,
            fds: Vec::new(),
            new_session: true,
            on_disconnect: OnDisconnect::Kill,
            die_with_server: false,
            no_new_privs: false,
            user: None,
            signal_mask: Vec::new(),
            ignored_signals: Vec::new(),
        }
    }
}

/// What a child runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    /// `execve` a program. A `program` without a `/` is looked up in the
    /// child's `PATH` (after `env` is applied), as `execvp` does.
    Exec {
        /// The program name or path.
        program: WireStr,
        /// Arguments after argv\[0\].
        #[serde(default)]
        args: Vec<WireStr>,
        /// argv\[0\]; `program` if absent.
        #[serde(default)]
        arg0: Option<WireStr>,
    },
    /// Run a preloaded worker in the forked child, without exec.
    Worker {
        /// A worker the server offers (listed in `Welcome.workers`), or
        /// `MODULE:SYMBOL` for a symbol of a dynamic module.
        name: String,
        /// The worker's arguments (UTF-8).
        #[serde(default)]
        args: Vec<WireStr>,
        /// Any MessagePack value, handed to the worker (embedded workers only).
        #[serde(default)]
        payload: Option<rmpv::Value>,
    },
}

/// Where one of the child's standard streams comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StdioSpec {
    /// `/dev/null`.
    #[default]
    Null,
    /// A new pipe; the server sends the other end back with `Spawned`.
    Pipe,
    /// A file descriptor passed with this request, by index.
    Fd {
        /// Index into the fds attached to the request.
        index: u32,
    },
}

/// Installs passed fd number `index` as fd `target` in the child.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdMapping {
    /// Index into the fds attached to the request.
    pub index: u32,
    /// The fd number it gets in the child; at least 3 (use `stdin`,
    /// `stdout`, `stderr` for 0–2).
    pub target: i32,
}

/// What happens to a child when the connection that spawned it closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDisconnect {
    /// SIGTERM, then SIGKILL after the server's grace period.
    #[default]
    Kill,
    /// Leave it running; the server still reaps it.
    Detach,
}

/// A message from the server to a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// The answer to a matching `Hello`.
    Welcome {
        /// The protocol version the server speaks.
        protocol: u32,
        /// The server's package version.
        server_version: String,
        /// The server's pid.
        pid: u32,
        /// The modules the server preloaded.
        #[serde(default)]
        modules: Vec<ModuleInfo>,
        /// The embedded workers it offers by name (dynamic modules' symbols
        /// are found at spawn time as `MODULE:SYMBOL`).
        #[serde(default)]
        workers: Vec<String>,
        /// The limits this server enforces.
        limits: Limits,
        /// `modules` or `workers` were cut short to keep `welcome` within
        /// 65536 bytes (the size a client can read before it knows the
        /// limits); `status` has them all.
        #[serde(default)]
        truncated: bool,
    },
    /// The child started: for an exec target, `execve` succeeded.
    /// Attached fds, by the indexes named here: the child's pidfd, then the
    /// client's ends of the pipes it asked for.
    Spawned {
        /// The spawn request's id.
        id: u64,
        /// The child's pid.
        pid: u32,
        /// Index of the child's pidfd among the attached fds.
        pidfd: u32,
        /// Index of the write end of the child's stdin pipe, if piped.
        #[serde(default)]
        stdin: Option<u32>,
        /// Index of the read end of the child's stdout pipe, if piped.
        #[serde(default)]
        stdout: Option<u32>,
        /// Index of the read end of the child's stderr pipe, if piped.
        #[serde(default)]
        stderr: Option<u32>,
        /// Index of the master end of the child's terminal, if it asked
        /// for a `pty`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pty: Option<u32>,
    },
    /// The child could not be started. No `Exited` follows.
    SpawnFailed {
        /// The spawn request's id.
        id: u64,
        /// Which step failed.
        kind: ErrorKind,
        /// The OS error number, when the failure was an OS error.
        #[serde(default)]
        errno: Option<i32>,
        /// A sentence naming the problem.
        message: String,
    },
    /// A child that was `Spawned` has ended and been reaped.
    Exited {
        /// The spawn request's id.
        id: u64,
        /// The child's pid.
        pid: u32,
        /// How it ended.
        status: ChildStatus,
    },
    /// A `Signal` request was carried out.
    Signaled {
        /// The spawn request's id.
        id: u64,
        /// The signal sent.
        signal: i32,
    },
    /// The answer to `Status`.
    Status(StatusReport),
    /// The answer to `List`.
    Children {
        /// The list request's id.
        id: u64,
        /// The live children the peer may see: one page of them.
        children: Vec<ChildInfo>,
        /// More pages follow, with the same id; the last page says false.
        #[serde(default)]
        more: bool,
    },
    /// The answer to `Kill`: the pids signalled.
    Killed {
        /// The kill request's id.
        id: u64,
        /// Pids that were sent the signal: one page of them.
        pids: Vec<u32>,
        /// More pages follow, with the same id; the last page says false.
        #[serde(default)]
        more: bool,
    },
    /// The answer to `Reload`: the new generation serves.
    Reloaded {
        /// The reload request's id.
        id: u64,
        /// The new generation's number (the first is 1).
        generation: u64,
        /// The modules it preloaded, with their preload times.
        modules: Vec<ModuleInfo>,
    },
    /// The answer to `Upgrade`, from the new image: it serves.
    Upgraded {
        /// The upgrade request's id.
        id: u64,
        /// The new image's version (`CARGO_PKG_VERSION` of its server).
        version: String,
        /// The image's earlier version.
        previous: String,
        /// The new image's first generation.
        generation: u64,
    },
    /// A request, or the connection, failed.
    Error {
        /// The request's id, when the error is about one request.
        #[serde(default)]
        id: Option<u64>,
        /// What kind of failure.
        kind: ErrorKind,
        /// A sentence naming the problem and, where there is one, the remedy.
        message: String,
        /// True when the server closes the connection after this message.
        #[serde(default)]
        fatal: bool,
    },
}

/// A preloaded module, as `Welcome` and `Status` describe it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModuleInfo {
    /// Its name.
    pub name: String,
    /// Built into the server binary, or loaded from a shared library.
    pub kind: ModuleKind,
    /// How long its preload took, in milliseconds.
    pub preload_ms: f64,
}

/// Where a module comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModuleKind {
    /// Preloaded by a closure compiled into the server (`Server::builder()`).
    Embedded,
    /// A shared library loaded with `--module NAME=PATH.so`.
    Dylib,
    /// A kind this version does not know.
    #[serde(other)]
    Unknown,
}

/// The server's state, in reply to `Status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The status request's id.
    pub id: u64,
    /// The server's pid.
    pub pid: u32,
    /// The server's package version.
    pub server_version: String,
    /// Milliseconds since the server started.
    pub uptime_ms: u64,
    /// The server's resident set size, in bytes.
    pub rss_bytes: u64,
    /// Preloaded modules with their preload times.
    pub modules: Vec<ModuleInfo>,
    /// Embedded workers offered.
    pub workers: Vec<String>,
    /// Live children, all connections together.
    pub children: u32,
    /// Open connections.
    pub connections: u32,
    /// The socket it listens on.
    #[serde(default)]
    pub socket: String,
    /// Children started since the server started.
    #[serde(default)]
    pub spawns: u64,
    /// Spawn requests that failed since the server started.
    #[serde(default)]
    pub failures: u64,
    /// The prefork pools.
    #[serde(default)]
    pub pools: Vec<PoolInfo>,
    /// The zygote's pid: the copy of the server that preloads and forks
    /// the workers and the pools' children, if one is serving.
    #[serde(default)]
    pub zygote_pid: Option<u32>,
    /// The zygote's resident set size, in bytes (0 without one): where the
    /// preloads live.
    #[serde(default)]
    pub zygote_rss_bytes: u64,
    /// The zygote's generation: 1 for the first, one more for each reload
    /// or restart; 0 when the preloads ran in the server itself (it cannot
    /// reload: see `reload_failure`).
    #[serde(default)]
    pub generation: u64,
    /// Why the latest reload (or a zygote's restart) failed, if it did;
    /// cleared when a generation is ready.
    #[serde(default)]
    pub reload_failure: Option<String>,
    /// Preloaded files (dylibs, a Python server's modules) changed on disk
    /// since the serving generation loaded them: workers run the older
    /// version until a reload. At most 32, in order; `stale_count` counts
    /// them all.
    #[serde(default)]
    pub stale: Vec<String>,
    /// How many preloaded files changed on disk.
    #[serde(default)]
    pub stale_count: u32,
    /// `modules`, `workers` or `pools` were cut short to keep the reply
    /// within `max_message_bytes`.
    #[serde(default)]
    pub truncated: bool,
}

/// One worker's prefork pool, as `Status` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolInfo {
    /// The worker its children become.
    pub worker: String,
    /// How many idle children it keeps.
    pub size: u32,
    /// How many are idle now.
    pub idle: u32,
    /// How many of the idle ones have finished their warm-up and wait for a
    /// request (the others are still mapping code in or running the
    /// builder's prewarm; a request handed to one waits for that to end).
    #[serde(default)]
    pub ready: u32,
    /// Requests served by an idle child.
    pub hits: u64,
    /// Requests for this worker that found the pool empty (served by fork).
    pub misses: u64,
}

/// A live child, as `List` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildInfo {
    /// Its pid.
    pub pid: u32,
    /// The program or worker it runs.
    pub target: String,
    /// The pid of the client that spawned it.
    pub owner_pid: i32,
    /// The uid of the client that spawned it.
    pub owner_uid: u32,
    /// Whether that client is still connected.
    pub owner_connected: bool,
    /// Milliseconds since it was spawned.
    pub age_ms: u64,
    /// Whether it outlives its connection (`on_disconnect: detach`).
    pub detached: bool,
    /// Its cgroup v2 path (the `0::` line of /proc/PID/cgroup), if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
}

impl ServerMessage {
    /// The id of the request this message answers or is about, if it names
    /// one (`welcome` and an error about no request in particular do not).
    pub fn request_id(&self) -> Option<u64> {
        match self {
            ServerMessage::Spawned { id, .. }
            | ServerMessage::SpawnFailed { id, .. }
            | ServerMessage::Exited { id, .. }
            | ServerMessage::Signaled { id, .. }
            | ServerMessage::Children { id, .. }
            | ServerMessage::Killed { id, .. }
            | ServerMessage::Reloaded { id, .. }
            | ServerMessage::Upgraded { id, .. } => Some(*id),
            ServerMessage::Status(report) => Some(report.id),
            ServerMessage::Error { id, .. } => *id,
            ServerMessage::Welcome { .. } => None,
        }
    }
}

/// How a child ended, as `waitpid` reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ChildStatus {
    /// It exited with this code.
    Exited {
        /// The exit code (0..=255).
        code: i32,
    },
    /// It was killed by a signal.
    Signaled {
        /// The signal number.
        signal: i32,
        /// Whether it dumped core.
        core_dumped: bool,
    },
}

impl ChildStatus {
    /// The status in `waitpid`'s encoding, as
    /// `std::os::unix::process::ExitStatusExt::from_raw` expects.
    pub fn into_raw(self) -> i32 {
        match self {
            ChildStatus::Exited { code } => (code & 0xff) << 8,
            ChildStatus::Signaled {
                signal,
                core_dumped,
            } => (signal & 0x7f) | if core_dumped { 0x80 } else { 0 },
        }
    }
}

/// What went wrong, in `SpawnFailed` and `Error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The message could not be decoded, or came out of order.
    Protocol,
    /// The client's protocol version is not spoken here.
    Version,
    /// A field has a bad value; the message names the field.
    Invalid,
    /// A limit was exceeded; the message names the limit and the value.
    Limit,
    /// `execve` failed; `errno` says why.
    Exec,
    /// The child could not change to the requested directory.
    Chdir,
    /// Another step of the child's setup (dup2, setsid, …) failed.
    Setup,
    /// The server could not create the process or its pipes (EAGAIN, EMFILE…).
    Resource,
    /// The server is no longer single-threaded and refuses to fork.
    Threads,
    /// No live child with this id on this connection.
    NoSuchChild,
    /// The worker, module or symbol named is not offered by this server.
    UnknownWorker,
    /// The peer is not allowed to connect, or to ask for this.
    Denied,
    /// A kind this version does not know (sent by a newer peer).
    #[serde(other)]
    Unknown,
}

/// The limits a server enforces, sent in `Welcome`. Each is enforced with an
/// error naming it (`limit` kind); `forkserver serve --limit NAME=VALUE` sets
/// them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// Largest message, in bytes, either direction.
    pub max_message_bytes: u32,
    /// Most fds attached to one message.
    pub max_fds_per_message: u32,
    /// Most arguments in one spawn (argv\[0\] not counted); 0, the
    /// default, for no count of its own: `max_args_bytes` bounds them, as
    /// the kernel's byte limit bounds execve's.
    pub max_args: u32,
    /// Most bytes in one spawn's arguments, all together, each counted
    /// with its terminating NUL (as execve counts them).
    pub max_args_bytes: u32,
    /// Most entries in one spawn's `env`.
    pub max_env: u32,
    /// Most bytes in one spawn's `env` keys and values, all together.
    pub max_env_bytes: u32,
    /// Largest message sent as a `bulk` file, in bytes.
    pub max_bulk_bytes: u32,
    /// Most live children one connection may have.
    pub max_children_per_connection: u32,
    /// Most spawns of one connection whose start is not yet reported.
    pub max_pending_per_connection: u32,
    /// Most replies queued for a connection that is not reading; past this
    /// the connection is closed.
    pub max_queued_replies: u32,
    /// Most connections the server holds open at once.
    pub max_connections: u32,
    /// Most connections from one uid at once.
    pub max_connections_per_uid: u32,
    /// Most live children of one uid, over all its connections (detached
    /// ones included).
    pub max_children_per_uid: u32,
    /// Most of the server's fds one uid may hold: a pidfd per live child,
    /// the fds of its queued replies, its connections. 0 (the default)
    /// means a quarter of the server's own fd limit, so that one uid cannot
    /// leave the others without fds; `Welcome` gives the number in force.
    pub max_fds_per_uid: u32,
    /// Most bytes of replies queued for one uid's connections that are not
    /// reading, all together; past this the connection whose reply would
    /// not fit is closed.
    pub max_queued_bytes_per_uid: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 64 * 1024,
            max_fds_per_message: 64,
            max_args: 0,
            max_args_bytes: 2 << 20,
            max_env: 16384,
            max_env_bytes: 2 << 20,
            max_bulk_bytes: 5 << 20,
            max_children_per_connection: 1024,
            max_pending_per_connection: 64,
            max_queued_replies: 4096,
            max_connections: 256,
            max_connections_per_uid: 64,
            max_children_per_uid: 4096,
            max_fds_per_uid: 0,
            max_queued_bytes_per_uid: 8 << 20,
        }
    }
}

impl Limits {
    /// The limits' names, as in `Welcome` and `--limit NAME=VALUE`.
    pub const NAMES: [&'static str; 15] = [
        "max_message_bytes",
        "max_fds_per_message",
        "max_args",
        "max_args_bytes",
        "max_env",
        "max_env_bytes",
        "max_bulk_bytes",
        "max_children_per_connection",
        "max_pending_per_connection",
        "max_queued_replies",
        "max_connections",
        "max_connections_per_uid",
        "max_children_per_uid",
        "max_fds_per_uid",
        "max_queued_bytes_per_uid",
    ];

    /// Sets the limit called `name`; the error names the known limits.
    pub fn set(&mut self, name: &str, value: u32) -> Result<(), String> {
        let field = match name {
            "max_message_bytes" => &mut self.max_message_bytes,
            "max_fds_per_message" => &mut self.max_fds_per_message,
            "max_args" => &mut self.max_args,
            "max_args_bytes" => &mut self.max_args_bytes,
            "max_env" => &mut self.max_env,
            "max_env_bytes" => &mut self.max_env_bytes,
            "max_bulk_bytes" => &mut self.max_bulk_bytes,
            "max_children_per_connection" => &mut self.max_children_per_connection,
            "max_pending_per_connection" => &mut self.max_pending_per_connection,
            "max_queued_replies" => &mut self.max_queued_replies,
            "max_connections" => &mut self.max_connections,
            "max_connections_per_uid" => &mut self.max_connections_per_uid,
            "max_children_per_uid" => &mut self.max_children_per_uid,
            "max_fds_per_uid" => &mut self.max_fds_per_uid,
            "max_queued_bytes_per_uid" => &mut self.max_queued_bytes_per_uid,
            _ => {
                return Err(format!(
                    "unknown limit '{name}'; the limits are {}",
                    Limits::NAMES.join(", ")
                ))
            }
        };
        *field = value;
        Ok(())
    }
}
