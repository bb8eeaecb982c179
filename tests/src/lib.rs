//! Shared pieces of the integration tests: consumer declarations made with
//! the macro exactly as a user would, an independent float64 reference, and
//! random problem generators.

pub mod cases;
pub mod consumer;
pub mod device;
pub mod reference;
pub mod sequence_parallel;
pub mod training;
pub mod varlen;
