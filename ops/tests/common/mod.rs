//! Helpers shared by the `marathon` binary's tests.

use std::path::Path;

/// The repository's root.
pub fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// Whether process `pid` is still running (a zombie awaiting its reaper counts as gone).
pub use marathon_chaos::servers::running;
