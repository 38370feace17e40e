//! A load's chunks read ahead of it from a local directory, on a thread of its own: while the
//! load decodes and verifies one chunk, the next ones are being read ([`crate::direct::read_chunk`]:
//! from the page cache when there, else from the device). At most a window of memory (the
//! buffers' capacity, not only the bytes in them) is held ahead; the large buffers go back and
//! forth between the two threads rather than being allocated per chunk.
//!
//! The load waits for a chunk by yielding in a loop for a while before it sleeps. Reads take
//! milliseconds, so it almost always sees the chunk arrive before then, and the reader need not
//! wake it: a wakeup runs the load on the reader's own core, where it verifies the chunk before
//! the reader can issue its next read, and a cold load then costs the reads plus all the
//! checking instead of whichever is longer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The most bytes of neighbouring chunks read in one request.
const MERGE: u64 = 8 << 20;
/// A chunk this large is read with small neighbours only, never with another as large.
const SMALL: u64 = 1 << 20;
/// Buffers kept for the reader's next requests: what is held beyond the window.
const SPARES: usize = 2;
/// How long the load waits for its next chunk, yielding, before it sleeps.
const SPIN: Duration = Duration::from_millis(20);

/// The chunks a load will read, in order, and those read for it so far.
#[derive(Debug)]
pub(crate) struct Ahead {
    /// Each chunk's file, offset and length, in the order the load reads them.
    plan: Vec<(PathBuf, u64, u64)>,
    window: u64,
    /// How long the load waits for a chunk, yielding, before it sleeps ([`SPIN`]).
    spin: Duration,
    /// How many chunks of the plan, from the start, have been read (or failed): the load
    /// watches this while it spins.
    done: AtomicUsize,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// The index in the plan of the chunk the load reads next.
    next: usize,
    /// Chunks read and not yet taken, by index: the buffer and where the bytes start in it.
    /// Each with the memory it holds: its buffer's capacity, not only its bytes.
    ready: BTreeMap<usize, (Read, u64)>,
    /// Memory held in `ready`: what the window bounds.
    held: u64,
    /// Buffers the load has finished with.
    spare: Vec<Vec<u8>>,
    stop: bool,
    /// Whether a thread sleeps on `changed`: only then is it notified.
    load_sleeps: bool,
    reader_sleeps: bool,
}

/// A chunk read: the buffer and where its bytes start there (they end where it ends).
type Read = std::io::Result<(Vec<u8>, usize)>;

impl State {
    /// Puts chunk `k` in `ready`, held as its buffer's whole capacity.
    fn put(&mut self, k: usize, read: Read) {
        let held = read.as_ref().map_or(0, |(b, _)| b.capacity() as u64);
        self.held += held;
        self.ready.insert(k, (read, held));
    }
}

impl Ahead {
    /// Starts reading `plan` ahead, at most `window` bytes beyond what was taken.
    pub(crate) fn start(plan: Vec<(PathBuf, u64, u64)>, window: u64) -> Arc<Ahead> {
        Self::start_spinning(plan, window, SPIN)
    }

