//! Least privilege: once everything that needs privilege is set up (NICs
//! opened, sockets bound, UMEMs registered, programs attached, /dev/kvm
//! open, guest memory mapped) and before the guest runs, xskvm gives up
//! its capabilities and sets `PR_SET_NO_NEW_PRIVS`.
//!
//! Capabilities belong to threads, and a thread starts with its creator's.
//! So [`restrict`] runs on the main thread before it starts any other; the
//! NIC watcher, the only thread that may need privilege later (to open a
//! NIC again when its interface is deleted and created again), is started
//! next, and then the main thread drops what it kept for the watcher: every
//! other thread (vCPUs, IO threads, console, API) starts with none.

/// `--capabilities`: what xskvm keeps once the guest runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CapabilityMode {
    /// `net` when xskvm opened a NIC itself (so it can open it again),
    /// otherwise `none`.
    #[default]
    Auto,
    /// Nothing: effective, permitted, inheritable and ambient sets empty,
    /// bounding set emptied. A NIC whose interface is deleted and created
    /// again cannot be reopened (its guest keeps the link down).
    None,
    /// Only what reopening a NIC takes (CAP_NET_ADMIN, CAP_NET_RAW,
    /// CAP_IPC_LOCK, CAP_PERFMON, CAP_BPF), held by the NIC watcher thread
    /// alone; every other thread holds none.
    Net,
    /// Leave the capabilities as they are (debugging only).
    Keep,
}

/// Why dropping capabilities failed.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("cannot read this thread's capabilities: {0}")]
    Get(std::io::Error),
    #[error("cannot drop capabilities: {0}")]
    Set(std::io::Error),
    #[error("cannot set PR_SET_NO_NEW_PRIVS: {0}")]
    NoNewPrivs(std::io::Error),
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `_LINUX_CAPABILITY_VERSION_3`: 64 capabilities in two words.
const CAP_VERSION_3: u32 = 0x2008_0522;
const CAP_SETPCAP: u32 = 8;

/// A set of capabilities as a 64-bit mask (bit n = capability n).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CapSet(pub u64);

impl CapSet {
    pub fn of(caps: &[u32]) -> CapSet {
        CapSet(caps.iter().fold(0, |m, &c| m | (1u64 << c)))
    }

