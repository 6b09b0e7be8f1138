//! Child processes that cannot outlive the test binary.
//!
//! Shared daemons live in statics, and statics are never dropped, so nothing
//! in Rust would ever stop them. Two mechanisms make sure they die anyway:
//!
//! - every long-lived [`Process`] is spawned from one dedicated thread that
//!   lives as long as the binary, with `PR_SET_PDEATHSIG = SIGKILL`. The
//!   kernel sends that signal when the *spawning thread* exits, which is why a
//!   daemon must not be spawned from a test thread: it would be killed as soon
//!   as the test that happened to start it finished. If the test binary is
//!   killed outright, the kernel still takes its children along.
//! - an `atexit` hook kills the process group of every [`Process`] still alive
//!   and then removes the directories registered with [`remove_at_exit`].
//!
//! Per-test processes are killed when their [`Process`] is dropped. Each child
//! gets a process group of its own so that kills reach its children too.
//!
//! Short-lived tool invocations go through [`run`], which waits on the calling
//! thread (so PDEATHSIG on that thread is enough) and enforces a timeout so a
//! hung client fails the test instead of hanging it.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::sync::{LazyLock, Mutex, MutexGuard, Once};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

use super::{wait, workdir};

/// How long a short-lived tool may run before it is killed and the test fails.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);

/// The Debian package that provides each external tool, for the error hint.
const PACKAGES: &[(&str, &str)] = &[
    ("docker-registry", "docker-registry"),
    ("skopeo", "skopeo"),
    ("umoci", "umoci"),
    ("containerd", "containerd"),
    ("ctr", "containerd"),
    ("dockerd", "docker.io"),
    ("docker", "docker.io"),
    ("podman", "podman"),
    ("openssl", "openssl"),
];

/// A `Command` for an external tool, or an error telling how to install it.
///
/// A missing tool must fail the test, never skip it: a skipped client test
/// would read as a passing one.
pub fn tool(name: &str) -> Result<Command> {
    let found = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file());
    match found {
        Some(path) => Ok(Command::new(path)),
        None => {
            let package = PACKAGES.iter().find(|(tool, _)| *tool == name).map_or(name, |(_, package)| package);
            bail!("`{name}` is not on PATH: install it with `apt-get install -y {package}`")
        }
    }
}

/// A child process that is killed (with its process group) when dropped.
pub struct Process {
    name: String,
    child: Child,
}

impl Process {
    /// Spawns `command` from the long-lived spawner thread (see module docs).
    pub fn spawn(name: &str, mut command: Command) -> Result<Process> {
        guard(&mut command);
        let (reply, answer) = mpsc::channel();
        SPAWNER.send(SpawnRequest { command, reply }).map_err(|_| anyhow!("the spawner thread is gone"))?;
        let child = answer
            .recv()
            .context("the spawner thread dropped the request")?
            .with_context(|| format!("spawning {name}"))?;
        live_groups().push(child.id());
        Ok(Process { name: name.to_owned(), child })
    }

    /// Spawns `command` with stdout and stderr appended to the given files.
    pub fn spawn_logged(name: &str, mut command: Command, stdout: &Path, stderr: &Path) -> Result<Process> {
        command.stdin(Stdio::null()).stdout(append(stdout)?).stderr(append(stderr)?);
        Process::spawn(name, command)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `Some(status)` once the process has exited.
    pub fn exit_status(&mut self) -> Result<Option<ExitStatus>> {
        self.child.try_wait().with_context(|| format!("checking whether {} is alive", self.name))
    }

    /// Kills the process group with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        signal_group(self.child.id(), libc::SIGKILL);
        let _ = self.child.wait();
    }

    /// Asks the process to stop with SIGTERM, and kills it after `grace`.
    pub fn terminate(&mut self, grace: Duration) {
        signal_group(self.child.id(), libc::SIGTERM);
        let what = format!("{} to exit after SIGTERM", self.name);
        // Past the grace period, Drop sends SIGKILL.
        let _ = wait::poll(&what, grace, || Ok(self.exit_status()?.map(|_| ())));
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let pid = self.child.id();
        signal_group(pid, libc::SIGKILL);
        let _ = self.child.wait();
        live_groups().retain(|&live| live != pid);
    }
}

