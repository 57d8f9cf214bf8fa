//! The API socket and its thread, which multiplexes its connections
//! (non-blocking, poll) so that no client waits on another's silence.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::linux::fs::MetadataExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use seccompiler::BpfProgram;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::http::{closed_early, parse_request, Progress, Response, MAX_BODY, MAX_HEAD};
use super::{handle, Action, ActionError, ActionRequest, VmStatus};
use crate::seccomp::{self, SeccompError, ThreadKind};

/// How long a client may take to send its request, and again to read the
/// answer: a silent or slow client holds one of the connection slots for
/// at most that long (and never blocks the others).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more wait in the listening socket's backlog
/// until one ends (each ends within [`CLIENT_TIMEOUT`] per phase), so a
/// crowd of idle clients costs bounded memory and no thread.
const MAX_CONNECTIONS: usize = 16;

/// How long clients may take and how many may be connected at once.
#[derive(Debug, Clone, Copy)]
struct Limits {
    client_timeout: Duration,
    max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            client_timeout: CLIENT_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
        }
    }
}
/// After refusing a request: how much of the rest we read and drop, and
/// how long we wait for more of it.
const DRAIN_LIMIT: usize = 1 << 20;
const DRAIN_TIMEOUT: Duration = Duration::from_millis(200);
/// How long the API thread waits for the main thread to carry out an
/// action (pausing waits for every vCPU to leave the guest).
const ACTION_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("--api-socket {0}: another process is listening there")]
    InUse(PathBuf),
    #[error("--api-socket {0}: exists and is not a socket; remove it or choose another path")]
    NotASocket(PathBuf),
    #[error("--api-socket {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
}

/// The bound socket. Its file is removed when this is dropped, if it is
/// still the one we created.
pub struct ApiListener {
    listener: UnixListener,
    path: PathBuf,
    /// (device, inode) of the socket file we created.
    identity: (u64, u64),
}

impl ApiListener {
    /// What [`ApiListener::bind`] would refuse, found without binding:
    /// for checking the command line before anything is opened. Ok(true):
    /// a stale socket is there (nobody listens), which bind replaces.
    pub fn check(path: &Path) -> Result<bool, ApiError> {
        let io = |what| {
            let path = path.to_path_buf();
            move |source| ApiError::Io { path, what, source }
        };
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                Err(ApiError::NotASocket(path.to_path_buf()))
            }
            Ok(_) => match UnixStream::connect(path) {
                Ok(_) => Err(ApiError::InUse(path.to_path_buf())),
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => Ok(true),
                Err(e) => Err(io("cannot check the existing socket")(e)),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let dir = match path.parent() {
                    Some(dir) if !dir.as_os_str().is_empty() => dir,
                    _ => Path::new("."),
                };
                match std::fs::metadata(dir) {
                    Ok(meta) if meta.is_dir() => Ok(false),
                    Ok(_) => Err(io("cannot bind")(std::io::Error::from_raw_os_error(
                        libc::ENOTDIR,
                    ))),
                    Err(e) => Err(io("cannot bind")(e)),
                }
            }
            Err(e) => Err(io("cannot check the path")(e)),
        }
    }

    /// Binds `path` with mode 0600. An existing file there is an error,
    /// unless it is a socket nobody listens on any more (a stale socket
    /// of an xskvm that was killed), which is replaced. Call it before
    /// any thread starts: it changes the process's umask for the bind.
    pub fn bind(path: &Path) -> Result<Self, ApiError> {
        let io = |what| {
            let path = path.to_path_buf();
            move |source| ApiError::Io { path, what, source }
        };
        if Self::check(path)? {
            log::info!("--api-socket {}: replacing a stale socket", path.display());
            std::fs::remove_file(path).map_err(io("cannot remove the stale socket"))?;
        }
        // The socket file gets 0777 & ~umask: with 0177 it is never, even
        // for a moment, open to other users.
        // SAFETY: umask only swaps the process's mask; no memory involved.
        let old = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above, restoring the previous mask.
        unsafe { libc::umask(old) };
        let listener = bound.map_err(io("cannot bind"))?;
        let meta = std::fs::symlink_metadata(path).map_err(io("cannot stat the new socket"))?;
        let this = Self {
            listener,
            path: path.to_path_buf(),
            identity: (meta.st_dev(), meta.st_ino()),
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(io("cannot set the socket's mode"))?;
        this.listener
            .set_nonblocking(true)
            .map_err(io("cannot make the socket non-blocking"))?;
        Ok(this)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ApiListener {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| (m.st_dev(), m.st_ino()) == self.identity);
        if ours {
            if let Err(e) = std::fs::remove_file(&self.path) {
                log::warn!("cannot remove {}: {e}", self.path.display());
            }
        }
    }
}

