//! Helpers shared by the elastic tests.

pub mod etcd;
