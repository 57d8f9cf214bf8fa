//! The API socket and its thread.

use std::os::fd::AsRawFd;
use std::os::linux::fs::MetadataExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use seccompiler::BpfProgram;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::http::{read_request, Response};
use super::{handle, Action, ActionError, ActionRequest, VmStatus};
use crate::seccomp::{self, SeccompError, ThreadKind};

/// How long a client may take to send its request or read the answer:
/// one connection is served at a time, so a stuck client must not hold
/// the socket for long.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
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
    /// Binds `path` with mode 0600. An existing file there is an error,
    /// unless it is a socket nobody listens on any more (a stale socket
    /// of an xskvm that was killed), which is replaced. Call it before
    /// any thread starts: it changes the process's umask for the bind.
    pub fn bind(path: &Path) -> Result<Self, ApiError> {
        let io = |what| {
            let path = path.to_path_buf();
            move |source| ApiError::Io { path, what, source }
        };
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(ApiError::NotASocket(path.to_path_buf()))
            }
            Ok(_) => match UnixStream::connect(path) {
                Ok(_) => return Err(ApiError::InUse(path.to_path_buf())),
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                    log::info!("--api-socket {}: replacing a stale socket", path.display());
                    std::fs::remove_file(path).map_err(io("cannot remove the stale socket"))?;
                }
                Err(e) => return Err(io("cannot check the existing socket")(e)),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("cannot check the path")(e)),
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
        let spawn_error = |source| SeccompError::Spawn {
            name: "xskvm-api".into(),
            source,
        };
        let stop = EventFd::new(EFD_NONBLOCK).map_err(spawn_error)?;
        let theirs = stop.try_clone().map_err(spawn_error)?;
        let thread = seccomp::spawn_filtered("xskvm-api".into(), ThreadKind::Api, filter, {
            move || serve(listener, &status, &actions, &wake, &theirs)
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

/// Accepts and answers connections, one at a time, until `stop`.
fn serve(
    listener: ApiListener,
    status: &VmStatus,
    actions: &mpsc::Sender<ActionRequest>,
    wake: &EventFd,
    stop: &EventFd,
) {
    loop {
        match crate::wait::until_work_or_stop(listener.listener.as_raw_fd(), stop.as_raw_fd()) {
            Ok(false) => {}
            Ok(true) => return,
            Err(e) => {
                log::error!("API socket: poll: {e}; the API stops");
                return;
            }
        }
        match listener.listener.accept() {
            Ok((stream, _)) => serve_connection(stream, status, actions, wake),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                devices::warn_ratelimited!("API socket: accept: {e}");
                // E.g. EMFILE: do not spin on a socket that stays readable.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn serve_connection(
    mut stream: UnixStream,
    status: &VmStatus,
    actions: &mpsc::Sender<ActionRequest>,
    wake: &EventFd,
) {
    if let Err(e) = stream
        .set_read_timeout(Some(CLIENT_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(CLIENT_TIMEOUT)))
    {
        devices::warn_ratelimited!("API socket: cannot set timeouts: {e}");
        return;
    }
    let response = match read_request(&mut stream) {
        Ok(request) => {
            log::debug!("API: {} {}", request.method, request.path);
            handle(&request, status, &mut |action| {
                ask_main_thread(action, actions, wake)
            })
        }
        Err(e) => match e.status() {
            Some(code) => {
                let response = Response::error(code, &e);
                if let Err(e) = response.write_to(&mut stream) {
                    devices::warn_ratelimited!("API socket: cannot answer: {e}");
                }
                // The client may still be sending what we refused (a body
                // too large): closing now would make its writes fail
                // before it reads our answer.
                drain(&mut stream);
                return;
            }
            None => return,
        },
    };
    if let Err(e) = response.write_to(&mut stream) {
        devices::warn_ratelimited!("API socket: cannot answer: {e}");
    }
}

/// Reads and discards what the client still sends, up to [`DRAIN_LIMIT`]
/// bytes and as long as it keeps sending within [`DRAIN_TIMEOUT`].
fn drain(stream: &mut UnixStream) {
    if stream.set_read_timeout(Some(DRAIN_TIMEOUT)).is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    let mut total = 0;
    while total < DRAIN_LIMIT {
        match std::io::Read::read(stream, &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => total += n,
        }
    }
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

    #[test]
    fn an_oversized_body_gets_413_while_the_client_still_sends_it() {
        use std::io::{Read, Write};
        let (client, server) = UnixStream::pair().unwrap();
        let status = VmStatus::new("t".into(), 1 << 30, "/k".into(), Vec::new(), Vec::new());
        let (actions, _requests) = mpsc::channel();
        let wake = EventFd::new(EFD_NONBLOCK).unwrap();
        let client = std::thread::spawn(move || {
            let mut client = client;
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
            answer
        });
        serve_connection(server, &status, &actions, &wake);
        let answer = client.join().unwrap();
        assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
        assert!(wake.read().is_err(), "nothing reached the main thread");
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
