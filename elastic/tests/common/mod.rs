//! Helpers shared by the elastic tests.

pub mod etcd;
pub mod etcd_tls;
