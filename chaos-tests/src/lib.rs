//! marathon-chaos: failure injection.
//!
//! - [`run`]: one scenario against real processes: a three-member etcd cluster and a Garage
//!   store ([`servers`], [`garage`]), one `marathon agent` per node with its workers ([`cluster`]), each
//!   node in a network namespace of its own where the machine allows ([`network`]), and the
//!   faults of a schedule drawn from a seed ([`scenario`]) injected as the job reaches their
//!   steps; the invariants checked after it ([`check`]), and a report ([`report`]).
//! - [`browser`]: a real headless Chromium loading a report page, and the checks it must pass.
//! - [`throttle`]: the slow-worker fault, a live process made slow.
//! - [`sim`]: the membership core of every agent against a simulated etcd that delays,
//!   reorders and loses deliveries and expires leases, with nodes and workers dying and
//!   returning, every run drawn from a seed and checked for the protocol's safety invariants.
//!
//! - [`agents`]: the node agent's own code for every node, turn by turn on a simulated clock
//!   against a simulated etcd, under the same faults, checked for the same invariants.
//!
//! `marathon chaos run --seed S` replays one scenario, `marathon chaos soak --duration D` runs
//! scenarios until the time is up, and `marathon chaos sim` runs the simulation.

pub mod agents;
pub mod browser;
pub mod check;
pub mod cluster;
mod corpus;
pub mod garage;
pub mod network;
pub mod process;
pub mod prometheus;
pub mod report;
mod rng;
pub mod run;
pub mod scenario;
pub mod servers;
pub mod sim;
pub mod throttle;
pub mod weeks;
