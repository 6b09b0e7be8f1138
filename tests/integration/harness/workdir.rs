//! Where the tests put files.
//!
//! State (registry storage, mirror caches, daemon roots, client stores) goes
//! into [`Scratch`] temp dirs, removed on drop or, for those held by statics,
//! when the binary exits. A binary that was killed cannot clean up, so the
//! first [`Scratch`] of a run also removes those left by dead test binaries
//! (their names carry the pid). Logs go to one directory per run under cargo's
//! `CARGO_TARGET_TMPDIR` (`logs/run-<pid>-/`), named after the test that wrote them, so that the
//! logs of a failed run can still be read after the binary has exited.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex};

use anyhow::{Context, Result};
use tempfile::TempDir;

use super::process;

/// A temp dir that is removed when dropped or, at the latest, at exit.
pub struct Scratch(TempDir);

impl Scratch {
    pub fn new(label: &str) -> Result<Scratch> {
        LazyLock::force(&LEFTOVERS_REMOVED);
        let dir = tempfile::Builder::new()
            .prefix(&format!("{PREFIX}{}-{label}-", std::process::id()))
            .tempdir()
            .context("creating a temp dir")?;
        process::remove_at_exit(dir.path());
        Ok(Scratch(dir))
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// A path inside the dir.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }

    /// Creates a subdirectory and returns its path.
    pub fn subdir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir)
    }
}

/// `component` prefixed with the running test's name
/// (`auth--pulls_private-mirror`), so that files of parallel tests never
/// collide. Shared fixtures use plain names instead.
pub fn test_scoped(component: &str) -> String {
    match std::thread::current().name() {
        Some(test) if test != "main" => format!("{}-{component}", test.replace("::", "--")),
        _ => component.to_owned(),
    }
}

/// A fresh, empty log file named `stem.log` (or `stem-N.log` if taken).
pub fn log_file(stem: &str) -> Result<PathBuf> {
    let mut taken = TAKEN_LOG_NAMES.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let name = (1..)
        .map(|n| match n {
            1 => format!("{stem}.log"),
            n => format!("{stem}-{n}.log"),
        })
        .find(|name| !taken.contains(name))
        .expect("an unbounded range always yields a free name");
    taken.insert(name.clone());
    let path = LOG_DIR.join(name);
    std::fs::write(&path, "").with_context(|| format!("creating {}", path.display()))?;
    Ok(path)
}

/// Removes `dir`, first detaching every mount point at or below it
/// (dockerd bind-mounts its data root onto itself and leaves that behind
/// when it is killed).
pub fn remove_tree(dir: &Path) {
    if let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") {
        let mut mounts: Vec<&str> = mountinfo
            .lines()
            .filter_map(|line| line.split(' ').nth(4))
            .filter(|mount_point| Path::new(mount_point).starts_with(dir))
            .collect();
        // Deepest first.
        mounts.sort_by_key(|mount_point| std::cmp::Reverse(mount_point.len()));
        for mount_point in mounts {
            if let Ok(path) = std::ffi::CString::new(mount_point) {
                // SAFETY: plain system call on a NUL-terminated path.
                unsafe {
                    libc::umount2(path.as_ptr(), libc::MNT_DETACH);
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Scratch dirs are named `PREFIX<pid>-<label>-<random>`.
const PREFIX: &str = "regmirror-it-";

/// Scratch dirs of test binaries that are no longer running, removed once.
static LEFTOVERS_REMOVED: LazyLock<()> = LazyLock::new(|| remove_dead_runs(&std::env::temp_dir(), PREFIX));

/// Removes the entries of `dir` named `<prefix><pid>-…` whose pid is no longer running, so
/// concurrent test binaries never remove each other's files.
fn remove_dead_runs(dir: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let owner = name
            .to_str()
            .and_then(|name| name.strip_prefix(prefix))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        if owner.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            remove_tree(&entry.path());
        }
    }
}

static TAKEN_LOG_NAMES: LazyLock<Mutex<HashSet<String>>> = LazyLock::new(Default::default);

/// This run's log dir, `logs/run-<pid>-`: the logs of finished runs are removed when the next
/// run starts, those of a run still going are left alone.
static LOG_DIR: LazyLock<PathBuf> = LazyLock::new(|| {
    let logs = Path::new(env!("CARGO_TARGET_TMPDIR")).join("logs");
    remove_dead_runs(&logs, "run-");
    let dir = logs.join(format!("run-{}-", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating the test log dir");
    dir
});
