//! A process the harness signals, held by a pidfd (Linux 5.3 and later) from the moment its
//! pid is learnt: a signal reaches that process or none.
//!
//! A bare pid is not enough. A busy machine goes through its 32768 pids in minutes (threads
//! take them too), so the pid of a worker that died early in a scenario is soon another
//! process's, or a thread's; and kill(2) with a thread's id signals the whole process that
//! thread belongs to, which may be the harness itself. A pidfd names one process for as long
//! as it is held, and cannot be opened on a thread.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// One process, held open.
#[derive(Debug)]
pub struct Process {
    pid: u32,
    fd: OwnedFd,
}

impl Process {
    /// Holds process `pid`; `None` when no process has that id now (it exited and was reaped,
    /// or the id is a thread's). The caller makes sure the id is still the process it means:
    /// its own child not yet reaped, or one it has just been told of.
    pub fn open(pid: u32) -> Option<Process> {
        let id = libc::pid_t::try_from(pid).ok()?;
        // SAFETY: pidfd_open(2) takes a pid and flags and reads no memory of ours.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, id, 0) };
        let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
        // SAFETY: a successful pidfd_open returns a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Some(Process { pid, fd })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends `sig` (`libc::SIGKILL`, `SIGSTOP`, `SIGCONT`); false when the process is gone.
    pub fn signal(&self, sig: libc::c_int) -> bool {
        // SAFETY: pidfd_send_signal(2) with a null siginfo reads no memory of ours; the
        // descriptor is open for as long as `self` lives.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        r == 0
    }

    /// Whether it still runs: a pidfd turns readable when its process exits, so a zombie
    /// counts as gone.
    pub fn running(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd, valid for the call; a zero timeout does not block.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n == 0
    }
}

/// The signal a `kill`-style name (`-KILL`, `-STOP`, `-CONT`) stands for.
pub fn signal_number(name: &str) -> Option<libc::c_int> {
    match name.trim_start_matches('-') {
        "KILL" | "9" => Some(libc::SIGKILL),
        "STOP" => Some(libc::SIGSTOP),
        "CONT" => Some(libc::SIGCONT),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A held process is signalled while it runs and seen gone once it exits; after that,
    /// nothing is signalled, whoever has its pid by then.
    #[test]
    fn a_held_process_is_signalled_until_it_exits_and_never_after() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("a child");
        let p = Process::open(child.id()).expect("a running child");
        assert!(p.running());
        assert!(p.signal(libc::SIGSTOP) && p.signal(libc::SIGCONT));
        assert!(p.signal(libc::SIGKILL));
        let status = child.wait().expect("the child's status");
        assert!(!status.success());
        assert!(!p.running(), "an exited process is gone");
        assert!(!p.signal(libc::SIGCONT), "a reaped process takes no signal");
    }

    /// A thread's id is not a process: kill(2) with it would signal the whole process the
    /// thread belongs to (here this test's own), and it cannot be held.
    #[test]
    fn a_threads_id_is_not_a_process() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            // SAFETY: gettid(2) takes no arguments.
            let tid = unsafe { libc::syscall(libc::SYS_gettid) };
            tx.send(tid as u32).expect("send the id");
            let _ = stop_rx.recv();
        });
        let tid = rx.recv().expect("the thread's id");
        assert!(
            Process::open(tid).is_none(),
            "thread {tid} held as a process"
        );
        assert!(Process::open(std::process::id()).is_some());
        drop(stop_tx);
        t.join().expect("the thread");
    }

    #[test]
    fn signal_names_are_read_as_kill_writes_them() {
        assert_eq!(signal_number("-KILL"), Some(libc::SIGKILL));
        assert_eq!(signal_number("-9"), Some(libc::SIGKILL));
        assert_eq!(signal_number("-STOP"), Some(libc::SIGSTOP));
        assert_eq!(signal_number("-CONT"), Some(libc::SIGCONT));
        assert_eq!(signal_number("-HUP"), None);
    }
}