/// The running API thread; dropping it stops the thread (after the
/// request it is serving) and removes the socket file.
pub struct ApiServer {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Starts `xskvm-api`, which installs `filter` first. Actions go to
    /// `actions`, with a write to `wake` to get the main thread's attention.
    pub fn start(
        listener: ApiListener,
        status: Arc<VmStatus>,
        actions: mpsc::Sender<ActionRequest>,
        wake: EventFd,
        filter: Option<Arc<BpfProgram>>,
    ) -> Result<Self, SeccompError> {
        Self::start_with(listener, status, actions, wake, filter, Limits::default())
    }

    fn start_with(
        listener: ApiListener,
        status: Arc<VmStatus>,
        actions: mpsc::Sender<ActionRequest>,
        wake: EventFd,
        filter: Option<Arc<BpfProgram>>,
        limits: Limits,
    ) -> Result<Self, SeccompError> {
        let spawn_error = |source| SeccompError::Spawn {
            name: "xskvm-api".into(),
            source,
        };
        let stop = EventFd::new(EFD_NONBLOCK).map_err(spawn_error)?;
        let theirs = stop.try_clone().map_err(spawn_error)?;
        let thread = seccomp::spawn_filtered("xskvm-api".into(), ThreadKind::Api, filter, {
            move || serve(listener, &status, &actions, &wake, &theirs, limits)
        })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Err(e) = self.stop.write(1) {
            log::error!("cannot stop the API thread: {e}");
            return;
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("the API thread panicked");
            }
        }
    }
}

/// What the API thread serves with: the VM's shared state, and the way
/// to the main thread for actions.
struct Context<'a> {
    status: &'a VmStatus,
    actions: &'a mpsc::Sender<ActionRequest>,
    wake: &'a EventFd,
    client_timeout: Duration,
}

/// One client, from accept to close, driven by readiness (the socket is
/// non-blocking): the API thread multiplexes every connection with poll.
struct Connection {
    stream: UnixStream,
    phase: Phase,
    /// When the current phase gives up.
    deadline: Instant,
}

enum Phase {
    /// Collecting the request.
    Reading {
        received: Vec<u8>,
    },
    /// Sending the answer; then, after a refusal, draining what the
    /// client still sends (closing at once would make its writes fail
    /// before it reads our answer).
    Writing {
        out: Vec<u8>,
        written: usize,
        drain_after: bool,
    },
    Draining {
        drained: usize,
    },
    Closed,
}

impl Connection {
    fn new(stream: UnixStream, now: Instant, context: &Context<'_>) -> Self {
        Self {
            stream,
            phase: Phase::Reading {
                received: Vec::new(),
            },
            deadline: now + context.client_timeout,
        }
    }

    /// The poll events this connection waits for.
    fn interest(&self) -> libc::c_short {
        match self.phase {
            Phase::Writing { .. } => libc::POLLOUT,
            _ => libc::POLLIN,
        }
    }

    fn closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    fn answer(&mut self, response: &Response, drain_after: bool, deadline: Instant) {
        self.phase = Phase::Writing {
            out: response.to_bytes(),
            written: 0,
            drain_after,
        };
        self.deadline = deadline;
    }

    /// Its deadline passed: a request not sent in time gets 408 (after
    /// reading what did arrive: the main thread may have held this thread
    /// up); an answer not taken in time, or a drain, ends.
    fn expire(&mut self, context: &Context<'_>, now: Instant) {
        if let Phase::Reading { .. } = self.phase {
            self.advance(context, now);
            if let Phase::Reading { .. } = self.phase {
                log::debug!(
                    "API: no complete request within {:?}",
                    context.client_timeout
                );
                let response = Response::error(
                    408,
                    format!("no complete request within {:?}", context.client_timeout),
                );
                self.answer(&response, false, now + context.client_timeout);
            }
        } else {
            self.phase = Phase::Closed;
        }
        self.advance(context, now);
    }

