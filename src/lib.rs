//! The root package's tests, examples and benches use the workspace's test support.

pub use imgclf_test_support::*;