    fn start_spinning(plan: Vec<(PathBuf, u64, u64)>, window: u64, spin: Duration) -> Arc<Ahead> {
        let ahead = Arc::new(Ahead {
            plan,
            window,
            spin,
            done: AtomicUsize::new(0),
            state: Mutex::default(),
            changed: Condvar::new(),
        });
        let reader = ahead.clone();
        std::thread::spawn(move || reader.read_all());
        ahead
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn read_all(&self) {
        let mut i = 0;
        while i < self.plan.len() {
            // Chunks that follow each other in one file are read in one request, with at most
            // one large chunk among them: the small ones beside a large one (a layer's biases
            // and norms beside its weights) cost no request of their own.
            let (path, offset, _) = &self.plan[i];
            let mut end = i + 1;
            let mut span = self.plan[i].2;
            let mut large = span >= SMALL;
            while let Some((p, o, l)) = self.plan.get(end) {
                if p != path || *o != offset + span || span + l > MERGE || (large && *l >= SMALL) {
                    break;
                }
                large |= *l >= SMALL;
                span += l;
                end += 1;
            }
            let mut buf = {
                let mut s = self.lock();
                // The chunks the load waits for are read whatever is held.
                while !s.stop && s.held >= self.window && i > s.next {
                    s.reader_sleeps = true;
                    s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
                    s.reader_sleeps = false;
                }
                if s.stop {
                    return;
                }
                s.spare.pop().unwrap_or_default()
            };
            let read = crate::direct::read_chunk(path, *offset, span as usize, &mut buf);
            let mut s = self.lock();
            match read {
                // The largest chunk keeps the buffer the request was read into, cut where its
                // bytes end, and starts where they lie there; the others are copied out.
                Ok(start) => {
                    let largest = (i..end).max_by_key(|&k| self.plan[k].2).unwrap_or(i);
                    let mut at = start;
                    let mut kept = start;
                    for k in i..end {
                        let len = self.plan[k].2 as usize;
                        if k == largest {
                            kept = at;
                        } else {
                            // A buffer of its own size: a spare one, with room for a large
                            // chunk, would hold far more than these bytes.
                            s.put(k, Ok((buf[at..at + len].to_vec(), 0)));
                        }
                        at += len;
                    }
                    buf.truncate(kept + self.plan[largest].2 as usize);
                    s.put(largest, Ok((buf, kept)));
                }
                // Each chunk read alone says which failed, and how; each is handed over as it
                // is read, since the load may take it at once.
                Err(_) => {
                    drop(s);
                    for k in i..end {
                        let (p, o, l) = &self.plan[k];
                        let mut chunk = Vec::new();
                        let read = crate::direct::read_chunk(p, *o, *l as usize, &mut chunk);
                        let mut s = self.lock();
                        s.put(k, read.map(|start| (chunk, start)));
                        self.hand_over(&mut s, k + 1);
                    }
                    i = end;
                    continue;
                }
            }
            self.hand_over(&mut s, end);
            i = end;
        }
    }

    /// Counts the chunks before `done` as read; wakes the load if it sleeps.
    fn hand_over(&self, s: &mut State, done: usize) {
        self.done.store(done, Ordering::Release);
        if s.load_sleeps {
            self.changed.notify_all();
        }
    }

    /// The next chunk of the plan, if it is `len` bytes of `path` at `offset`: waits until it is
    /// read, swaps its buffer into `buf`, and returns where its bytes start there (they end
    /// where `buf` ends, as [`crate::direct::read_chunk`] leaves them). `None` when
    /// the load reads off the plan; it then reads the chunk itself.
    pub(crate) fn take(
        &self,
        path: &Path,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Option<std::io::Result<usize>> {
        let mut s = self.lock();
        let i = s.next;
        let (p, o, l) = self.plan.get(i)?;
        if (p.as_path(), *o, *l) != (path, offset, len) {
            return None;
        }
        let spin_until = Instant::now() + self.spin;
        let (read, held) = loop {
            if let Some(ready) = s.ready.remove(&i) {
                break ready;
            }
            if s.stop {
                return None;
            }
            if Instant::now() < spin_until {
                drop(s);
                // Yielding, not busy: on a crowded machine (the workers of a node loading at
                // once) the spin gives way to whatever else can run, the reader included.
                while self.done.load(Ordering::Acquire) <= i && Instant::now() < spin_until {
                    std::thread::yield_now();
                }
                s = self.lock();
            } else {
                // Under the lock the reader takes to hand a chunk over: no wakeup is missed.
                s.load_sleeps = true;
                s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
                s.load_sleeps = false;
            }
        };
        s.next += 1;
        s.held = s
            .held
            .checked_sub(held)
            .expect("a chunk is counted as held before the load can take it");
        let taken = read.map(|(mut chunk, start)| {
            std::mem::swap(buf, &mut chunk);
            if s.spare.len() < SPARES {
                s.spare.push(chunk);
            }
            start
        });
        if s.reader_sleeps {
            self.changed.notify_all();
        }
        Some(taken)
    }

    /// Memory held by chunks read ahead and not yet taken.
    pub(crate) fn held(&self) -> u64 {
        self.lock().held
    }

    /// Stops reading ahead; what was read is dropped.
    pub(crate) fn stop(&self) {
        let mut s = self.lock();
        s.stop = true;
        s.ready.clear();
        s.held = 0;
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads `plan` through an [`Ahead`] and returns each chunk's bytes: those from where
    /// `take` says they start to the end of the buffer, as the load decodes them.
    fn take_all(ahead: &Ahead, plan: &[(PathBuf, u64, u64)]) -> Vec<Vec<u8>> {
        let mut buf = Vec::new();
        plan.iter()
            .map(|(p, o, l)| {
                let start = ahead.take(p, *o, *l, &mut buf).unwrap().unwrap();
                buf[start..].to_vec()
            })
            .collect()
    }

    #[test]
    fn every_chunk_arrives_whether_the_load_spins_or_sleeps_and_the_reader_waits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shard");
        let bytes: Vec<u8> = (0..3 << 20).map(|i| (i * 7 + i / 4096) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        // Large and small chunks, neighbours and not, off block boundaries: a large chunk read
        // with the small ones after it, and one with a small one before it.
        let cuts = [
            (0u64, 1 << 20),
            (1 << 20, 5000),
            (1_053_576, 700_001),
            ((2 << 20) - 4096, 4096),
            (2 << 20, 1 << 20),
        ];
        let plan: Vec<_> = cuts.iter().map(|&(o, l)| (path.clone(), o, l)).collect();
        let want: Vec<Vec<u8>> = cuts
            .iter()
            .map(|&(o, l)| bytes[o as usize..(o + l) as usize].to_vec())
            .collect();
        // A window smaller than a chunk makes the reader wait for every take; no spin makes
        // the load sleep for every chunk.
        for (window, spin) in [
            (64 << 20, SPIN),
            (4096, SPIN),
            (64 << 20, Duration::ZERO),
            (4096, Duration::ZERO),
        ] {
            let ahead = Ahead::start_spinning(plan.clone(), window, spin);
            assert_eq!(
                take_all(&ahead, &plan),
                want,
                "window {window}, spin {spin:?}"
            );
            assert_eq!(ahead.held(), 0);
            ahead.stop();
        }
    }

    #[test]
    fn a_failed_read_of_merged_chunks_is_retried_chunk_by_chunk_and_names_the_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shard");
        let bytes: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        // Small neighbours read in one request, the last of them past the end of the file.
        let plan: Vec<_> = [(0u64, 6000u64), (6000, 9000), (15_000, 8000)]
            .iter()
            .map(|&(o, l)| (path.clone(), o, l))
            .collect();
        for spin in [SPIN, Duration::ZERO] {
            let ahead = Ahead::start_spinning(plan.clone(), 64 << 20, spin);
            let mut buf = Vec::new();
            for (p, o, l) in &plan[..2] {
                let start = ahead.take(p, *o, *l, &mut buf).unwrap().unwrap();
                assert_eq!(buf[start..], bytes[*o as usize..(o + l) as usize]);
            }
            let (p, o, l) = &plan[2];
            let err = ahead.take(p, *o, *l, &mut buf).unwrap().unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof, "{err}");
            assert_eq!(ahead.held(), 0);
            ahead.stop();
        }
    }
}