    /// The socket is ready (or failed): moves the connection on as far
    /// as it can without blocking.
    fn advance(&mut self, context: &Context<'_>, now: Instant) {
        loop {
            let before = std::mem::discriminant(&self.phase);
            match &mut self.phase {
                Phase::Reading { received } => match read_some(&mut self.stream, received) {
                    Ok(None) => return,
                    Ok(Some(eof)) => {
                        let result = parse_request(received).and_then(|progress| match progress {
                            Progress::Done(request) => Ok(Some(request)),
                            _ if eof => Err(closed_early(received.len(), &progress)),
                            _ => Ok(None),
                        });
                        match result {
                            Ok(None) => return,
                            Ok(Some(request)) => {
                                log::debug!("API: {} {}", request.method, request.path);
                                let response = handle(&request, context.status, &mut |action| {
                                    ask_main_thread(action, context.actions, context.wake)
                                });
                                let now = Instant::now();
                                self.answer(&response, false, now + context.client_timeout);
                            }
                            Err(e) => match e.status() {
                                Some(code) => self.answer(
                                    &Response::error(code, &e),
                                    !eof,
                                    now + context.client_timeout,
                                ),
                                None => self.phase = Phase::Closed,
                            },
                        }
                    }
                    Err(_) => self.phase = Phase::Closed,
                },
                Phase::Writing {
                    out,
                    written,
                    drain_after,
                } => {
                    match std::io::Write::write(&mut self.stream, &out[*written..]) {
                        Ok(n) => *written += n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            devices::warn_ratelimited!("API socket: cannot answer: {e}");
                            self.phase = Phase::Closed;
                            return;
                        }
                    }
                    if *written == out.len() {
                        if *drain_after {
                            self.phase = Phase::Draining { drained: 0 };
                            self.deadline = now + DRAIN_TIMEOUT;
                        } else {
                            self.phase = Phase::Closed;
                        }
                    }
                }
                Phase::Draining { drained } => {
                    let mut buf = [0u8; 4096];
                    match std::io::Read::read(&mut self.stream, &mut buf) {
                        Ok(0) => self.phase = Phase::Closed,
                        Ok(n) => {
                            *drained += n;
                            // More came: wait a while for the rest.
                            self.deadline = now + DRAIN_TIMEOUT;
                            if *drained >= DRAIN_LIMIT {
                                self.phase = Phase::Closed;
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => self.phase = Phase::Closed,
                    }
                }
                Phase::Closed => return,
            }
            // A phase that ends or changes may have more to do at once
            // (an answer to write); one that stays waits for readiness.
            if std::mem::discriminant(&self.phase) == before
                && !matches!(self.phase, Phase::Draining { .. } | Phase::Writing { .. })
            {
                return;
            }
        }
    }
}

/// Appends what the client sent to `received` without blocking, up to a
/// bound past which the parser has refused the request anyway. `None`: no
/// more for now; `Some(eof)`: something changed (bytes, or the end).
fn read_some(stream: &mut UnixStream, received: &mut Vec<u8>) -> std::io::Result<Option<bool>> {
    let mut chunk = [0u8; 4096];
    let room = (MAX_HEAD + MAX_BODY + 1)
        .saturating_sub(received.len())
        .max(1);
    let want = room.min(chunk.len());
    loop {
        match std::io::Read::read(stream, &mut chunk[..want]) {
            Ok(0) => return Ok(Some(true)),
            Ok(n) => {
                received.extend_from_slice(&chunk[..n]);
                return Ok(Some(false));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Accepts one pending connection, non-blocking from the start (accept4:
/// no fcntl/ioctl afterwards, which the API filter does not allow).
/// `Ok(None)`: none pending.
fn accept(listener: &UnixListener) -> std::io::Result<Option<UnixStream>> {
    loop {
        // SAFETY: a listening socket we own; null address pointers are
        // allowed (we do not want the peer's address).
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            )
        };
        if fd >= 0 {
            // SAFETY: accept4 returned a new descriptor that nothing else owns.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            return Ok(Some(UnixStream::from(owned)));
        }
        let e = std::io::Error::last_os_error();
        match e.kind() {
            std::io::ErrorKind::WouldBlock => return Ok(None),
            std::io::ErrorKind::Interrupted => {}
            _ => return Err(e),
        }
    }
}

/// Accepts and answers connections, up to [`MAX_CONNECTIONS`] at once,
/// until `stop`.
fn serve(
    listener: ApiListener,
    status: &VmStatus,
    actions: &mpsc::Sender<ActionRequest>,
    wake: &EventFd,
    stop: &EventFd,
    limits: Limits,
) {
    let context = Context {
        status,
        actions,
        wake,
        client_timeout: limits.client_timeout,
    };
    let mut connections: Vec<Connection> = Vec::new();
    let mut accept_paused_until = None;
    loop {
        let now = Instant::now();
        for connection in &mut connections {
            if now >= connection.deadline {
                connection.expire(&context, now);
            }
        }
        connections.retain(|c| !c.closed());
        if accept_paused_until.is_some_and(|until| now >= until) {
            accept_paused_until = None;
        }
        let next_deadline = connections
            .iter()
            .map(|c| c.deadline)
            .chain(accept_paused_until)
            .min();
        let timeout = match next_deadline {
            // Rounded up, so the wait does not end just before it.
            Some(deadline) => {
                i32::try_from(deadline.saturating_duration_since(now).as_millis() + 1)
                    .unwrap_or(i32::MAX)
            }
            None => -1,
        };
        // At the cap (or after a failed accept), newcomers wait in the
        // backlog: leaving the listener out keeps poll from spinning on it.
        let listen_events =
            if accept_paused_until.is_none() && connections.len() < limits.max_connections {
                libc::POLLIN
            } else {
                0
            };
        let mut fds: Vec<libc::pollfd> = [
            (stop.as_raw_fd(), libc::POLLIN),
            (listener.listener.as_raw_fd(), listen_events),
        ]
        .into_iter()
        .chain(
            connections
                .iter()
                .map(|c| (c.stream.as_raw_fd(), c.interest())),
        )
        .map(|(fd, events)| libc::pollfd {
            fd,
            events,
            revents: 0,
        })
        .collect();
        // SAFETY: `fds` is a valid array of fds.len() pollfds for the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("API socket: poll: {e}; the API stops");
            return;
        }
        if fds[0].revents != 0 {
            return;
        }
        let now = Instant::now();
        for (connection, fd) in connections.iter_mut().zip(&fds[2..]) {
            if fd.revents != 0 {
                connection.advance(&context, now);
            }
        }
        connections.retain(|c| !c.closed());
        if fds[1].revents != 0 {
            let max = limits.max_connections;
            if let Err(e) = accept_pending(&listener, &mut connections, max, &context, now) {
                devices::warn_ratelimited!("API socket: accept: {e}");
                // E.g. EMFILE: do not spin on a socket that stays readable.
                accept_paused_until = Some(now + Duration::from_millis(100));
            }
        }
    }
}

/// Takes pending connections up to `max` open ones.
fn accept_pending(
    listener: &ApiListener,
    connections: &mut Vec<Connection>,
    max: usize,
    context: &Context<'_>,
    now: Instant,
) -> std::io::Result<()> {
    while connections.len() < max {
        let Some(stream) = accept(&listener.listener)? else {
            break;
        };
        let mut connection = Connection::new(stream, now, context);
        // It may have sent its request already.
        connection.advance(context, now);
        if !connection.closed() {
            connections.push(connection);
        }
    }
    Ok(())
}

fn ask_main_thread(
    action: Action,
    actions: &mpsc::Sender<ActionRequest>,
    wake: &EventFd,
) -> Result<(), ActionError> {
    let stopping = || ActionError::Conflict("the VM is stopping".into());
    let (reply, answer) = mpsc::channel();
    actions
        .send(ActionRequest { action, reply })
        .map_err(|_| stopping())?;
    wake.write(1)
        .map_err(|e| ActionError::Failed(format!("cannot wake the main thread: {e}")))?;
    match answer.recv_timeout(ACTION_TIMEOUT) {
        Ok(result) => result,
        Err(mpsc::RecvTimeoutError::Disconnected) => Err(stopping()),
        Err(mpsc::RecvTimeoutError::Timeout) => Err(ActionError::Failed(format!(
            "the main thread did not answer in {ACTION_TIMEOUT:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("xskvm-api-{tag}-{}", std::process::id()))
    }

    #[test]
    fn socket_is_0600_and_removed_when_dropped() {
        let path = temp_path("mode");
        let _ = std::fs::remove_file(&path);
        let listener = ApiListener::bind(&path).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // A second xskvm on the same path is refused while this one listens.
        assert!(matches!(ApiListener::bind(&path), Err(ApiError::InUse(_))));
        drop(listener);
        assert!(!path.exists());
    }

    #[test]
    fn a_stale_socket_is_replaced_and_other_files_refused() {
        let path = temp_path("stale");
        let _ = std::fs::remove_file(&path);
        // Bound and closed without removing: what a killed xskvm leaves.
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let listener = ApiListener::bind(&path).unwrap();
        drop(listener);
        std::fs::write(&path, b"not a socket").unwrap();
        assert!(matches!(
            ApiListener::bind(&path),
            Err(ApiError::NotASocket(_))
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
        std::fs::remove_file(&path).unwrap();
        let missing_dir = temp_path("nodir").join("api.sock");
        assert!(matches!(
            ApiListener::bind(&missing_dir),
            Err(ApiError::Io { .. })
        ));
    }

    /// An API thread on a fresh socket, with `limits` and no VM behind
    /// it (actions are queued and never answered).
    struct Served {
        path: PathBuf,
        _server: ApiServer,
        wake: EventFd,
        _requests: mpsc::Receiver<ActionRequest>,
    }

    fn serve_with(tag: &str, limits: Limits) -> Served {
        let path = temp_path(tag);
        let _ = std::fs::remove_file(&path);
        let listener = ApiListener::bind(&path).unwrap();
        let status = Arc::new(VmStatus::new(
            "t".into(),
            1 << 30,
            "/k".into(),
            Vec::new(),
            Vec::new(),
        ));
        let (actions, requests) = mpsc::channel();
        let wake = EventFd::new(EFD_NONBLOCK).unwrap();
        let server = ApiServer::start_with(
            listener,
            status,
            actions,
            wake.try_clone().unwrap(),
            None,
            limits,
        )
        .unwrap();
        Served {
            path,
            _server: server,
            wake,
            _requests: requests,
        }
    }

    impl Served {
        fn connect(&self) -> UnixStream {
            let stream = UnixStream::connect(&self.path).unwrap();
            // A test that hangs fails instead.
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            stream
        }

        /// Sends `raw` on a new connection and returns the whole answer.
        fn ask(&self, raw: &[u8]) -> String {
            use std::io::{Read, Write};
            let mut stream = self.connect();
            stream.write_all(raw).unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).unwrap();
            answer
        }
    }

    const INFO: &[u8] = b"GET /api/v1/vm.info HTTP/1.1\r\nHost: x\r\n\r\n";

    #[test]
    fn a_silent_client_does_not_block_another() {
        use std::io::{Read, Write};
        let served = serve_with("silent", Limits::default());
        let silent = served.connect();
        // And one that stops half-way through its head.
        let mut halfway = served.connect();
        halfway.write_all(b"GET /api/v1/vm.in").unwrap();
        let started = Instant::now();
        let answer = served.ask(INFO);
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        assert!(
            started.elapsed() < CLIENT_TIMEOUT,
            "answered only after {:?}",
            started.elapsed()
        );
        // Both are still connected, waiting; the half-sent one can finish.
        halfway.write_all(b"fo HTTP/1.1\r\n\r\n").unwrap();
        let mut answer = String::new();
        halfway.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        drop(silent);
    }

    #[test]
    fn idle_clients_time_out_and_past_the_cap_clients_wait_their_turn() {
        use std::io::Read;
        let timeout = Duration::from_millis(300);
        let limits = Limits {
            client_timeout: timeout,
            max_connections: 2,
        };
        let served = serve_with("cap", limits);
        let started = Instant::now();
        let mut idle: Vec<UnixStream> = (0..2).map(|_| served.connect()).collect();
        // Give the API thread time to accept both.
        std::thread::sleep(Duration::from_millis(50));
        // A third waits in the backlog until a slot frees.
        let answer = served.ask(INFO);
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        assert!(started.elapsed() >= timeout, "served past the cap");
        for stream in &mut idle {
            let mut answer = String::new();
            stream.read_to_string(&mut answer).unwrap();
            assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
        }
        let waited = started.elapsed();
        assert!(
            waited < Duration::from_secs(3),
            "timed out after {waited:?}"
        );
    }

    #[test]
    fn an_oversized_body_gets_413_while_the_client_still_sends_it() {
        use std::io::{Read, Write};
        let served = serve_with("big", Limits::default());
        let mut client = served.connect();
        let body = vec![b'x'; 300 * 1024];
        let head = format!(
            "PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        client.write_all(head.as_bytes()).unwrap();
        // More than a socket buffer: fails if the server hangs up early.
        client.write_all(&body).unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
        assert!(
            served.wake.read().is_err(),
            "nothing reached the main thread"
        );
    }

    #[test]
    fn a_request_sent_with_the_connection_gets_its_answer() {
        // Sent and half-closed before the API thread even accepts it.
        use std::io::{Read, Write};
        let served = serve_with("eager", Limits::default());
        let mut client = served.connect();
        client.write_all(INFO).unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        let mut client = served.connect();
        client
            .write_all(b"GET /api/v1/vm.info HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 400 "),
            "closed mid-head: {answer}"
        );
    }

    #[test]
    fn a_socket_replaced_by_someone_else_is_left_alone() {
        let path = temp_path("replaced");
        let _ = std::fs::remove_file(&path);
        let listener = ApiListener::bind(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let other = UnixListener::bind(&path).unwrap();
        drop(listener);
        assert!(path.exists(), "not ours to remove");
        drop(other);
        std::fs::remove_file(&path).unwrap();
    }
}
