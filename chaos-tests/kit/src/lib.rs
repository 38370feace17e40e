//! What marathon's tests share, as a dev-dependency of every crate that needs it:
//!
//! - [`etcd`]: a private etcd (one member, a cluster, or one behind TLS with users and roles);
//! - [`garage`]: a private Garage, a real S3-API object store;
//! - the corpora tests train on: [`shakespeare`] and [`docs_corpus`].
//!
//! Every server runs on free loopback ports with its own directory, is killed on drop, and
//! fails the test loudly, saying how to install it, when its binary is missing: a test that
//! needs a server never passes without one.

pub mod etcd;
pub mod garage;

use std::path::{Path, PathBuf};

/// The repository's root.
pub fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// A port nobody listens on now, not handed out before by this process.
pub fn free_port() -> u16 {
    marathon_chaos::garage::free_port().expect("a free port")
}

/// tinyshakespeare, from `../shared/data/` beside the checkout or `MARATHON_TEST_TEXT`.
/// Fails loudly when it is missing: a test that needs real text must not pass without it.
pub fn shakespeare() -> PathBuf {
    let path = std::env::var_os("MARATHON_TEST_TEXT")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("../shared/data/tinyshakespeare.txt"));
    assert!(
        path.is_file(),
        "test text {} is missing: these tests need tinyshakespeare.txt in ../shared/data/ beside the \
         checkout, or MARATHON_TEST_TEXT set to a copy of it",
        path.display()
    );
    path
}

/// The small corpus that quick jobs train on: this repository's README and ARCHITECTURE.
/// A test whose figures depend on the exact text can move when they are edited.
pub fn docs_corpus() -> [PathBuf; 2] {
    [repo().join("README.md"), repo().join("ARCHITECTURE.md")]
}
