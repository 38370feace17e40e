//! A group's segment: its layout, its mapping, its control words, and its creation and opening
//! under `/dev/shm`.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::SeqCst};
use std::time::Duration;

/// Where segments are created: a tmpfs on every Linux host.
const SHM_DIR: &str = "/dev/shm";
/// The prefix of a segment's file name; the rest is 32 random hex digits.
const PREFIX: &str = "marathon-";
const MAGIC: u64 = u64::from_le_bytes(*b"MRTSHM01");
const LINE: usize = 64;
/// The largest window of a collective's piece, per member and chunk. Small, so that a piece's
/// slots stay in the caches between the member that writes them and the ones that read them:
/// the members' own buffers are then all that streams from memory.
const WINDOW_BYTES_MAX: usize = 32 << 10;
/// The two collective buffers together stay within this, whatever the group's size.
const COLLECTIVE_BYTES_MAX: usize = 64 << 20;
/// The largest ring of one direction of one pair.
const RING_BYTES_MAX: usize = 512 << 10;
/// All the rings together stay within this.
const RINGS_BYTES_MAX: usize = 16 << 20;

/// The sizes and offsets of a group's segment: a pure function of the group's size, so every
/// member computes the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Layout {
    pub(super) size: usize,
    /// Elements of one window: a slot holds `size` windows, a buffer `size` slots.
    pub(super) window: usize,
    pub(super) ring_bytes: usize,
    pub(super) collective_at: usize,
    pub(super) rings_at: usize,
    pub(super) bytes: usize,
}

impl Layout {
    pub(super) fn new(size: usize) -> Self {
        assert!(size >= 2, "a segment serves groups of two or more");
        let window =
            (WINDOW_BYTES_MAX.min(COLLECTIVE_BYTES_MAX / (2 * size * size)) / 4 / 16 * 16).max(16);
        let pairs = size * (size - 1);
        let ring_bytes = (RING_BYTES_MAX.min(RINGS_BYTES_MAX / pairs) / 4096 * 4096).max(4096);
        let header = (LINE * (1 + size + 2 * pairs)).div_ceil(4096) * 4096;
        let collective_at = header;
        let rings_at = collective_at + 2 * size * size * window * 4;
        Layout {
            size,
            window,
            ring_bytes,
            collective_at,
            rings_at,
            bytes: rings_at + pairs * ring_bytes,
        }
    }

    pub(super) fn slot_elems(&self) -> usize {
        self.size * self.window
    }
}

/// One mapping of a group's segment.
pub(super) struct Segment {
    map: memmap2::MmapRaw,
    pub(super) layout: Layout,
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Segment({} bytes for {} ranks)",
            self.layout.bytes, self.layout.size
        )
    }
}

impl Segment {
    fn map(file: &File, layout: Layout) -> std::io::Result<Self> {
        let map = memmap2::MmapOptions::new()
            .len(layout.bytes)
            .map_raw(file)?;
        Ok(Segment { map, layout })
    }

    fn base(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    fn u64_at(&self, at: usize) -> &AtomicU64 {
        assert!(at % 8 == 0 && at + 8 <= self.layout.collective_at);
        // SAFETY: inside the header of a live mapping, aligned (the mapping is page-aligned),
        // and only ever accessed atomically, by every member.
        unsafe { &*self.base().add(at).cast::<AtomicU64>() }
    }

    fn u32_at(&self, at: usize) -> &AtomicU32 {
        assert!(at % 4 == 0 && at + 4 <= self.layout.collective_at);
        // SAFETY: as in `u64_at`.
        unsafe { &*self.base().add(at).cast::<AtomicU32>() }
    }

    fn rank_line(&self, r: usize) -> usize {
        LINE * (1 + r)
    }

    /// How many barriers rank `r` has reached.
    pub(super) fn arrived(&self, r: usize) -> &AtomicU64 {
        self.u64_at(self.rank_line(r))
    }

    /// Rank `r`'s futex word: bumped by whoever wants it to look again.
    pub(super) fn bell(&self, r: usize) -> &AtomicU32 {
        self.u32_at(self.rank_line(r) + 8)
    }

    /// Whether rank `r` sleeps on its bell (so ringing it needs a system call).
    pub(super) fn asleep(&self, r: usize) -> &AtomicU32 {
        self.u32_at(self.rank_line(r) + 12)
    }

    /// Set once rank `r` has aborted or dropped the group.
    pub(super) fn gone(&self, r: usize) -> &AtomicU32 {
        self.u32_at(self.rank_line(r) + 16)
    }

    fn pair(&self, from: usize, to: usize) -> usize {
        assert!(from != to);
        from * (self.layout.size - 1) + if to < from { to } else { to - 1 }
    }

    /// Bytes `from` has written into its ring to `to`, ever.
    pub(super) fn head(&self, from: usize, to: usize) -> &AtomicU64 {
        self.u64_at(LINE * (1 + self.layout.size + 2 * self.pair(from, to)))
    }

    /// Bytes `to` has read from the ring from `from`, ever.
    pub(super) fn tail(&self, from: usize, to: usize) -> &AtomicU64 {
        self.u64_at(LINE * (2 + self.layout.size + 2 * self.pair(from, to)))
    }

    /// The first element of rank `r`'s slot in collective buffer `b`.
    pub(super) fn slot(&self, b: usize, r: usize) -> *mut f32 {
        let l = &self.layout;
        assert!(b < 2 && r < l.size);
        // SAFETY: inside the mapping: the buffers span 2 * size * slot_elems elements from
        // collective_at.
        unsafe {
            self.base()
                .add(l.collective_at)
                .cast::<f32>()
                .add((b * l.size + r) * l.slot_elems())
        }
    }

    pub(super) fn ring(&self, from: usize, to: usize) -> *mut u8 {
        // SAFETY: inside the mapping: pairs * ring_bytes bytes from rings_at.
        unsafe {
            self.base()
                .add(self.layout.rings_at + self.pair(from, to) * self.layout.ring_bytes)
        }
    }

    /// Tells rank `r` to look again, waking it if it sleeps.
    pub(super) fn ring_bell(&self, r: usize) {
        self.bell(r).fetch_add(1, SeqCst);
        if self.asleep(r).load(SeqCst) != 0 {
            futex_wake(self.bell(r));
        }
    }

    /// Marks rank `r` as gone and wakes everyone, so no peer waits on it any longer.
    pub(super) fn leave(&self, r: usize) {
        self.gone(r).store(1, SeqCst);
        for q in 0..self.layout.size {
            self.ring_bell(q);
        }
    }
}

pub(super) fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: a futex wait on a live, aligned 32-bit word of a shared mapping (so not
    // FUTEX_PRIVATE), with a relative timeout; it returns on a wake, a change of the word, a
    // signal or the timeout, each of which the caller handles by looking again.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0,
        );
    }
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: a futex wake on a live, aligned 32-bit word of a shared mapping.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0,
        );
    }
}

