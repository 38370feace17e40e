//! marathon-elastic: who is in the job and what each member does.
//!
//! Owns membership, leases, generations, rendezvous, the leader, plans (live slots to a
//! (tp, pp, dp) assignment and a microbatch split) and fencing. The deciding core does no I/O:
//! events and the current time go in, actions come out. A `Coordinator` trait with an etcd
//! implementation and an in-process one carries the decisions between machines.
//!
//! Never knows about tensors or object stores.
//!
//! Nothing is implemented here yet; the elastic-runtime issue fills this crate.
