//! The load generator's library: the `run`, `ceiling` and `chaos` commands of
//! `pushgate-loadtest` (see `load`), also used by the gateway's integration tests to run a short
//! chaos scenario in the normal suite.

pub mod load;