/// Removes a segment's name when dropped.
pub(super) struct Unlink(pub(super) PathBuf);

impl Drop for Unlink {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Creates, reserves and maps a fresh segment for a group of `size`, its header written.
pub(super) fn create_segment(size: usize) -> std::io::Result<(Segment, Unlink)> {
    let layout = Layout::new(size);
    let mut random = [0u8; 16];
    getrandom::fill(&mut random).map_err(|e| std::io::Error::other(e.to_string()))?;
    let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
    let path = PathBuf::from(format!("{SHM_DIR}/{PREFIX}{hex}"));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("create {}: {e}", path.display())))?;
    let unlink = Unlink(path);
    file.set_len(layout.bytes as u64)?;
    // Reserve every page now: on a full tmpfs this fails here, where touching an unreserved
    // page later would kill the process with SIGBUS.
    // SAFETY: a plain system call on an open descriptor.
    let err = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, layout.bytes as libc::off_t) };
    if err != 0 {
        return Err(std::io::Error::from_raw_os_error(err));
    }
    let seg = Segment::map(&file, layout)?;
    seg.u64_at(8).store(size as u64, SeqCst);
    seg.u64_at(16).store(layout.bytes as u64, SeqCst);
    seg.u64_at(0).store(MAGIC, SeqCst);
    Ok((seg, unlink))
}

/// Opens and maps the segment rank 0 named, after checking it is one: under `/dev/shm`, named
/// as marathon names them, this user's, of the size a group of `size` needs.
pub(super) fn open_segment(path: &Path, size: usize) -> std::io::Result<Segment> {
    let bad = |why: String| std::io::Error::new(ErrorKind::InvalidData, why);
    let name = path
        .strip_prefix(SHM_DIR)
        .ok()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix(PREFIX))
        .filter(|hex| hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()));
    if name.is_none() {
        return Err(bad(format!("{} is not a marathon segment", path.display())));
    }
    let layout = Layout::new(size);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let meta = file.metadata()?;
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    if meta.uid() != uid || meta.len() != layout.bytes as u64 {
        return Err(bad(format!(
            "{} is {} bytes of user {}, not {} bytes of user {uid}",
            path.display(),
            meta.len(),
            meta.uid(),
            layout.bytes
        )));
    }
    let seg = Segment::map(&file, layout)?;
    if seg.u64_at(0).load(SeqCst) != MAGIC || seg.u64_at(8).load(SeqCst) != size as u64 {
        return Err(bad(format!(
            "{} does not hold a segment for {size} ranks",
            path.display()
        )));
    }
    Ok(seg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_layout_fits_its_bounds_and_aligns_its_windows() {
        for size in [2, 3, 4, 7, 8, 16, 64] {
            let l = Layout::new(size);
            assert!(
                2 * size * size * l.window * 4 <= COLLECTIVE_BYTES_MAX,
                "{l:?}"
            );
            assert!(size * (size - 1) * l.ring_bytes <= RINGS_BYTES_MAX.max(4096 * size * size));
            assert_eq!(l.window % 16, 0, "{l:?}");
            assert_eq!(l.collective_at % 4096, 0, "{l:?}");
            assert!(LINE * (1 + size + 2 * size * (size - 1)) <= l.collective_at);
        }
    }

    #[test]
    fn a_name_that_is_not_a_segment_is_not_opened() {
        for path in [
            "/etc/passwd",
            "/dev/shm/marathon-../../etc/passwd",
            "/dev/shm/other",
        ] {
            let e = open_segment(Path::new(path), 2).expect_err("refused");
            assert!(e.to_string().contains("not a marathon segment"), "{e}");
        }
    }
}
