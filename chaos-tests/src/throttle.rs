//! The slow-worker fault: a live process made slow, as a throttled GPU or a noisy neighbour
//! slows a rank that is otherwise healthy. It is stopped (SIGSTOP) for part of every short
//! period and continued (SIGCONT) for the rest, so it runs `1 / slowdown` of the time. Periods
//! are short (40 ms) against a worker's heartbeat, so the worker stays alive to its agent:
//! only its pace gives it away.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::process::Process;

/// One throttling period.
const PERIOD: Duration = Duration::from_millis(40);

/// A process throttled until this is dropped (or the process exits), then continued.
#[derive(Debug)]
pub struct Throttle {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    process: Arc<Process>,
}

impl Throttle {
    /// Throttles `process` so that it runs `1 / slowdown` of the time (`slowdown` above 1).
    pub fn start(process: Arc<Process>, slowdown: f64) -> Throttle {
        assert!(slowdown > 1.0, "a slowdown of {slowdown} slows nothing");
        let run = PERIOD.div_f64(slowdown);
        let stopped = PERIOD - run;
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, p) = (stop.clone(), process.clone());
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                if !p.signal(libc::SIGSTOP) {
                    return;
                }
                std::thread::sleep(stopped);
                if !p.signal(libc::SIGCONT) {
                    return;
                }
                std::thread::sleep(run);
            }
        });
        Throttle {
            stop,
            thread: Some(thread),
            process,
        }
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.process.signal(libc::SIGCONT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(pid: u32) -> char {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        let after = stat.rsplit(')').next().expect("fields");
        after.trim_start().chars().next().expect("a state")
    }

    /// A throttled process is seen stopped and running by turns, and runs again once the
    /// throttle is dropped.
    #[test]
    fn a_throttled_process_is_stopped_by_turns_and_continued_at_the_end() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("a child");
        let process = Arc::new(Process::open(child.id()).expect("a running child"));
        let throttle = Throttle::start(process, 4.0);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..400 {
            seen.insert(state(child.id()) == 'T');
            if seen.len() == 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(3));
        }
        drop(throttle);
        let after = state(child.id());
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(seen.len(), 2, "seen stopped and not stopped");
        assert_ne!(after, 'T', "continued once the throttle ended");
    }
}