    pub fn contains(self, cap: u32) -> bool {
        cap < 64 && self.0 & (1u64 << cap) != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// The calling thread's (effective, permitted) sets.
fn get() -> Result<(CapSet, CapSet), PrivilegeError> {
    let header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: a v3 header and a two-element array, as capget(2) expects.
    let ret = unsafe { libc::syscall(libc::SYS_capget, &header, data.as_mut_ptr()) };
    if ret != 0 {
        return Err(PrivilegeError::Get(std::io::Error::last_os_error()));
    }
    let join = |lo: u32, hi: u32| CapSet(u64::from(lo) | (u64::from(hi) << 32));
    Ok((
        join(data[0].effective, data[1].effective),
        join(data[0].permitted, data[1].permitted),
    ))
}

/// Sets the calling thread's effective and permitted sets to `keep` (as
/// far as it holds them) and its inheritable set to nothing.
fn set(keep: CapSet) -> Result<(), PrivilegeError> {
    let (_, permitted) = get()?;
    let mask = keep.0 & permitted.0;
    let (lo, hi) = (mask as u32, (mask >> 32) as u32);
    let data = [
        CapData {
            effective: lo,
            permitted: lo,
            inheritable: 0,
        },
        CapData {
            effective: hi,
            permitted: hi,
            inheritable: 0,
        },
    ];
    let header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    // SAFETY: a v3 header and a two-element array, as capset(2) expects.
    let ret = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    if ret != 0 {
        return Err(PrivilegeError::Set(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Drops every capability outside `keep` from the calling thread's
/// bounding set; stops (and says so) where CAP_SETPCAP is missing, as for
/// an unprivileged xskvm whose helper emptied it already.
fn limit_bounding_set(keep: CapSet) {
    let mut left = 0;
    for cap in 0..64u32 {
        if keep.contains(cap) {
            continue;
        }
        // SAFETY: PR_CAPBSET_READ only reads; EINVAL past the last capability.
        let held = unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong, 0, 0, 0) };
        if held < 0 {
            break;
        }
        if held == 0 {
            continue;
        }
        // SAFETY: PR_CAPBSET_DROP only changes this thread's bounding set.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0 {
            left += 1;
        }
    }
    if left > 0 {
        log::debug!(
            "{left} capabilities stay in the bounding set (no CAP_SETPCAP); \
             with no permitted capabilities and no_new_privs they cannot be gained"
        );
    }
}

/// What the whole process keeps under `mode`: `reopen` says whether some
/// NIC was opened by xskvm itself (not from `sock-fds=`), so that the NIC
/// watcher may have to open it again.
pub fn kept(mode: CapabilityMode, reopen: bool) -> Option<CapSet> {
    match mode {
        CapabilityMode::Keep => None,
        CapabilityMode::None => Some(CapSet::default()),
        CapabilityMode::Net => Some(CapSet::of(&net_afxdp::OPEN_CAPABILITIES)),
        CapabilityMode::Auto if reopen => Some(CapSet::of(&net_afxdp::OPEN_CAPABILITIES)),
        CapabilityMode::Auto => Some(CapSet::default()),
    }
}

/// Reduces the calling thread, and every thread it starts afterwards, to
/// `keep`: bounding set (while CAP_SETPCAP allows), ambient, inheritable,
/// permitted and effective sets; then sets no_new_privs, so that no
/// exec can give any back. Call it before starting threads.
pub fn restrict(keep: CapSet) -> Result<(), PrivilegeError> {
    // The bounding set first: dropping from it needs CAP_SETPCAP, which
    // the capset below takes away.
    let (effective, _) = get()?;
    if effective.contains(CAP_SETPCAP) {
        limit_bounding_set(keep);
    }
    // SAFETY: clears this thread's ambient set; EINVAL only before 4.3.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    set(keep)?;
    // SAFETY: PR_SET_NO_NEW_PRIVS with 1 only sets the thread's flag.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(PrivilegeError::NoNewPrivs(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Drops the calling thread's remaining effective and permitted
/// capabilities (after the NIC watcher was started with them).
pub fn drop_all_in_this_thread() -> Result<(), PrivilegeError> {
    set(CapSet::default())
}

/// Human-readable names of the capabilities in `set`, for logs.
pub fn names(set: CapSet) -> String {
    const NAMES: [(u32, &str); 5] = [
        (12, "CAP_NET_ADMIN"),
        (13, "CAP_NET_RAW"),
        (14, "CAP_IPC_LOCK"),
        (38, "CAP_PERFMON"),
        (39, "CAP_BPF"),
    ];
    let mut out: Vec<String> = Vec::new();
    for cap in 0..64 {
        if set.contains(cap) {
            match NAMES.iter().find(|(n, _)| *n == cap) {
                Some((_, name)) => out.push((*name).to_string()),
                None => out.push(format!("cap {cap}")),
            }
        }
    }
    if out.is_empty() {
        "none".to_string()
    } else {
        out.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_keep_what_they_say() {
        let net = CapSet::of(&net_afxdp::OPEN_CAPABILITIES);
        assert_eq!(kept(CapabilityMode::Keep, true), None);
        assert_eq!(kept(CapabilityMode::None, true), Some(CapSet(0)));
        assert_eq!(kept(CapabilityMode::Net, false), Some(net));
        assert_eq!(kept(CapabilityMode::Auto, true), Some(net));
        assert_eq!(kept(CapabilityMode::Auto, false), Some(CapSet(0)));
        assert_eq!(
            names(net),
            "CAP_NET_ADMIN, CAP_NET_RAW, CAP_IPC_LOCK, CAP_PERFMON, CAP_BPF"
        );
        assert_eq!(names(CapSet(0)), "none");
    }

    /// In a thread of its own (capabilities are per thread), so the test
    /// process keeps its own.
    #[test]
    fn restrict_leaves_a_thread_with_only_what_it_keeps() {
        let status = std::thread::spawn(|| {
            let keep = CapSet::of(&[13]);
            restrict(keep).unwrap();
            let (effective, permitted) = get().unwrap();
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
            (effective, permitted, status)
        })
        .join()
        .unwrap();
        let (effective, permitted, status) = status;
        // SAFETY: geteuid has no preconditions.
        let is_root = unsafe { libc::geteuid() } == 0;
        let want = if is_root {
            CapSet::of(&[13])
        } else {
            CapSet(0)
        };
        assert_eq!((effective, permitted), (want, want));
        assert!(status.contains("NoNewPrivs:\t1"), "{status}");
        assert!(status.contains("CapInh:\t0000000000000000"), "{status}");
        assert!(status.contains("CapAmb:\t0000000000000000"), "{status}");
        if is_root {
            assert!(status.contains("CapBnd:\t0000000000002000"), "{status}");
        }
    }
}
