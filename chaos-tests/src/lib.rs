//! marathon-chaos: failure injection against real processes.
//!
//! Owns the scenarios that kill worker processes, nodes, etcd members and the object store for
//! real, with a real etcd and a real S3-API server, and the deterministic simulation of the
//! coordination protocol. It drives the `marathon` binary and uses the crates' test helpers.
//!
//! Nothing is implemented here yet; the chaos-suite issue fills this crate.
