//! How the executor process locks itself down before it runs anything a stranger sent.
//!
//! In order, on Linux:
//! 1. **Landlock** (while still single-threaded, so every later thread inherits it): files
//!    only under the system directories a backend needs (`/usr`, `/lib*`, `/etc`, `/proc`,
//!    `/sys`, `/dev`, read-only, plus GPU render nodes), so not the node's data directory and
//!    its identity key; no TCP; no signals to processes outside the sandbox.
//! 2. **Resource limits**: no core dumps; an address-space limit on the CPU backend (GPU drivers
//!    reserve address space freely, so none there); a lifetime CPU-time limit; not dumpable.
//! 3. After the backend is open, a **seccomp** filter on every thread: no exec, fork, new
//!    sockets, ptrace or cross-process memory access, no module or mount calls, and no raising
//!    of its own limits. It is a deny-list (the rest is allowed) so a driver's unusual but
//!    harmless syscalls keep working.
//!
//! Each step reports what it achieved; the node logs it, and warns when a protection is
//! missing.

use std::path::{Path, PathBuf};

use super::proto::{Confinement, Landlock};

/// Read-only roots the backends need (libraries, driver manifests, CPU and GPU topology).
const READ_ROOTS: &[&str] = &[
    "/usr",
    "/lib",
    "/lib64",
    "/lib32",
    "/etc",
    "/proc",
    "/sys",
    "/dev",
    "/opt",
    "/run/opengl-driver",
];
/// Devices a GPU driver opens read-write.
const DEVICE_ROOTS: &[&str] = &["/dev/dri", "/dev/null"];

/// Step 1: Landlock. Returns how far it is enforced.
pub fn landlock() -> Landlock {
    use landlock::{
        ABI, Access, AccessFs, AccessNet, CompatLevel, Compatible, Ruleset, RulesetAttr,
        RulesetCreatedAttr, RulesetStatus, Scope, path_beneath_rules,
    };
    let abi = ABI::V6;
    let existing = |roots: &[&str]| -> Vec<PathBuf> {
        roots
            .iter()
            .map(PathBuf::from)
            .filter(|p| p.exists())
            .collect()
    };
    let result = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.handle_access(AccessNet::from_all(abi)))
        .and_then(|r| r.scope(Scope::from_all(abi)))
        .and_then(|r| r.create())
        .and_then(|r| {
            r.add_rules(path_beneath_rules(
                existing(READ_ROOTS),
                AccessFs::from_read(abi),
            ))
        })
        .and_then(|r| {
            r.add_rules(path_beneath_rules(
                existing(DEVICE_ROOTS),
                AccessFs::from_read(abi) | AccessFs::WriteFile | AccessFs::IoctlDev,
            ))
        })
        .and_then(|r| r.restrict_self());
    match result {
        Ok(status) => match status.ruleset {
            RulesetStatus::FullyEnforced => Landlock::FullyEnforced,
            RulesetStatus::PartiallyEnforced => Landlock::PartiallyEnforced,
            RulesetStatus::NotEnforced => {
                Landlock::NotEnforced("the kernel has no landlock".into())
            }
        },
        Err(e) => Landlock::NotEnforced(e.to_string()),
    }
}

/// Step 2: resource limits on this process. `address_space` only for the CPU backend.
pub fn limits(address_space: Option<u64>, cpu_seconds: u64) -> Result<(), String> {
    use rustix::process::{Resource, Rlimit, setrlimit};
    let set = |what: &str, resource, soft: u64, hard: u64| {
        setrlimit(
            resource,
            Rlimit {
                current: Some(soft),
                maximum: Some(hard),
            },
        )
        .map_err(|e| format!("cannot limit {what}: {e}"))
    };
    set("core dumps", Resource::Core, 0, 0)?;
    if let Some(bytes) = address_space {
        set("address space", Resource::As, bytes, bytes)?;
    }
    // The soft limit sends SIGXCPU (fatal); the hard one, half a minute later, SIGKILL.
    set(
        "cpu time",
        Resource::Cpu,
        cpu_seconds,
        cpu_seconds.saturating_add(30),
    )?;
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
        .map_err(|e| format!("cannot make the process undumpable: {e}"))?;
    rustix::thread::set_no_new_privs(true).map_err(|e| format!("cannot set no_new_privs: {e}"))
}

/// Step 3: the seccomp deny-list, on every thread of the process.
pub fn seccomp() -> Result<(), String> {
    use seccompiler::{
        SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    };
    use std::collections::BTreeMap;
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e| format!("seccomp: {e:?}"))?;
    let mut denied: Vec<i64> = vec![
        libc::SYS_execve,
        libc::SYS_execveat,
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_socket,
        libc::SYS_socketpair,
        libc::SYS_connect,
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_accept,
        libc::SYS_accept4,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_kexec_load,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_userfaultfd,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_acct,
        libc::SYS_reboot,
        libc::SYS_swapon,
        libc::SYS_swapoff,
    ];
    #[cfg(target_arch = "x86_64")]
    denied.extend([libc::SYS_fork, libc::SYS_vfork, libc::SYS_setrlimit]);
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        denied.into_iter().map(|n| (n, Vec::new())).collect();
    // prlimit64 may read limits (glibc's getrlimit uses it), never set them.
    let sets = SeccompCondition::new(2, SeccompCmpArgLen::Qword, SeccompCmpOp::Ne, 0)
        .and_then(|c| SeccompRule::new(vec![c]))
        .map_err(|e| format!("seccomp rule: {e}"))?;
    rules.insert(libc::SYS_prlimit64, vec![sets]);
    let filter: seccompiler::BpfProgram = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .and_then(TryInto::try_into)
    .map_err(|e| format!("seccomp filter: {e}"))?;
    seccompiler::apply_filter_all_threads(&filter).map_err(|e| format!("seccomp: {e}"))
}

/// The files in `forbidden` this process can still open (it should be none).
pub fn readable(forbidden: &[PathBuf]) -> Vec<String> {
    forbidden
        .iter()
        .filter(|p| std::fs::File::open(p).is_ok() || std::fs::read_dir(p).is_ok())
        .map(|p| p.display().to_string())
        .collect()
}

/// Whether `path` lies under one of the roots the executor may read (so Landlock cannot keep
/// it from the executor).
pub fn under_read_roots(path: &Path) -> bool {
    READ_ROOTS
        .iter()
        .chain(DEVICE_ROOTS)
        .any(|r| path.starts_with(r))
}

/// Everything above, for [`Confinement`]'s report.
pub fn report(
    landlock: Landlock,
    seccomp: bool,
    address_space: Option<u64>,
    cpu_seconds: u64,
    forbidden: &[PathBuf],
) -> Confinement {
    Confinement {
        landlock,
        seccomp,
        address_space,
        cpu_seconds: Some(cpu_seconds),
        forbidden_readable: readable(forbidden),
    }
}
