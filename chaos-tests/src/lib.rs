//! marathon-chaos: failure injection.
//!
//! Owns the scenarios that kill worker processes, nodes, etcd members and the object store for
//! real, with a real etcd and a real S3-API server, and the deterministic simulation of the
//! coordination protocol. It drives the `marathon` binary and uses the crates' test helpers.
//!
//! Built so far: the simulation ([`sim`]): the membership core of every agent against a
//! simulated etcd that delays, reorders and loses deliveries and expires leases, with nodes and
//! workers dying and returning, every run drawn from a seed and checked for the protocol's
//! safety invariants. The real-process elastic failure tests live in `ops/tests/elastic.rs`.

pub mod sim;
