//! A Landlock jail: after [`restrict_writes`], this process (every thread it starts later too)
//! can create, write, rename or remove files only beneath the directories given. Reads are not
//! restricted.
//!
//! The umockdev target runs `write_tree` on hostile recordings, as root on a developer's
//! machine. If a recording escaped its temporary directory it could write anywhere; the jail
//! turns that write into EACCES, which the target reports as the bug it is, instead of letting
//! it happen. Landlock (Linux 5.13+) needs no privilege; without it the target refuses to run.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const CREATE_RULESET_VERSION: u32 = 1 << 0;
const RULE_PATH_BENEATH: libc::c_int = 1;

const WRITE_FILE: u64 = 1 << 1;
const REMOVE_DIR: u64 = 1 << 4;
const REMOVE_FILE: u64 = 1 << 5;
/// MAKE_CHAR, MAKE_DIR, MAKE_REG, MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM.
const MAKE_ANY: u64 = 0b111_1111 << 6;
/// ABI 2: renaming or linking across directories.
const REFER: u64 = 1 << 13;
/// ABI 3: truncating.
const TRUNCATE: u64 = 1 << 14;

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
}

#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

/// Restricts every write of this process to beneath `allowed` (directories that exist).
pub fn restrict_writes(allowed: &[&Path]) -> Result<(), String> {
    // SAFETY: a null attribute with size 0 and the VERSION flag only asks the ABI version.
    let abi = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<RulesetAttr>(),
            0usize,
            CREATE_RULESET_VERSION,
        )
    };
    if abi < 1 {
        return Err(format!("Landlock is not available: {}", std::io::Error::last_os_error()));
    }
    let mut access = WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE_ANY;
    if abi >= 2 {
        access |= REFER;
    }
    if abi >= 3 {
        access |= TRUNCATE;
    }
    let attr = RulesetAttr { handled_access_fs: access };
    // SAFETY: `attr` is a valid ruleset_attr prefix of the size given, live across the call.
    let ruleset =
        unsafe { libc::syscall(libc::SYS_landlock_create_ruleset, &attr, size_of::<RulesetAttr>(), 0u32) } as i32;
    if ruleset < 0 {
        return Err(format!("landlock_create_ruleset: {}", std::io::Error::last_os_error()));
    }
    for dir in allowed {
        let c = CString::new(dir.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
        // SAFETY: `c` is a NUL-terminated path that outlives the call.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC | libc::O_DIRECTORY) };
        if fd < 0 {
            return Err(format!("{}: {}", dir.display(), std::io::Error::last_os_error()));
        }
        let rule = PathBeneathAttr { allowed_access: access, parent_fd: fd };
        // SAFETY: `ruleset` and `fd` are open fds; `rule` is a path_beneath_attr live across the call.
        let rc = unsafe { libc::syscall(libc::SYS_landlock_add_rule, ruleset, RULE_PATH_BENEATH, &rule, 0u32) };
        // SAFETY: `fd` was opened above and is not used again.
        unsafe { libc::close(fd) };
        if rc != 0 {
            return Err(format!("landlock_add_rule {}: {}", dir.display(), std::io::Error::last_os_error()));
        }
    }
    // SAFETY: PR_SET_NO_NEW_PRIVS with constant arguments only sets this process's flag.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(format!("PR_SET_NO_NEW_PRIVS: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `ruleset` is an open Landlock ruleset fd; flags must be 0.
    let rc = unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0u32) };
    // SAFETY: `ruleset` is not used again.
    unsafe { libc::close(ruleset) };
    if rc != 0 {
        return Err(format!("landlock_restrict_self: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}
