//! The umockdev recording reader and tree writer (replay of recordings from bug reports): any
//! text parses without panic, and `write_tree` creates nothing outside the directory it is
//! given and leaves no link there that leads outside it.
//!
//! The process runs jailed by Landlock (see `autoattach_fuzz::sandbox`): writes are allowed
//! only beneath a scratch directory and libFuzzer's corpus and artifact directories. The tree
//! goes to `scratch/t`; an escape that lands beside it is seen in the scratch directory, one
//! that goes further is refused by the jail and seen as EACCES.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use autoattach::umockdev::{parse, write_tree};
use libfuzzer_sys::fuzz_target;

static SCRATCH: OnceLock<PathBuf> = OnceLock::new();

/// Directories libFuzzer writes to: corpus directories and the artifact prefix.
fn fuzzer_outputs() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for arg in std::env::args().skip(1) {
        if let Some(prefix) =
            arg.strip_prefix("-artifact_prefix=").or_else(|| arg.strip_prefix("-exact_artifact_path="))
        {
            let p = Path::new(prefix);
            let dir = if prefix.ends_with('/') { p } else { p.parent().unwrap_or(Path::new(".")) };
            out.push(if dir.as_os_str().is_empty() { PathBuf::from(".") } else { dir.to_owned() });
        } else if !arg.starts_with('-') && Path::new(&arg).is_dir() {
            out.push(PathBuf::from(arg));
        }
    }
    out
}

fn init() {
    let scratch = autoattach_fuzz::scratch_dir().join(format!("autoattach-fuzz-umockdev-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).unwrap();
    let scratch = scratch.canonicalize().unwrap();
    let mut allowed = fuzzer_outputs();
    for dir in &allowed {
        let _ = std::fs::create_dir_all(dir);
    }
    allowed.push(scratch.clone());
    let allowed: Vec<&Path> = allowed.iter().map(PathBuf::as_path).filter(|p| p.is_dir()).collect();
    if let Err(e) = autoattach_fuzz::sandbox::restrict_writes(&allowed) {
        panic!("refusing to fuzz write_tree outside a jail: {e}");
    }
    SCRATCH.set(scratch).unwrap();
}

/// Every symbolic link under `dir` that resolves, resolves inside `root`.
fn links_stay_inside(root: &Path, dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        if meta.file_type().is_symlink() {
            if let Ok(target) = std::fs::canonicalize(&path) {
                let link = std::fs::read_link(&path).unwrap_or_default();
                assert!(
                    target.starts_with(root),
                    "{} -> {} resolves outside the tree, to {}",
                    path.display(),
                    link.display(),
                    target.display()
                );
            }
        } else if meta.is_dir() {
            links_stay_inside(root, &path);
        }
    }
}

fuzz_target!(init: init(), |data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let devices = match parse(text) {
        Ok(devices) => devices,
        Err(e) => {
            assert!(e.line >= 1 && e.line <= text.lines().count(), "{e}");
            return;
        }
    };
    let scratch = SCRATCH.get().unwrap();
    let root = scratch.join("t");
    if let Err(e) = write_tree(&devices, &root) {
        assert_ne!(e.kind(), std::io::ErrorKind::PermissionDenied, "write_tree wrote outside its directory (refused by the jail): {e}");
    }
    for entry in std::fs::read_dir(scratch).unwrap().flatten() {
        assert_eq!(entry.file_name(), "t", "write_tree created {} beside its directory", entry.path().display());
    }
    if root.exists() {
        links_stay_inside(&root, &root);
        std::fs::remove_dir_all(&root).unwrap();
    }
});
