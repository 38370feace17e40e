//! A load's chunks read ahead of it from a local directory, on a thread of its own: while the
//! load decodes and verifies one chunk, the next ones are being read ([`crate::direct::read_chunk`]:
//! from the page cache when there, else from the device). At most a window of bytes is held
//! ahead; buffers go back and forth between the two threads rather than being allocated per
//! chunk.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// The most bytes of neighbouring small chunks read in one request.
const MERGE: u64 = 8 << 20;
/// A chunk this large is read in a request of its own.
const SMALL: u64 = 1 << 20;

/// The chunks a load will read, in order, and those read for it so far.
#[derive(Debug)]
pub(crate) struct Ahead {
    /// Each chunk's file, offset and length, in the order the load reads them.
    plan: Vec<(PathBuf, u64, u64)>,
    window: u64,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// The index in the plan of the chunk the load reads next.
    next: usize,
    /// Chunks read and not yet taken, by index: the buffer and where the bytes start in it.
    ready: BTreeMap<usize, std::io::Result<(Vec<u8>, usize)>>,
    /// Bytes in `ready`.
    held: u64,
    /// Buffers the load has finished with.
    spare: Vec<Vec<u8>>,
    stop: bool,
}

impl Ahead {
    /// Starts reading `plan` ahead, at most `window` bytes beyond what was taken.
    pub(crate) fn start(plan: Vec<(PathBuf, u64, u64)>, window: u64) -> Arc<Ahead> {
        let ahead = Arc::new(Ahead {
            plan,
            window,
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
            // Small chunks that follow each other in one file are read in one request, and
            // copied apart; a large one is read alone, into the buffer the load takes.
            let (path, offset, _) = &self.plan[i];
            let mut end = i + 1;
            let mut span = self.plan[i].2;
            while let Some((p, o, l)) = self.plan.get(end) {
                if p != path || *o != offset + span || span + l > MERGE || span.max(*l) >= SMALL {
                    break;
                }
                span += l;
                end += 1;
            }
            let mut buf = {
                let mut s = self.lock();
                // The chunks the load waits for are read whatever is held.
                while !s.stop && s.held >= self.window && i > s.next {
                    s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
                }
                if s.stop {
                    return;
                }
                s.spare.pop().unwrap_or_default()
            };
            let read = crate::direct::read_chunk(path, *offset, span as usize, &mut buf);
            let mut s = self.lock();
            match read {
                Ok(start) if end == i + 1 => {
                    s.ready.insert(i, Ok((buf, start)));
                }
                Ok(start) => {
                    let mut at = start;
                    for k in i..end {
                        let len = self.plan[k].2 as usize;
                        let mut chunk = s.spare.pop().unwrap_or_default();
                        chunk.clear();
                        chunk.extend_from_slice(&buf[at..at + len]);
                        at += len;
                        s.ready.insert(k, Ok((chunk, 0)));
                    }
                    s.spare.push(buf);
                }
                // Each chunk read alone says which failed, and how.
                Err(_) => {
                    drop(s);
                    for k in i..end {
                        let (p, o, l) = &self.plan[k];
                        let mut chunk = Vec::new();
                        let read = crate::direct::read_chunk(p, *o, *l as usize, &mut chunk);
                        self.lock()
                            .ready
                            .insert(k, read.map(|start| (chunk, start)));
                    }
                    s = self.lock();
                }
            }
            s.held += span;
            self.changed.notify_all();
            i = end;
        }
    }

    /// The next chunk of the plan, if it is `len` bytes of `path` at `offset`: waits until it is
    /// read, swaps its buffer into `buf`, and returns where its bytes start there. `None` when
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
        let read = loop {
            if let Some(read) = s.ready.remove(&i) {
                break read;
            }
            if s.stop {
                return None;
            }
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        };
        s.next += 1;
        s.held -= len;
        let taken = read.map(|(mut chunk, start)| {
            std::mem::swap(buf, &mut chunk);
            if s.spare.len() < 8 {
                s.spare.push(chunk);
            }
            start
        });
        self.changed.notify_all();
        Some(taken)
    }

    /// Bytes read ahead and not yet taken.
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