/// Runs a short-lived command to completion and returns its output, failing
/// with its stderr when it exits non-zero or outlives [`COMMAND_TIMEOUT`].
pub fn run(command: &mut Command) -> Result<Output> {
    let output = run_unchecked(command)?;
    if !output.status.success() {
        bail!(
            "`{}` failed ({}):\n{}{}",
            describe(command),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
    }
    Ok(output)
}

/// Like [`run`] but returns the output whatever the exit status.
pub fn run_unchecked(command: &mut Command) -> Result<Output> {
    let scratch = tempfile::tempdir().context("creating a temp dir for command output")?;
    let (stdout, stderr) = (scratch.path().join("out"), scratch.path().join("err"));
    guard(command);
    command.stdin(Stdio::null()).stdout(File::create(&stdout)?).stderr(File::create(&stderr)?);
    let mut child = command.spawn().with_context(|| format!("starting `{}`", describe(command)))?;
    let what = format!("`{}` to finish", describe(command));
    let status = wait::poll(&what, COMMAND_TIMEOUT, || Ok(child.try_wait()?));
    let status = match status {
        Ok(status) => status,
        Err(timeout) => {
            signal_group(child.id(), libc::SIGKILL);
            let _ = child.wait();
            return Err(timeout);
        }
    };
    Ok(Output { status, stdout: std::fs::read(&stdout)?, stderr: std::fs::read(&stderr)? })
}

/// Runs a command and returns its stdout as a string.
pub fn run_stdout(command: &mut Command) -> Result<String> {
    let output = run(command)?;
    String::from_utf8(output.stdout).context("command printed non-UTF-8 output")
}

/// Removes `dir` (see [`workdir::remove_tree`]) when the binary exits, for
/// scratch directories held by statics that are never dropped.
pub fn remove_at_exit(dir: &Path) {
    install_exit_hook();
    lock(&DIRS_TO_REMOVE).push(dir.to_owned());
}

fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

fn append(path: &Path) -> Result<File> {
    File::options().create(true).append(true).open(path).with_context(|| format!("opening log file {}", path.display()))
}

/// Gives the child its own process group and asks the kernel to SIGKILL it
/// when the spawning thread dies.
fn guard(command: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure only makes async-signal-safe system calls.
    unsafe {
        command.pre_exec(move || {
            if libc::setpgid(0, 0) != 0 || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl.
            if libc::getppid() != parent {
                return Err(io::Error::other("test binary exited during spawn"));
            }
            Ok(())
        });
    }
}

fn signal_group(pid: u32, signal: libc::c_int) {
    // SAFETY: plain system call; the group exists as long as we have not
    // reaped its leader, and a stale group id only yields ESRCH.
    unsafe {
        libc::kill(-(pid as libc::pid_t), signal);
    }
}

struct SpawnRequest {
    command: Command,
    reply: mpsc::Sender<io::Result<Child>>,
}

/// The sender half of the spawner thread's queue. The thread blocks on the
/// receiver forever because this sender, being a static, is never dropped.
static SPAWNER: LazyLock<mpsc::Sender<SpawnRequest>> = LazyLock::new(|| {
    install_exit_hook();
    let (requests, queue) = mpsc::channel::<SpawnRequest>();
    thread::Builder::new()
        .name("process-spawner".into())
        .spawn(move || {
            for SpawnRequest { mut command, reply } in queue {
                let _ = reply.send(command.spawn());
            }
        })
        .expect("starting the process spawner thread");
    requests
});

static LIVE_GROUPS: Mutex<Vec<u32>> = Mutex::new(Vec::new());
static DIRS_TO_REMOVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn live_groups() -> MutexGuard<'static, Vec<u32>> {
    lock(&LIVE_GROUPS)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn install_exit_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        // SAFETY: registers a plain `extern "C"` function.
        let status = unsafe { libc::atexit(clean_up_at_exit) };
        assert_eq!(status, 0, "atexit failed");
    });
}

extern "C" fn clean_up_at_exit() {
    for pid in live_groups().drain(..) {
        signal_group(pid, libc::SIGKILL);
        // SAFETY: reaps our own child so its files are closed before removal.
        unsafe {
            libc::waitpid(pid as libc::pid_t, std::ptr::null_mut(), 0);
        }
    }
    for dir in lock(&DIRS_TO_REMOVE).drain(..) {
        workdir::remove_tree(&dir);
    }
}

#[cfg(test)]
mod tests {
    use super::tool;

    #[test]
    fn a_missing_tool_fails_with_an_install_hint() {
        let error = tool("skopeo-not-installed").unwrap_err().to_string();
        assert!(error.contains("apt-get install -y skopeo-not-installed"), "{error}");
        assert!(tool("skopeo").is_ok());
    }
}
