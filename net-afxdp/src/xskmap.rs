//! `map-path=`: an XSKMAP pinned in bpffs by someone else's XDP program.
//! xskvm opens it by path (BPF_OBJ_GET, which needs only file access to
//! the pin on Linux 6.5 and later, also with
//! `kernel.unprivileged_bpf_disabled`), puts its bound sockets at their
//! keys, and takes them out again when the NIC goes.

use std::ffi::CString;
use std::io;
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::error::{Error, Result};

/// The pinned map and the keys we filled. It keeps a duplicate of each
/// socket it inserted, so that no socket of ours can close (and the
/// kernel drop it from the map) before [`Drop`] has deleted our keys: a
/// key emptied earlier could already hold another VM's socket.
#[derive(Debug)]
pub(crate) struct PinnedXskMap {
    fd: OwnedFd,
    path: String,
    inserted: Vec<(u32, OwnedFd)>,
}

fn errno(ret: i32) -> io::Error {
    io::Error::from_raw_os_error(ret.checked_neg().filter(|&e| e > 0).unwrap_or(libc::EIO))
}

impl PinnedXskMap {
    /// Opens the XSKMAP pinned at `path` and checks that `keys` fit in it.
    pub(crate) fn open(path: &str, keys: Range<u32>) -> Result<PinnedXskMap> {
        let c_path = CString::new(path).map_err(|_| Error::MapNotFound {
            path: path.to_string(),
        })?;
        // SAFETY: c_path is NUL-terminated; a returned fd is owned below.
        let fd = unsafe { libbpf_sys::bpf_obj_get(c_path.as_ptr()) };
        if fd < 0 {
            let source = errno(fd);
            return Err(match source.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::ENOTDIR) => Error::MapNotFound {
                    path: path.to_string(),
                },
                // EACCES also comes for a file outside bpffs.
                _ => Error::MapAccess {
                    path: path.to_string(),
                    source,
                },
            });
        }
        // SAFETY: bpf_obj_get returned a new fd that we now own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: all-zero is a valid bpf_map_info.
        let mut info: libbpf_sys::bpf_map_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libbpf_sys::bpf_map_info>() as u32;
        // SAFETY: info is writable for len bytes.
        let ret =
            unsafe { libbpf_sys::bpf_map_get_info_by_fd(fd.as_raw_fd(), &mut info, &mut len) };
        if ret != 0 {
            return Err(Error::NotXskMap {
                path: path.to_string(),
                what: format!("not a BPF map: {}", errno(ret)),
            });
        }
        if info.type_ != libbpf_sys::BPF_MAP_TYPE_XSKMAP {
            return Err(Error::NotXskMap {
                path: path.to_string(),
                what: format!("a BPF map of type {}", info.type_),
            });
        }
        if keys.end > info.max_entries {
            return Err(Error::MapTooSmall {
                path: path.to_string(),
                max_entries: info.max_entries,
                keys,
            });
        }
        Ok(PinnedXskMap {
            fd,
            path: path.to_string(),
            inserted: Vec::new(),
        })
    }

    /// Puts `socket` (bound) at `key`; refuses a key that holds a socket
    /// already rather than take another user's queue.
    pub(crate) fn insert(&mut self, key: u32, socket: BorrowedFd<'_>) -> Result<()> {
        let keep = socket.try_clone_to_owned().map_err(|source| Error::Io {
            op: "duplicating a socket for map-path",
            source,
        })?;
        let value = socket.as_raw_fd() as u32;
        // SAFETY: an XSKMAP (checked at open) with 4-byte keys and values;
        // both point to live u32s.
        let ret = unsafe {
            libbpf_sys::bpf_map_update_elem(
                self.fd.as_raw_fd(),
                (&key as *const u32).cast(),
                (&value as *const u32).cast(),
                libbpf_sys::BPF_NOEXIST as u64,
            )
        };
        if ret < 0 {
            let source = errno(ret);
            return Err(match source.raw_os_error() {
                Some(libc::EEXIST) => Error::MapKeyBusy {
                    path: self.path.clone(),
                    key,
                },
                Some(libc::EPERM) | Some(libc::EACCES) => Error::MapAccess {
                    path: self.path.clone(),
                    source,
                },
                _ => Error::Io {
                    op: "adding a socket to the map-path XSKMAP",
                    source,
                },
            });
        }
        self.inserted.push((key, keep));
        Ok(())
    }

    pub(crate) fn path(&self) -> &str {
        &self.path
    }
}

impl Drop for PinnedXskMap {
    fn drop(&mut self) {
        for (key, _socket) in &self.inserted {
            // SAFETY: a live u32 key of this XSKMAP.
            let ret = unsafe {
                libbpf_sys::bpf_map_delete_elem(
                    self.fd.as_fd().as_raw_fd(),
                    (key as *const u32).cast(),
                )
            };
            if ret < 0 && errno(ret).raw_os_error() != Some(libc::ENOENT) {
                log::warn!(
                    "af-xdp: cannot remove key {key} from {}: {}",
                    self.path,
                    errno(ret)
                );
            }
        }
        if !self.inserted.is_empty() {
            log::info!(
                "af-xdp: removed {} socket(s) from {}",
                self.inserted.len(),
                self.path
            );
        }
        // The socket duplicates close after the keys are gone.
    }
}
